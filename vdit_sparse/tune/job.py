"""One ``vdit-sparse tune`` command as data: what it was asked (checked, its run resolved once), and what its
calibration found. The command's helpers read these instead of the argparse namespace and a row of positional
arguments."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..generate import GenerateRequest
from ..runspec import RunSpec
from .calibrate import Candidate, Recorder
from .cost import CostModel
from .search import Option


@dataclass(frozen=True)
class TuneJob:
    """What one ``tune`` was asked: flags checked, prompts read, the cost model loaded, the run resolved once."""

    knob: str | None  # the setting varied per layer; None for tune --cache magcache
    values: tuple  # its candidate values
    target_psnr: float | None
    target_error: float | None
    out: Path  # the table; the report goes beside it
    cal_prompts: tuple[str, ...]
    holdout: tuple[str, ...]
    cost: CostModel
    base: GenerateRequest  # the run of the first calibration prompt; the others differ only in their prompt
    cfg: Any  # its resolved config (an OmegaConf DictConfig)
    spec: RunSpec  # its RunSpec: the method's settings, the tile-skip cache, the policy
    rounds: int = 3
    repeats: int = 3
    validate: bool = True
    layer_sensitivity: bool = False
    measure_candidates: bool = False  # every candidate's video error measured (tune/direct.py)
    sampled_steps: int = 3

    @property
    def attention(self) -> str:
        return self.spec.attention

    @property
    def cache(self) -> str:
        return self.spec.cache

    @property
    def steps(self) -> int:
        return int(self.cfg.model.steps)

    def requests(self, prompts) -> list[GenerateRequest]:
        return [replace(self.base, prompt=p) for p in prompts]


@dataclass
class Calibration:
    """What the calibration runs found, and the per-layer options the search chooses from."""

    cands: list[Candidate]
    recorder: Recorder
    references: list[np.ndarray]  # the dense frames of each calibration prompt
    steps_seen: set[int]
    dense_layers: set[int]
    sparse_share: float  # share of the steps after warm-up: the only ones a layer's setting changes
    options: dict[int, list[Option]]
    dense_total: float  # predicted attention cost of an all-dense run
    weights: dict[int, float] | None = field(default=None)  # --layer-sensitivity's per-layer weights

    @property
    def num_runs(self) -> int:
        return len(self.references)
