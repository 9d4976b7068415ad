"""The method interface: a method turns q, k and the call's context into a BlockPlan.

A method module declares everything the rest of the package needs to know about it, so that adding
one touches only its module and one line of the registry (methods/__init__.py):

- ``name``: what users pass as ``attention=``;
- ``Settings``: its typed settings (a subclass of ``vdit_sparse.settings.Settings``);
- ``summary``: one line for the CLI help;
- ``knobs``: for ``vdit-sparse tune``, each setting it may vary per layer and the values it tries
  by default (the first is the default knob);
- ``sparse``: whether it skips work at all (the benchmarks time every sparse method at each density).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..layout import VideoLayout
from ..plan import BlockPlan
from ..settings import Settings


@dataclass
class AttentionContext:
    """Where one self-attention call happens, from the transformer hook to the method.

    The hook fills in the transformer call (model, branch, step, num_steps, layout); the handle adds
    the layer and ``state``, the method's memory for this (branch, model, layer), which it owns
    (a one-off call gets a fresh one).
    """

    layout: VideoLayout
    layer: int = 0
    step: int = 0
    num_steps: int | None = None
    branch: str = "default"
    model: str = "transformer"
    state: dict[str, Any] = field(default_factory=dict)
    # (first, total): q, k hold the model's heads first, first + 1, ... of total (a Ulysses rank's
    # share); None: all of them. Methods that draw random numbers per head draw them for all heads.
    heads: tuple[int, int] | None = None


class Method:
    """Plans which blocks to compute. Subclasses set the class attributes above and implement ``plan``."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[Settings]] = Settings
    summary: ClassVar[str] = ""
    knobs: ClassVar[dict[str, tuple]] = {}
    sparse: ClassVar[bool] = True

    def plan(
        self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, settings: Settings, v: torch.Tensor | None = None
    ) -> tuple[BlockPlan | None, dict]:
        """q, k (B, H, N, D) in model order -> (plan, info). A ``None`` plan means: run dense.

        ``v`` is given when available, for methods that judge a pattern by its output error.
        A method may report ``info["segment_identity"]`` (B·H,) int64: ids that change when a
        head's segments come to mean other tokens (the tile-skip cache then drops that head's marks).

        ``info`` holds method-specific results (e.g. ``head_pattern`` for svg); ``density`` is
        filled in by the caller from the plan.
        """
        raise NotImplementedError
