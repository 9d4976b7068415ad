"""Full-reference fidelity of a video against a reference: per-frame PSNR and SSIM.

Both take two videos of the same shape ``(T, H, W, C)``, either decoded ``uint8``
frames (what users see) or floats in ``[0, 1]`` (numpy arrays or torch tensors), and
compare them frame by frame on the ``[0, 1]`` scale (uint8 is divided by 255), so a
uint8 video and its float twin give the same numbers up to quantisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SSIM_SIGMA = 1.5  # Gaussian window of Wang et al. 2004: sigma 1.5, 11 x 11 taps
SSIM_WINDOW = 11
SSIM_FRAMES_PER_BATCH = 8  # bounds the float64 working memory on long, large videos


def as_video(x, name: str = "video") -> torch.Tensor:
    """Return ``x`` as a float32 tensor ``(T, H, W, C)`` in ``[0, 1]`` (sums run in float64).

    Accepts uint8 (divided by 255) or floating point values in ``[0, 1]``; anything
    else is an error naming ``name``.
    """
    if isinstance(x, np.ndarray):
        # torch refuses to share read-only memory (a memory-mapped run): copy those
        x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x)
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: got {type(x).__name__}; expected a numpy array or torch tensor (T, H, W, C)")
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: shape {tuple(t.shape)}; expected (T, H, W, C) with C = 1 or 3")
    if t.dtype == torch.uint8:
        return t.detach().cpu().to(torch.float32) / 255.0
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: dtype {t.dtype}; expected uint8 or floats in [0, 1]")
    t = t.detach().cpu().to(torch.float32)
    if t.numel() and (not torch.isfinite(t).all() or t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(f"{name}: float values span [{t.min().item():.4g}, {t.max().item():.4g}]; expected [0, 1]")
    return t.clamp(0, 1)


def as_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Both videos as float32 ``(T, H, W, C)`` in ``[0, 1]``; mismatched shapes are an error."""
    ta, tb = as_video(a, "video a"), as_video(b, "video b")
    if ta.shape != tb.shape:
        raise ValueError(
            f"videos differ in shape: a is {tuple(ta.shape)}, b is {tuple(tb.shape)}; "
            "both must be (T, H, W, C) with the same T, H, W and C"
        )
    if ta.shape[0] == 0:
        raise ValueError("videos have 0 frames; expected at least 1")
    return ta, tb


def psnr_per_frame(a, b) -> np.ndarray:
    """PSNR of each frame in dB: ``10 * log10(1 / MSE_t)``, ``MSE_t = mean_{h,w,c} (a - b)^2``.

    On the [0, 1] scale the peak is 1, which for uint8 is ``20 * log10(255 / RMSE_255)``.
    An identical frame (MSE 0) is ``+inf``, returned without a division warning.
    """
    ta, tb = as_pair(a, b)
    mse = ((ta - tb) ** 2).mean(dim=(1, 2, 3), dtype=torch.float64).numpy()  # (T,)
    out = np.full(mse.shape, math.inf)
    nonzero = mse > 0
    out[nonzero] = -10.0 * np.log10(mse[nonzero])
    return out


def identical_frame_psnr(height: int, width: int, channels: int) -> float:
    """PSNR a frame would have if one value differed by one uint8 step: ``10 * log10(255^2 * H * W * C)``.

    The smallest visible difference, used as the score of an identical frame inside a mean.
    """
    return 10.0 * math.log10(255.0**2 * height * width * channels)


def mean_psnr(per_frame: np.ndarray, frame_shape: tuple[int, int, int]) -> float:
    """Mean over frames of per-frame PSNR; ``+inf`` only when every frame is identical.

    An identical frame counts as :func:`identical_frame_psnr`, so one frame that happens
    to match (e.g. a shared first frame) cannot turn the mean of a differing video infinite.
    """
    per_frame = np.asarray(per_frame, dtype=np.float64)
    if np.isinf(per_frame).all():
        return math.inf
    capped = np.where(np.isinf(per_frame), identical_frame_psnr(*frame_shape), per_frame)
    return float(capped.mean())


def psnr(a, b) -> float:
    """Video PSNR in dB: :func:`mean_psnr` of :func:`psnr_per_frame`; ``inf`` for identical videos."""
    ta, tb = as_pair(a, b)
    return mean_psnr(psnr_per_frame(ta, tb), tuple(ta.shape[1:]))


def _gaussian_taps() -> torch.Tensor:
    """The normalised 1-D Gaussian of the SSIM window (float64); the 2-D window is its outer product."""
    d = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-0.5 * (d / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _window_matrix(n: int, taps: torch.Tensor) -> torch.Tensor:
    """(n + k - 1, n): column j holds the taps at rows j..j+k-1, so ``x @ M`` filters a padded last axis."""
    k = taps.numel()
    m = torch.zeros(n + k - 1, n, dtype=torch.float64)
    for j in range(n):
        m[j : j + k, j] = taps
    return m


def ssim_per_frame(a, b) -> np.ndarray:
    """SSIM of each frame (Wang et al. 2004) with a Gaussian window (sigma 1.5, 11 taps).

    ``SSIM = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2))``
    with local statistics under the window, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``,
    ``L = 1``; borders are reflect-padded and the map is averaged over pixels and channels
    (the definition torchmetrics implements; tests check the two agree). The window is separable,
    so it is applied as two banded matrix products per axis in float64 (in float32,
    E[x^2] - mu^2 of a flat region can come out negative and pull the SSIM of identical frames
    below 1): about 45x faster on a CPU than a 2-D float64 convolution (BENCHMARKS.md).
    """
    import torch.nn.functional as F

    ta, tb = as_pair(a, b)
    T, H, W = ta.shape[:3]
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"frames are {H}x{W}; SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    taps, pad = _gaussian_taps(), SSIM_WINDOW // 2
    along_w, along_h = _window_matrix(W, taps), _window_matrix(H, taps).T.contiguous()
    c1, c2 = 0.01**2, 0.03**2

    def window_mean(x):  # (t, C, H + 2 pad, W + 2 pad) -> (t, C, H, W)
        return along_h @ (x @ along_w)

    values = []
    for i in range(0, T, SSIM_FRAMES_PER_BATCH):
        # (t, H, W, C) -> (t, C, H, W), reflect-padded, float64
        xa, xb = (F.pad(x[i : i + SSIM_FRAMES_PER_BATCH].permute(0, 3, 1, 2).double(), (pad,) * 4, mode="reflect")
                  for x in (ta, tb))
        mu_a, mu_b = window_mean(xa), window_mean(xb)
        var_a = (window_mean(xa * xa) - mu_a**2).clamp(min=0)
        var_b = (window_mean(xb * xb) - mu_b**2).clamp(min=0)
        cov = window_mean(xa * xb) - mu_a * mu_b
        index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        values.append(index.flatten(1).mean(1))
    return torch.cat(values).numpy()  # (T,) float64


def ssim(a, b) -> float:
    """Video SSIM: the mean over frames of :func:`ssim_per_frame`; 1 for identical videos."""
    return float(ssim_per_frame(a, b).mean())
