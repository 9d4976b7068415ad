"""attach_text(..., text_lengths=...): padding text keys are never attended, real text stays dense."""

import math

import pytest
import torch

from vdit_sparse.kernels import block_sparse_attention
from vdit_sparse.layout import VideoLayout
from vdit_sparse.plan import attach_text, from_block_mask



def padded_case(position):
    layout = VideoLayout(frames=2, height=3, width=3, text_tokens=8, text_position=position)  # 18 video tokens
    g = torch.Generator().manual_seed(0)
    video_mask = torch.rand(2, 2, 3, 3, generator=g) < 0.5  # (B, H, 3, 3) blocks of 6 video tokens
    video_mask |= torch.eye(3, dtype=torch.bool)
    video = from_block_mask(video_mask, (6, 6), 18)
    return layout, video, video_mask.repeat_interleave(6, 2).repeat_interleave(6, 3)  # (B, H, 18, 18) tokens


def expected_mask(layout, video_tokens_mask, lengths):
    B, H = video_tokens_mask.shape[:2]
    n, v0, t0 = layout.num_tokens, layout.video_start, layout.text_start
    mask = torch.zeros(B, H, n, n, dtype=torch.bool)
    mask[:, :, v0 : v0 + 18, v0 : v0 + 18] = video_tokens_mask
    for b, real in enumerate(lengths):
        mask[b, :, :, t0 : t0 + real] = True  # every query sees the real text
        mask[b, :, t0 : t0 + 8, v0 : v0 + 18] = True  # text rows, padding rows included, see all video
    return mask


@pytest.mark.parametrize("lengths", [(3, 7), (0, 8)])  # real text tokens of batch items 0 and 1, out of 8
@pytest.mark.parametrize("position", ["before", "after"])
def test_padding_keys_are_never_attended_and_real_text_is_dense(position, lengths):
    layout, video, video_tokens_mask = padded_case(position)
    plan = attach_text(video, layout, text_block=4, text_lengths=torch.tensor(lengths))
    plan.validate(layout.num_tokens)
    expected = expected_mask(layout, video_tokens_mask, lengths)
    assert torch.equal(plan.token_mask(), expected)
    assert torch.allclose(plan.density(), expected.float().mean((2, 3)))
    # the kernel over the plan equals masked attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 8, generator=g) for _ in range(3))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~expected, float("-inf"))
    assert torch.allclose(block_sparse_attention(q, k, v, plan), scores.softmax(-1) @ v, atol=1e-5)


@pytest.mark.parametrize("position", ["before", "after"])
def test_without_lengths_all_text_is_dense_and_full_lengths_mean_no_padding(position):
    layout, video, video_tokens_mask = padded_case(position)
    plain = attach_text(video, layout, text_block=4)
    assert torch.equal(plain.token_mask(), expected_mask(layout, video_tokens_mask, [8, 8]))  # an independent mask
    full = attach_text(video, layout, text_block=4, text_lengths=[8, 8])
    assert torch.equal(full.token_mask(), plain.token_mask())


def test_bad_lengths_are_named():
    layout, video, _ = padded_case("after")
    with pytest.raises(ValueError, match=r"text_lengths=\[3, 9\]: expected 2 counts in \[0, 8\]"):
        attach_text(video, layout, text_lengths=[3, 9])
    with pytest.raises(ValueError, match="expected 2 counts"):
        attach_text(video, layout, text_lengths=[3])
