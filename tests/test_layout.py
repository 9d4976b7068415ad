import pytest
import torch

from vdit_sparse import VideoLayout


def test_counts_and_positions():
    lay = VideoLayout(3, 4, 5, text_tokens=7, text_position="before")
    assert (lay.frame_tokens, lay.video_tokens, lay.num_tokens) == (20, 60, 67)
    assert (lay.video_start, lay.text_start) == (7, 0)
    after = VideoLayout(3, 4, 5, text_tokens=7, text_position="after")
    assert (after.video_start, after.text_start) == (0, 60)


def test_spatial_major_order_groups_positions_across_frames():
    lay = VideoLayout(3, 2, 2)
    order = lay.spatial_major_order()
    frame = lay.frame_of_video_token()[order]
    position = (order % lay.frame_tokens)
    # position p*F + f holds frame f at spatial position p
    assert frame.tolist() == [0, 1, 2] * 4
    assert position.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(order.sort().values, torch.arange(12))


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=0, height=2, width=2), "frames=0"),
    (dict(frames=1, height=2, width=2, text_tokens=3), "text_tokens=3"),
    (dict(frames=1, height=2, width=2, text_position="middle"), "text_position='middle'"),
])
def test_bad_layouts_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoLayout(**kwargs)


def test_check_names_the_mismatch():
    with pytest.raises(ValueError, match="sequence length 10 does not match"):
        VideoLayout(2, 2, 2).check(10)
