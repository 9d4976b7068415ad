"""Canonical parameter names, their defaults and the values they allow.

The same names are Python keyword arguments, CLI flags (``--top-p`` for ``top_p``) and Hydra keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


def _fraction(name, v, low_open=True):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v <= 1 if low_open else 0 <= v <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={v!r}: must be a number in {interval}")


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r}: must be a positive integer")


@dataclass(frozen=True)
class Params:
    """Every tunable knob. ``None`` means "the method's own default"."""

    # budget
    density: float | None = None  # fraction of the attention matrix to compute, in (0, 1]
    top_p: float = 0.9  # svg2: share of estimated attention mass each query cluster keeps
    min_k_ratio: float = 0.0  # svg2: floor on the share of key clusters each query cluster keeps
    # svg
    num_sampled_rows: int = 64  # query rows profiled per head to classify it
    first_frame_sink: bool = True  # svg: every query also attends to the first frame
    dense_error: float | None = None  # svg: a head whose best pattern errs more than this runs dense
    # svg2
    num_q_clusters: int = 100
    num_k_clusters: int = 500
    kmeans_iters_first: int = 50
    kmeans_iters_step: int = 2
    # kernel
    block_size: int = 64  # tokens per block for positional (band) patterns
    # policy
    warmup_steps: float = 0  # first steps dense: a count, or a fraction of the steps when < 1
    dense_layers: Any = 0  # a count from the first layer, or a list of layer indices
    # tile-skip cache
    threshold: float = -10.0  # log-space bound below the row maximum that makes a tile negligible
    refresh_every: int = 5  # steps between full re-checks of skipped tiles

    def __post_init__(self):
        if self.density is not None:
            _fraction("density", self.density)
        _fraction("top_p", self.top_p)
        _fraction("min_k_ratio", self.min_k_ratio, low_open=False)
        for name in ("num_sampled_rows", "num_q_clusters", "num_k_clusters", "kmeans_iters_first", "block_size", "refresh_every"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.kmeans_iters_step, int) or self.kmeans_iters_step < 0:
            raise ValueError(f"kmeans_iters_step={self.kmeans_iters_step!r}: must be an integer >= 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, (int, float)) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: must be a count >= 0, or a fraction of the steps in [0, 1)")
        if isinstance(self.warmup_steps, float) and self.warmup_steps >= 1 and not self.warmup_steps.is_integer():
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: a value >= 1 is a count and must be whole")
        dl = self.dense_layers
        if isinstance(dl, bool) or not (
            (isinstance(dl, int) and dl >= 0) or (isinstance(dl, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in dl))
        ):
            raise ValueError(f"dense_layers={dl!r}: must be a count >= 0 or a list of layer indices")
        if not isinstance(self.threshold, (int, float)) or self.threshold > 0:
            raise ValueError(f"threshold={self.threshold!r}: must be a log-space bound <= 0 (e.g. -10 safe, -3 fast)")
        if self.dense_error is not None and (not isinstance(self.dense_error, (int, float)) or self.dense_error <= 0):
            raise ValueError(f"dense_error={self.dense_error!r}: must be a positive number or None")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def updated(self, **overrides: Any) -> "Params":
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown parameter {', '.join(unknown)}: known parameters are {', '.join(self.names())}")
        return replace(self, **{k: _coerce(v) for k, v in overrides.items()})


def _coerce(v):
    # Hydra/OmegaConf hands over ListConfig; keep plain Python values
    if hasattr(v, "_content") or type(v).__name__ == "ListConfig":
        return list(v)
    return v
