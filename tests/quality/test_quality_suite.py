"""compare_videos: every metric in one dict, float frames labelled apart, prompt following when present."""

import sys
import types

import numpy as np
import pytest

from vdit_sparse.quality import compare_videos, psnr, ssim


def _pair():
    rng = np.random.default_rng(0)
    a = rng.random((4, 16, 16, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1).astype(np.float32)
    return a, b


def _u8(x):
    return (x * 255 + 0.5).astype(np.uint8)


def test_headline_numbers_are_on_decoded_uint8_frames_and_float_ones_are_labelled():
    a, b = _pair()
    out = compare_videos(_u8(a), _u8(b), a_float=a, b_float=b, lpips=False)
    assert out["psnr"] == pytest.approx(psnr(_u8(a), _u8(b))) and out["ssim"] == pytest.approx(ssim(_u8(a), _u8(b)))
    assert out["psnr_float"] == pytest.approx(psnr(a, b)) and out["psnr_float"] != pytest.approx(out["psnr"], abs=1e-3)
    assert len(out["psnr_per_frame"]) == len(out["ssim_per_frame"]) == 4
    assert out["lpips"] is None and out["lpips_unavailable"] == "not requested"
    assert set(out["vbench"]) == {
        "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree"
    }
    assert "prompt_following" not in out


def test_float_videos_alone_are_rounded_for_the_headline():
    a, b = _pair()
    out = compare_videos(a, b, lpips=False)
    assert out["psnr"] == pytest.approx(psnr(_u8(a), _u8(b)))
    assert out["psnr_float"] == out["psnr"]  # no separate float frames given


def test_lpips_unavailability_is_reported_not_raised():
    a, b = _pair()
    out = compare_videos(a, b)
    assert (out["lpips"] is None) == (out["lpips_unavailable"] is not None)


def test_prompt_following_scores_are_included_when_the_module_exists(monkeypatch):
    seen = []

    def prompt_following(frames_uint8, prompt):
        seen.append((frames_uint8.dtype, frames_uint8.shape, prompt))
        return {"colour": float(frames_uint8.mean() / 255), "count": None}

    fake = types.ModuleType("vdit_sparse.quality.prompt_following")
    fake.prompt_following = prompt_following
    monkeypatch.setitem(sys.modules, "vdit_sparse.quality.prompt_following", fake)
    a, b = _pair()
    out = compare_videos(a, b, prompt="a red square", lpips=False)
    assert seen == [(np.uint8, (4, 16, 16, 3), "a red square")] * 2
    assert out["prompt_following"]["count"] is None
    assert out["prompt_following"]["colour"] == pytest.approx(_u8(b).mean() / 255)
    assert out["prompt_following_reference"]["colour"] == pytest.approx(_u8(a).mean() / 255)
    assert "prompt_following" not in compare_videos(a, b, lpips=False)  # no prompt, no scores


def test_mismatched_videos_are_refused_before_any_work():
    a, b = _pair()
    with pytest.raises(ValueError, match="differ in shape"):
        compare_videos(a, b[:3])


def test_without_the_prompt_following_module_there_are_no_scores(monkeypatch):
    monkeypatch.setitem(sys.modules, "vdit_sparse.quality.prompt_following", None)  # import raises ModuleNotFoundError
    a, b = _pair()
    assert "prompt_following" not in compare_videos(a, b, prompt="a red square", lpips=False)
