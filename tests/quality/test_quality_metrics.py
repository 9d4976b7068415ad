"""PSNR and SSIM against hand-computed values and an independent SSIM written here."""

import math
import warnings

import numpy as np
import pytest
import torch

from vdit_sparse.quality import psnr, psnr_per_frame, ssim, ssim_per_frame
from vdit_sparse.quality.metrics import identical_frame_psnr


def _video(seed=0, shape=(8, 32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_identical_videos_give_infinite_psnr_and_ssim_one_without_warnings():
    a = _video()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any divide-by-zero or log10(0) warning fails the test
        assert psnr(a, a) == math.inf
        assert np.isinf(psnr_per_frame(a, a)).all()
        assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
        f = torch.from_numpy(a).float() / 255
        assert psnr(f, f) == math.inf
        assert ssim(f, f) == pytest.approx(1.0, abs=1e-6)
        # flat regions: E[x^2] - mu^2 must not round below 0 and pull SSIM under 1
        flat = np.zeros((2, 32, 32, 3), np.uint8)
        flat[:, :, :16] = 200
        assert ssim(flat, flat) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [2, 8, 25])
def test_psnr_of_exact_plus_minus_sigma_noise_is_20_log10_255_over_sigma(sigma):
    # every value off by exactly +-sigma: MSE = sigma^2 on the 0..255 scale, no sampling error
    a = np.full((4, 16, 16, 3), 128, dtype=np.uint8)
    signs = np.random.default_rng(1).choice([-1, 1], size=a.shape)
    b = (a.astype(int) + sigma * signs).astype(np.uint8)
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / sigma), abs=1e-4)  # float32 frames inside


def test_psnr_of_gaussian_uint8_noise_is_within_a_tenth_of_a_db():
    sigma = 8.0
    a = np.full((8, 64, 64, 3), 120, dtype=np.uint8)
    noise = np.random.default_rng(2).normal(0, sigma, a.shape)
    b = np.clip(np.round(a + noise), 0, 255).astype(np.uint8)
    assert abs(psnr(a, b) - 20 * math.log10(255 / sigma)) < 0.1


def test_uint8_and_float_twins_give_the_same_numbers():
    a, b = _video(0), _video(1)
    fa, fb = torch.from_numpy(a).double() / 255, torch.from_numpy(b).double() / 255
    assert psnr(fa, fb) == pytest.approx(psnr(a, b), abs=1e-5)
    assert ssim(fa, fb) == pytest.approx(ssim(a, b), abs=1e-5)
    assert psnr(fa.numpy(), fb.numpy()) == pytest.approx(psnr(a, b), abs=1e-5)


def test_psnr_is_the_mean_of_per_frame_values():
    a = np.full((3, 16, 16, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[0] += 1  # MSE 1
    b[1] += 10  # MSE 100
    b[2] += 100  # MSE 10000
    per = psnr_per_frame(a, b)
    np.testing.assert_allclose(per, [20 * math.log10(255 / d) for d in (1, 10, 100)], atol=1e-9)
    assert psnr(a, b) == pytest.approx(per.mean())


def test_one_identical_frame_does_not_make_the_mean_infinite():
    a = np.full((2, 16, 16, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[1] += 10
    value = psnr(a, b)
    ceiling = identical_frame_psnr(16, 16, 3)
    assert value == pytest.approx((ceiling + 20 * math.log10(25.5)) / 2)
    assert math.isfinite(value)


def test_ssim_of_constant_frames_is_the_luminance_term():
    # sigma_a = sigma_b = sigma_ab = 0 under any window, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a = torch.full((2, 16, 16, 3), 0.5)
    b = torch.full((2, 16, 16, 3), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    np.testing.assert_allclose(ssim_per_frame(a, b), expected, rtol=1e-5)


def _gaussian_ssim_reference(a, b):
    """Wang et al. SSIM with an 11-tap sigma-1.5 Gaussian, reflect-padded borders, written independently."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(img):  # (H, W) -> (H, W)
        p = np.pad(img, 5, mode="reflect")
        rows = np.stack([np.convolve(r, g, mode="valid") for r in p])
        return np.stack([np.convolve(c, g, mode="valid") for c in rows.T]).T

    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for ch in range(a.shape[-1]):
        x_, y_ = a[..., ch], b[..., ch]
        mx, my = blur(x_), blur(y_)
        vx, vy, cxy = blur(x_ * x_) - mx**2, blur(y_ * y_) - my**2, blur(x_ * y_) - mx * my
        maps.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(maps))


def test_ssim_matches_an_independent_gaussian_window_implementation():
    rng = np.random.default_rng(3)
    a = rng.random((2, 24, 20, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    expected = [_gaussian_ssim_reference(a[t], b[t]) for t in range(2)]
    np.testing.assert_allclose(ssim_per_frame(a, b), expected, atol=2e-5)  # float32 inside


def test_ssim_matches_torchmetrics_across_frame_batches():
    # more frames than one float64 batch, non-square frames: the banded-matrix window against torchmetrics' conv
    from torchmetrics.functional.image import structural_similarity_index_measure

    from vdit_sparse.quality.metrics import SSIM_FRAMES_PER_BATCH

    rng = np.random.default_rng(5)
    a = rng.random((SSIM_FRAMES_PER_BATCH + 3, 20, 27, 3))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    expected = structural_similarity_index_measure(tb, ta, sigma=1.5, data_range=1.0, reduction="none").numpy()
    np.testing.assert_allclose(ssim_per_frame(a, b), expected, atol=1e-6)


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"differ in shape: a is \(8, 32, 32, 3\), b is \(7, 32, 32, 3\)"):
        psnr(_video(), _video(shape=(7, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"differ in shape"):
        ssim(_video(), _video(shape=(8, 32, 30, 3)))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 3), np.uint8), r"expected \(T, H, W, C\)"),
        (np.zeros((2, 32, 32, 4), np.uint8), r"C = 1 or 3"),
        (np.full((2, 32, 32, 3), 2.0), r"expected \[0, 1\]"),
        (np.zeros((2, 32, 32, 3), np.int32), r"expected uint8 or floats"),
    ],
)
def test_bad_videos_name_what_is_allowed(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        psnr(bad, bad)


def test_ssim_needs_frames_at_least_as_large_as_its_window():
    small = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(small, small)
