"""The method interface: a method turns q, k and the call's context into a BlockPlan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..layout import VideoLayout
from ..params import Params
from ..plan import BlockPlan


@dataclass
class AttentionContext:
    """Where one self-attention call happens. ``state`` is the method's memory for this
    (branch, layer), owned by the accelerate handle (or fresh for a one-off call)."""

    layout: VideoLayout
    layer: int = 0
    step: int = 0
    num_steps: int | None = None
    branch: str = "default"
    state: dict[str, Any] = field(default_factory=dict)


class Method:
    """Plans which blocks to compute. Subclasses set ``name`` and implement ``plan``."""

    name: ClassVar[str] = ""

    def plan(
        self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, params: Params, v: torch.Tensor | None = None
    ) -> tuple[BlockPlan | None, dict]:
        """q, k (B, H, N, D) in model order -> (plan, info). A ``None`` plan means: run dense.

        ``v`` is given when available, for methods that judge a pattern by its output error.
        A method may report ``info["segment_identity"]`` (B·H,) int64: ids that change when a
        head's segments come to mean other tokens (the tile-skip cache then drops that head's marks).

        ``info`` holds method-specific results (e.g. ``head_pattern`` for svg); ``density`` is
        filled in by the caller from the plan.
        """
        raise NotImplementedError
