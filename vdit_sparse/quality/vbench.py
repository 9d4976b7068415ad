"""VBench-style quality dimensions computed from pixels alone (no network, no model).

VBench (Huang et al. 2024) scores these dimensions with pretrained networks (RAFT
optical flow, AMT frame interpolation, DINO and CLIP features). The proxies here keep
each dimension's formula and replace the network with a pixel statistic, so they run
anywhere, offline, in milliseconds; they rank videos the same way on the effects the
dimension names, but their values are not comparable with published VBench numbers.

Every function takes one video ``(T, H, W, C)``, uint8 or floats in [0, 1], and returns
a number in [0, 1]; all but ``dynamic_degree`` are "higher is better".
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import as_video

HIST_BINS = 8  # per colour channel: 512-bin joint histograms as a position-free appearance feature
LAYOUT_GRID = 4  # coarse 4 x 4 grid of mean colours as a scene-layout feature
TOP_MOTION_SHARE = 0.05  # VBench's dynamic degree averages the top 5% flow magnitudes


def _video(x) -> np.ndarray:
    return as_video(x).numpy()  # (T, H, W, C) float32 in [0, 1]


def _luma(v: np.ndarray) -> np.ndarray:
    if v.shape[-1] == 1:
        return v[..., 0]
    return v @ np.array([0.299, 0.587, 0.114], dtype=v.dtype)  # (T, H, W), ITU-R BT.601 weights


def temporal_flickering(video) -> float:
    """``1 - mean_t mean_{h,w,c} |x_{t+1} - x_t|`` on the [0, 1] scale (VBench's formula).

    VBench applies it to static scenes; on moving ones it also counts motion. 1 for a
    single frame or a still video.
    """
    v = _video(video)
    if v.shape[0] < 2:
        return 1.0
    return float(1.0 - np.abs(np.diff(v, axis=0)).mean())


def motion_smoothness(video) -> float:
    """``1 - mean_{t odd} mean |x_t - (x_{t-1} + x_{t+1}) / 2|``.

    VBench drops the odd frames, re-creates them with a frame-interpolation network and
    scores the reconstruction error; linear interpolation stands in for the network, so
    constant-velocity fades score 1 and jerky or flickering motion scores lower.
    """
    v = _video(video)
    if v.shape[0] < 3:
        return 1.0
    middle = np.arange(1, v.shape[0] - 1, 2)
    predicted = (v[middle - 1] + v[middle + 1]) / 2
    return float(1.0 - np.abs(v[middle] - predicted).mean())


def dynamic_degree(video) -> float:
    """Mean over frame pairs of the mean of the top 5% of ``|luma_{t+1} - luma_t|``.

    VBench averages the top 5% optical-flow magnitudes and thresholds them; the largest
    temporal luma changes stand in for flow. 0 for a still video, larger for more motion;
    neither end is "better".
    """
    y = _luma(_video(video))
    if y.shape[0] < 2:
        return 0.0
    change = np.abs(np.diff(y, axis=0)).reshape(y.shape[0] - 1, -1)  # (T-1, H*W)
    k = max(1, int(round(TOP_MOTION_SHARE * change.shape[1])))
    top = np.partition(change, change.shape[1] - k, axis=1)[:, -k:]
    return float(top.mean())


def _consistency(features: np.ndarray) -> float:
    """VBench's consistency: ``mean_{t>=1} (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2``; 1 for one frame."""
    if features.shape[0] < 2:
        return 1.0
    norms = np.linalg.norm(features, axis=1)
    f = features / np.where(norms > 0, norms, 1.0)[:, None]
    to_first = f[1:] @ f[0]
    to_previous = (f[1:] * f[:-1]).sum(axis=1)
    return float(((to_first + to_previous) / 2).mean())


def _colour_histograms(v: np.ndarray) -> np.ndarray:
    """Joint colour histogram of each frame, ``(T, HIST_BINS ** C)``; blind to where things are."""
    bins = np.minimum((v * HIST_BINS).astype(np.int64), HIST_BINS - 1)  # (T, H, W, C)
    index = np.zeros(bins.shape[:3], dtype=np.int64)
    for c in range(v.shape[-1]):
        index = index * HIST_BINS + bins[..., c]
    n = HIST_BINS ** v.shape[-1]
    return np.stack([np.bincount(frame.ravel(), minlength=n) for frame in index]).astype(np.float64)


def _layout(v: np.ndarray) -> np.ndarray:
    """Mean colour of each cell of a coarse grid, ``(T, LAYOUT_GRID ** 2 * C)``; blind to detail."""
    t = torch.from_numpy(v).permute(0, 3, 1, 2)  # (T, C, H, W)
    cells = torch.nn.functional.adaptive_avg_pool2d(t, LAYOUT_GRID)  # (T, C, g, g)
    return cells.reshape(v.shape[0], -1).numpy()


def subject_consistency(video) -> float:
    """Consistency of frame appearance: :func:`_consistency` of ``sqrt`` joint colour histograms.

    The cosine of square-rooted histograms is their Bhattacharyya coefficient
    ``sum_i sqrt(p_i q_i)``; the square root keeps a small subject from being drowned by
    a large background. VBench uses DINO features, which keep an object's identity
    wherever it moves; a colour histogram is likewise unchanged by motion and changes
    when the subject's colours or size change. A crude proxy: it cannot see shape.
    """
    return _consistency(np.sqrt(_colour_histograms(_video(video))))


def background_consistency(video) -> float:
    """Consistency of the scene layout: :func:`_consistency` of 4 x 4 grids of mean colour.

    VBench uses CLIP image features; the coarse grid keeps the low-frequency scene (what
    the background decides) and drops fine detail, so small moving objects barely change it.
    """
    return _consistency(_layout(_video(video)))


DIMENSIONS = {
    "subject_consistency": subject_consistency,
    "background_consistency": background_consistency,
    "temporal_flickering": temporal_flickering,
    "motion_smoothness": motion_smoothness,
    "dynamic_degree": dynamic_degree,
}


def vbench_proxies(video) -> dict[str, float]:
    """All dimensions of :data:`DIMENSIONS` for one video."""
    v = _video(video)  # convert once: the functions accept the float frames as they are
    return {name: fn(v) for name, fn in DIMENSIONS.items()}
