"""What one self-attention call costs, predicted for the tuner: measured on a GPU, or proportional.

A measured model is a JSON file written by ``vdit-sparse bench --cost-model`` (vdit_sparse/bench/cost_model.py) on the target GPU::

    {"format": "vdit-sparse cost model 1", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", ...,
     "shapes": [{"name": "wan-1.3b-480p", "groups": 12, "tokens": 32760, "head_dim": 128, "block_size": 64,
                 "dense_ms": 11.3, "planning_ms": {"svg": 0.4, "svg2": 1.9},
                 "kernel": [{"density": 0.05, "blocks": 13104, "ms": 0.9, "ms_per_block": 6.9e-5}, ...]}]}

``groups`` is batch × heads of the measured call. The kernel's cost is not proportional to density:
launch overhead and a lower throughput on sparse rows make a computed block dearer at low density,
which is why it is stored per density band as milliseconds per computed block. A call of another
shape is predicted from the nearest measured shape, scaled by its work (groups × tokens² × head dim;
planning by groups × tokens).

Without a measurement the model is proportional: a call costs its density, dense costs 1.0 (the
unit is "one dense call"), and every output says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FORMAT = "vdit-sparse cost model 1"
FALLBACK = "proportional fallback, no GPU measurement"


@dataclass(frozen=True)
class CallShape:
    """The shape of one self-attention call: batch × heads, tokens, head dim."""

    groups: int
    tokens: int
    head_dim: int

    def work(self) -> float:
        return float(self.groups) * self.tokens**2 * self.head_dim


@dataclass(frozen=True)
class CostModel:
    """``ms(method, density, shape)``: predicted attention time of one call (``unit`` says in what)."""

    source: str  # where the numbers come from, written into the YAML and the report
    shapes: tuple = ()  # measured shapes (dicts as in the JSON); empty for the proportional model

    @property
    def measured(self) -> bool:
        return bool(self.shapes)

    @property
    def unit(self) -> str:
        return "ms" if self.measured else "dense calls"

    def ms(self, method: str, density: float, shape: CallShape) -> float:
        if not self.measured:
            return 1.0 if method == "dense" else float(density)
        ref = self._nearest(shape)
        scale = shape.work() / CallShape(ref["groups"], ref["tokens"], ref["head_dim"]).work()
        if method == "dense":
            return ref["dense_ms"] * scale
        plan_scale = shape.groups * shape.tokens / (ref["groups"] * ref["tokens"])
        planning = ref.get("planning_ms", {}).get(method, 0.0) * plan_scale
        blocks = density * _total_blocks(ref)
        return (blocks * _per_block(ref["kernel"], density)) * scale + planning

    def _nearest(self, shape: CallShape) -> dict:
        def distance(ref):
            return abs(math.log(ref["tokens"] / shape.tokens)) + 0.5 * abs(math.log(ref["head_dim"] / shape.head_dim))

        return min(self.shapes, key=distance)


def _total_blocks(ref: dict) -> float:
    nb = -(-ref["tokens"] // ref["block_size"])
    return float(ref["groups"] * nb * nb)


def _per_block(points: list[dict], density: float) -> float:
    """ms per computed block at ``density``: linear between measured densities, flat outside them."""
    pts = sorted((p["density"], p["ms_per_block"]) for p in points)
    if density <= pts[0][0]:
        return pts[0][1]
    for (d0, m0), (d1, m1) in zip(pts, pts[1:]):
        if density <= d1:
            return m0 + (m1 - m0) * (density - d0) / (d1 - d0)
    return pts[-1][1]


def proportional() -> CostModel:
    return CostModel(source=FALLBACK)


def load_cost_model(path: str | Path | None) -> CostModel:
    """The measured model at ``path`` (or at the default location when ``path`` is None and it exists),
    else the proportional fallback."""
    if path is None:
        from ..config import config_dir

        path = config_dir() / "cost_model.json"
        if not path.is_file():
            return proportional()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--cost-model {str(path)!r}: no such file; write one on the GPU with vdit-sparse bench --cost-model --out PATH")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shapes = tuple(data["shapes"])
        for s in shapes:
            _check_shape(s)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--cost-model {str(path)!r}: not a {FORMAT!r} file ({e})") from None
    if data.get("format") != FORMAT or not shapes:
        raise UserError(f"--cost-model {str(path)!r}: expected format {FORMAT!r} with at least one shape")
    return CostModel(source=f"measured: {path} ({data.get('device', 'unknown device')}, {data.get('dtype', '?')})", shapes=shapes)


def _check_shape(s: dict) -> None:
    for key in ("groups", "tokens", "head_dim", "block_size", "dense_ms", "kernel"):
        if key not in s:
            raise KeyError(f"shape {s.get('name', '?')!r} lacks {key!r}")
    if not s["kernel"] or any(p["ms_per_block"] <= 0 or not 0 < p["density"] <= 1 for p in s["kernel"]):
        raise ValueError(f"shape {s.get('name', '?')!r}: kernel points need density in (0, 1] and ms_per_block > 0")
