"""LPIPS never crashes, never downloads, is time-bounded, and is fed [-1, 1]."""

import time

import numpy as np
import pytest

from vdit_sparse.quality import perceptual as lpips_module
from vdit_sparse.quality.perceptual import lpips, unavailable_reason


def _pair():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def runnable(monkeypatch):
    """Pretend torchvision and its backbone weights are present; the test supplies the metric."""
    monkeypatch.setattr(lpips_module, "unavailable_reason", lambda net="alex": None)


def test_missing_backbone_is_reported_with_a_reason_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights cannot be there
    a, b = _pair()
    result = lpips(a, b)
    assert result.value is None and result.per_frame is None
    assert "not installed" in result.reason or "not on disk" in result.reason
    assert result.reason == unavailable_reason("alex")


def test_unknown_backbone_is_reported():
    assert "unknown LPIPS backbone" in unavailable_reason("resnet")


def test_a_hanging_load_is_cut_off_at_the_timeout(monkeypatch, runnable):
    monkeypatch.setattr(lpips_module, "_load_metric", lambda net: time.sleep(30))
    a, b = _pair()
    t0 = time.perf_counter()
    result = lpips(a, b, timeout_s=0.3)
    assert time.perf_counter() - t0 < 5
    assert result.value is None and "within 0.3 s" in result.reason


def test_a_failing_backbone_is_reported(monkeypatch, runnable):
    def broken(net):
        raise RuntimeError("corrupt weight file")

    monkeypatch.setattr(lpips_module, "_load_metric", broken)
    result = lpips(*_pair())
    assert result.value is None and "RuntimeError: corrupt weight file" in result.reason


def test_inputs_reach_the_network_in_minus_one_to_one_and_scores_average(monkeypatch, runnable):
    seen = []

    def metric(x, y):  # (t, 3, H, W) each
        seen.append((x.min().item(), x.max().item(), y.min().item(), y.max().item()))
        return (x - y).abs().mean(dim=(1, 2, 3))

    monkeypatch.setattr(lpips_module, "_load_metric", lambda net: metric)
    a = np.zeros((10, 16, 16, 3), np.uint8)  # 10 frames: two batches of FRAMES_PER_BATCH = 8
    b = np.full((10, 16, 16, 3), 255, np.uint8)
    result = lpips(a, b)
    assert seen and all(v in (-1.0, 1.0) for s in seen for v in s)  # 0 -> -1, 255 -> +1
    assert result.per_frame == pytest.approx([2.0] * 10)
    assert result.value == pytest.approx(2.0)


def test_mismatched_videos_are_still_an_error():
    a, _ = _pair()
    with pytest.raises(ValueError, match="differ in shape"):
        lpips(a, a[:2])
