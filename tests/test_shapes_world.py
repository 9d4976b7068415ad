"""The shapes world: deterministic clips whose pixels show what their captions say."""

import numpy as np
import pytest
import torch

from vdit_sparse import shapes_world as sw
from vdit_sparse.pipelines.tiny import VOCAB_WORDS

SMALL = dict(frames=9, height=64, width=64)


def test_same_seed_gives_identical_clips_and_other_seeds_or_indices_differ():
    a, b = sw.make_clip(5, 3, **SMALL), sw.make_clip(5, 3, **SMALL)
    assert a.caption == b.caption and np.array_equal(a.video, b.video) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.video, sw.make_clip(6, 3, **SMALL).video)
    assert not np.array_equal(a.video, sw.make_clip(5, 4, **SMALL).video)


def test_render_batch_is_the_stream_in_training_layout():
    video, captions = sw.render_batch(2, 1, 2, **SMALL)  # clips 2 and 3 of stream 2
    assert video.shape == (2, 3, 9, 64, 64) and video.min() >= -1 and video.max() <= 1
    clip = sw.make_clip(2, 3, **SMALL)
    assert captions[1] == clip.caption
    as_uint8 = ((video[1].permute(1, 2, 3, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()
    assert np.abs(as_uint8.astype(int) - clip.video).max() <= 1


@pytest.mark.parametrize("index", range(40))
def test_caption_matches_pixels(index):
    clip = sw.make_clip(11, index, split="all", **SMALL)
    combo, video, masks = clip.combo, clip.video.astype(float) / 255, clip.masks
    assert masks.shape[0] == combo.count
    if combo.count == 2:
        assert not (masks[0] & masks[1]).any(), "objects overlap"
    named = np.array(sw.COLOURS[combo.colour])
    unit = np.array(sw.DIRECTIONS[combo.motion])
    for mask in masks:
        area = mask.sum(axis=(1, 2))
        assert area.min() > 0.8 * area.max(), "an object left the frame"
        mean_rgb = video[mask].mean(axis=0)
        nearest = min(sw.COLOURS, key=lambda c: np.abs(np.array(sw.COLOURS[c]) - mean_rgb).sum())
        assert nearest == combo.colour and np.abs(mean_rgb - named).max() < 0.15
        ys, xs = np.nonzero(mask[0])
        ye, xe = np.nonzero(mask[-1])
        shift = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])  # (x, y), y down
        if combo.motion == "still":
            assert np.abs(shift).max() < 0.5
        else:
            assert shift @ unit >= 0.25 * 64, f"{clip.caption}: moved {shift}"
            assert abs(shift @ unit[::-1]) < 1.0  # nothing across the motion
    near_object = masks.any(0)
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)) * 2:  # grow by 2 pixels: soft edges are tinted
        near_object = near_object | np.roll(near_object, step, axis=axis)
    background = video[~near_object]
    levels = np.unique(background.round(3), axis=0)
    assert np.allclose(background.std(axis=-1), 0), "backgrounds are grey"
    assert len(levels) <= 3 if combo.background == "plain" else len(levels) >= 2


def test_heldout_prompts_never_appear_in_the_training_stream():
    held = set(sw.heldout_combos())
    stream = [sw.sample_clip_spec(0, i, **SMALL).combo for i in range(3000)]
    assert not held & set(stream)
    assert len(set(stream)) >= 300  # nearly every one of the 324 training combinations shows up
    assert {sw.sample_clip_spec(1, i, **SMALL, split="heldout").combo for i in range(200)} <= held


def test_heldout_set_is_fixed_and_every_attribute_is_still_trained():
    held = sw.heldout_combos()
    assert len(set(held)) == sw.HELDOUT_SIZE == 36 and len(sw.all_combos()) == 360
    assert held[:2] == [
        sw.Combo("red", "square", "left", 2, "plain"), sw.Combo("red", "square", "right", 2, "textured")
    ]
    train = sw.combos("train")
    assert len(train) == 324 and not set(train) & set(held)
    for attribute, values in (("colour", sw.COLOURS), ("shape", sw.SHAPES), ("motion", sw.MOTIONS),
                              ("count", sw.COUNTS), ("background", sw.BACKGROUNDS)):
        assert {getattr(c, attribute) for c in train} == set(values)


def test_every_caption_word_is_in_the_tokenizer_vocabulary():
    words = {w for c in sw.all_combos() for w in c.caption().split()}
    assert words <= set(VOCAB_WORDS)
    two = sw.Combo("red", "circle", "left", 2, "plain")
    one = sw.Combo("blue", "square", "still", 1, "textured")
    assert two.caption() == "two red circles moving left on a plain background"
    assert one.caption() == "a blue square staying still on a textured background"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="split='val'"):
        sw.combos("val")
    with pytest.raises(ValueError, match="split='val'"):
        sw.make_clip(0, split="val", **SMALL)
    with pytest.raises(ValueError, match="height, width = 16, 64"):
        sw.make_clip(0, frames=9, height=16, width=64)
    with pytest.raises(ValueError, match="frames=1"):
        sw.make_clip(0, frames=1, height=64, width=64)
