"""VBench-style proxies on videos whose answer is known."""

import numpy as np
import pytest

from vdit_sparse.quality.vbench import (
    background_consistency,
    dynamic_degree,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
    vbench_proxies,
)


def _square_video(positions, size=32, side=6, colour=(255, 0, 0), background=(0, 0, 255)):
    """A coloured square at the given x positions on a plain background: (T, size, size, 3) uint8."""
    v = np.empty((len(positions), size, size, 3), np.uint8)
    v[:] = background
    for t, x in enumerate(positions):
        v[t, 12 : 12 + side, x : x + side] = colour
    return v


def test_a_still_video_is_perfect_and_static():
    v = np.repeat(_square_video([5]), 8, axis=0)
    scores = vbench_proxies(v)
    for name in ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["dynamic_degree"] == 0.0


def test_flickering_is_one_minus_the_mean_frame_difference():
    v = np.zeros((4, 16, 16, 3), np.uint8)
    v[1::2] = 51  # alternating 0 and 51/255 = 0.2: every consecutive pair differs by 0.2
    assert temporal_flickering(v) == pytest.approx(0.8, abs=1e-6)


def test_motion_smoothness_prefers_linear_fades_to_flicker():
    fade = np.linspace(0, 1, 9, dtype=np.float32)[:, None, None, None] * np.ones((1, 16, 16, 3), np.float32)
    assert motion_smoothness(fade) == pytest.approx(1.0, abs=1e-6)  # linear interpolation is exact
    flicker = fade.copy()
    flicker[1::2] = 1 - flicker[1::2]
    assert motion_smoothness(flicker) < 0.8


def test_dynamic_degree_grows_with_motion():
    slow = _square_video(range(2, 10))
    fast = _square_video(range(0, 24, 3))
    assert 0 < dynamic_degree(slow) < dynamic_degree(fast)


def test_a_moving_subject_keeps_its_identity_but_a_recoloured_one_does_not():
    moving = _square_video(range(2, 26, 3))
    assert subject_consistency(moving) == pytest.approx(1.0, abs=1e-6)  # same colours, same pixel counts
    recoloured = moving.copy()
    recoloured[4:, 12:18] = np.where(recoloured[4:, 12:18] == [255, 0, 0], [0, 255, 0], recoloured[4:, 12:18])
    assert subject_consistency(recoloured) < 0.99


def test_background_consistency_drops_when_the_scene_changes():
    still_scene = _square_video(range(2, 26, 3))
    new_scene = still_scene.copy()
    new_scene[4:, :, :16] = (0, 200, 0)  # half the background turns green
    assert background_consistency(new_scene) < background_consistency(still_scene) - 0.05
