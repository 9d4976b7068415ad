"""Every quality number for one video against its reference, as one plain dict."""

from __future__ import annotations

import importlib
import math

import numpy as np

from .perceptual import lpips as lpips_metric
from .metrics import as_pair, mean_psnr, psnr_per_frame, ssim_per_frame
from .vbench import vbench_proxies


def _to_uint8(video) -> np.ndarray:
    """Decoded frames as a viewer sees them: ``round(255 * x)`` for floats, uint8 unchanged."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        return video
    from .metrics import as_video

    return (as_video(video).numpy() * 255.0 + 0.5).astype(np.uint8)


def _fidelity(a, b) -> tuple[float, float, list[float], list[float]]:
    ta, tb = as_pair(a, b)
    per_psnr = psnr_per_frame(ta, tb)
    per_ssim = ssim_per_frame(ta, tb)
    return mean_psnr(per_psnr, tuple(ta.shape[1:])), float(per_ssim.mean()), per_psnr.tolist(), per_ssim.tolist()


def prompt_following_scores(video_uint8: np.ndarray, prompt: str) -> dict | None:
    """Scores from ``vdit_sparse.quality.prompt_following`` when that module exists, else None.

    That module (the embedded procedural-shapes model's own checks of colour, motion and
    count, from pixels) provides
    ``prompt_following(frames_uint8: np.ndarray (T, H, W, 3), prompt: str) -> dict[str, float | None]``;
    bools (``colour_ok``) and labels (``detected_colour``) are passed through as they are.
    """
    name = f"{__package__}.prompt_following"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise  # the module exists but one of its own imports is missing: a real bug
        return None
    return dict(module.prompt_following(video_uint8, prompt))


def compare_videos(a, b, *, a_float=None, b_float=None, prompt: str | None = None, lpips: bool = True) -> dict:
    """Compare ``b`` (the video under test) with the reference ``a``; both ``(T, H, W, C)``.

    ``a`` and ``b`` are uint8 frames or floats in [0, 1]; floats are rounded to uint8
    for the headline numbers, which measure what users see. ``a_float`` / ``b_float``,
    when given, are the undecoded float frames, scored separately as ``*_float``.

    Returns (strict-JSON-ready: an identical video's PSNR is None with ``identical`` True, an identical
    frame's per-frame PSNR None):
      psnr, ssim, psnr_per_frame, ssim_per_frame  on uint8 frames; identical: every uint8 frame equal
      psnr_float, ssim_float                      on float frames (= uint8 values when none given)
      lpips (None when unavailable), lpips_unavailable (the reason, or None)
      vbench, vbench_reference                    :func:`vbench_proxies` of b and of a
      prompt_following, prompt_following_reference  only with ``prompt`` and the module present
    """
    a8, b8 = _to_uint8(a), _to_uint8(b)
    as_pair(a8, b8)  # shape check first, with the clear message
    out: dict = {}
    out["psnr"], out["ssim"], out["psnr_per_frame"], out["ssim_per_frame"] = _fidelity(a8, b8)
    out["identical"] = math.isinf(out["psnr"])
    if a_float is not None or b_float is not None:
        fa = a_float if a_float is not None else a
        fb = b_float if b_float is not None else b
        out["psnr_float"], out["ssim_float"], _, _ = _fidelity(fa, fb)
    else:
        out["psnr_float"], out["ssim_float"] = out["psnr"], out["ssim"]
    for key in ("psnr", "psnr_float"):
        out[key] = None if math.isinf(out[key]) else out[key]
    out["psnr_per_frame"] = [None if math.isinf(v) else v for v in out["psnr_per_frame"]]
    if lpips:
        result = lpips_metric(a8, b8)
        out["lpips"], out["lpips_unavailable"] = result.value, result.reason
    else:
        out["lpips"], out["lpips_unavailable"] = None, "not requested"
    out["vbench"], out["vbench_reference"] = vbench_proxies(b8), vbench_proxies(a8)
    if prompt is not None:
        scores = prompt_following_scores(b8, prompt)
        if scores is not None:
            out["prompt_following"] = scores
            out["prompt_following_reference"] = prompt_following_scores(a8, prompt)
    return out
