"""LPIPS (Zhang et al. 2018) through torchmetrics, only when it can run offline.

``LPIPS(a, b) = sum_l mean_{h,w} || w_l * (phi_l(a) - phi_l(b)) ||^2`` over the
unit-normalised activations ``phi_l`` of a pretrained backbone (AlexNet by default)
and learned per-channel weights ``w_l``; lower is closer, 0 for identical frames.
The backbone weights come from torchvision's hub cache and are never downloaded here:
when anything is missing or fails, the result says why instead of raising.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import as_pair

_BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
DEFAULT_TIMEOUT_S = 120.0
FRAMES_PER_BATCH = 8  # bounds memory on long, large videos


@dataclass(frozen=True)
class LpipsResult:
    """``value``: mean over frames, or None with ``reason`` saying why it is unavailable."""

    value: float | None
    per_frame: list[float] | None = None
    reason: str | None = None


def backbone_weight_file(net: str = "alex") -> Path:
    """The file torchvision would load the backbone from: ``<torch hub dir>/checkpoints/<name>``.

    Raises ModuleNotFoundError without torchvision, KeyError for an unknown ``net``.
    """
    import torchvision.models

    url = getattr(torchvision.models, _BACKBONE_WEIGHTS[net]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def unavailable_reason(net: str = "alex") -> str | None:
    """Why LPIPS cannot run offline, or None when everything it needs is on disk."""
    if net not in _BACKBONE_WEIGHTS:
        return f"net={net!r}: unknown LPIPS backbone; known: {', '.join(_BACKBONE_WEIGHTS)}"
    try:
        weights = backbone_weight_file(net)
    except ModuleNotFoundError as e:
        return f"{e.name} is not installed; LPIPS needs its pretrained backbone"
    except Exception as e:  # a torchvision without these names, etc.
        return f"cannot locate the {net} backbone weights: {type(e).__name__}: {e}"
    if not weights.is_file():
        return f"backbone weights {weights} are not on disk (not downloaded: LPIPS runs offline only)"
    return None


@functools.lru_cache(maxsize=2)
def _load_metric(net: str):
    """The torchmetrics LPIPS module, built from local files only (one per backbone per process)."""
    # no download can start here: torchvision loads from the hub cache when the file
    # exists (checked by unavailable_reason), and torchmetrics ships the LPIPS head weights
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=False).eval()


def _per_frame_scores(ta: torch.Tensor, tb: torch.Tensor, net: str) -> list[float]:
    metric = _load_metric(net)
    scores = []
    with torch.no_grad():
        for i in range(0, ta.shape[0], FRAMES_PER_BATCH):
            # LPIPS was trained on [-1, 1] inputs: feeding [0, 1] is a known pitfall
            xa = ta[i : i + FRAMES_PER_BATCH].permute(0, 3, 1, 2).float() * 2 - 1  # (t, C, H, W)
            xb = tb[i : i + FRAMES_PER_BATCH].permute(0, 3, 1, 2).float() * 2 - 1
            if xa.shape[1] == 1:
                xa, xb = xa.expand(-1, 3, -1, -1), xb.expand(-1, 3, -1, -1)
            scores.extend(metric(xb, xa).reshape(-1).tolist())
    return scores


def lpips(a, b, net: str = "alex", timeout_s: float = DEFAULT_TIMEOUT_S) -> LpipsResult:
    """LPIPS between two videos ``(T, H, W, C)`` (uint8 or floats in [0, 1]), averaged over frames.

    Never raises for a missing dependency, missing weights, a failure inside the
    backbone, or a run longer than ``timeout_s``: those return ``value=None`` and a reason.
    Mismatched videos are still an error (that is the caller's bug, not an environment gap).
    """
    ta, tb = as_pair(a, b)
    reason = unavailable_reason(net)
    if reason is not None:
        return LpipsResult(None, reason=reason)
    box: dict = {}

    def work():
        try:
            box["scores"] = _per_frame_scores(ta, tb, net)
        except BaseException as e:  # anything at all: LPIPS is optional
            box["error"] = f"{type(e).__name__}: {e}"

    # a daemon thread so that a hung load cannot keep the process alive
    thread = threading.Thread(target=work, name="vdit-sparse-lpips", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return LpipsResult(None, reason=f"LPIPS did not finish within {timeout_s:g} s")
    if "error" in box:
        return LpipsResult(None, reason=f"LPIPS failed: {box['error']}")
    scores = box["scores"]
    return LpipsResult(float(np.mean(scores)), per_frame=scores)
