"""Prompt-following metrics of the shapes world, checked on ground-truth clips and on wrong prompts."""

import numpy as np
import pytest

from vdit_sparse import shapes_world as sw
from vdit_sparse.quality.prompt_following import (
    component_sizes, count_components, parse_prompt, prompt_following, prompt_following_accuracy,
)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "left"}


@pytest.fixture(scope="module")
def clips():
    return [sw.make_clip(21, i, frames=9, height=64, width=64, split="all") for i in range(64)]


def test_parse_prompt_reads_every_attribute_and_leaves_the_rest_none():
    assert parse_prompt("Two RED circles moving left on a plain background") == dict(
        colour="red", shape="circle", motion="left", count=2, background="plain")
    assert parse_prompt("a cyan triangle staying still") == dict(
        colour="cyan", shape="triangle", motion="still", count=1, background=None)
    assert parse_prompt("squares") ["count"] == 2
    assert parse_prompt("a cat on the mat") == dict(colour=None, shape=None, motion=None, count=None, background=None)
    with pytest.raises(TypeError, match="prompt"):
        parse_prompt(None)


def test_ground_truth_clips_follow_their_prompts(clips):
    rates = prompt_following_accuracy([(c.video, c.caption) for c in clips])
    assert rates["n"] == 64
    assert rates["colour_accuracy"] >= 0.95 and rates["motion_accuracy"] >= 0.95 and rates["count_accuracy"] >= 0.95
    assert rates["all_accuracy"] >= 0.9
    assert rates["mean_flicker"] < 0.01  # backgrounds are static; only soft object edges change


def test_wrong_prompts_are_reported_as_failures(clips):
    names = list(sw.COLOURS)
    results = []
    for c in clips:
        wrong_colour = names[(names.index(c.combo.colour) + 1) % len(names)]
        wrong = sw.Combo(wrong_colour, c.combo.shape, OPPOSITE[c.combo.motion], 3 - c.combo.count, c.combo.background)
        results.append(prompt_following(c.video, wrong.caption()))
    for key in ("colour_ok", "motion_ok", "count_ok"):
        assert np.mean([r[key] for r in results]) <= 0.05, key
    first = prompt_following(clips[0].video, clips[0].caption)
    assert first["detected_colour"] == clips[0].combo.colour and first["detected_count"] == clips[0].combo.count


def test_unnamed_attributes_are_not_judged_and_a_missing_object_fails(clips):
    r = prompt_following(clips[0].video, "something")
    assert r["colour_ok"] is r["motion_ok"] is r["count_ok"] is None
    grey = np.full((9, 64, 64, 3), 100, np.uint8)
    r = prompt_following(grey, "a red circle moving left")
    assert r["colour_ok"] is False and r["motion_ok"] is False and r["count_ok"] is False
    assert r["detected_colour"] is None and r["flicker"] == 0.0


def test_flicker_grows_with_background_noise(clips):
    video = clips[0].video
    noise = np.random.default_rng(0).integers(-20, 21, video.shape)
    noisy = np.clip(video.astype(int) + noise, 0, 255).astype(np.uint8)
    calm, shaky = prompt_following(video, "x")["flicker"], prompt_following(noisy, "x")["flicker"]
    assert shaky > 0.03 > calm


def test_components_are_4_connected_and_specks_do_not_count():
    mask = np.zeros((40, 40), bool)
    mask[2:12, 2:12] = True  # a square
    mask[20:35, 20:24] = mask[31:35, 20:35] = mask[20:35, 31:35] = True  # a U: one component
    mask[38, 38] = True  # a speck
    assert sorted(component_sizes(mask)) == [1, 100, 148]
    assert count_components(mask) == 2
    diagonal = np.eye(6, dtype=bool)
    assert len(component_sizes(diagonal)) == 6


def test_bad_frames_are_named():
    with pytest.raises(ValueError, match=r"frames: expected \(T, H, W, 3\)"):
        prompt_following(np.zeros((4, 8, 8), np.uint8), "a red circle")
    with pytest.raises(ValueError, match="uint8"):
        prompt_following(np.zeros((4, 8, 8, 3), np.float32), "a red circle")
    with pytest.raises(ValueError, match="samples: empty"):
        prompt_following_accuracy([])
