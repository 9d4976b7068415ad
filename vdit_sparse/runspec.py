"""A run, resolved once: ``resolve(...)`` turns a request into one frozen, typed :class:`RunSpec`.

A request comes as Python keywords (``accelerate(pipe, attention="svg", density=0.3)``), CLI flags and Hydra keys
(generate.py gathers them), a tuned table, and a model config's method defaults (its ``attention:`` section). They
are layered in that one place, lowest first: the method's defaults, the model config's, the request's settings; a
tuned table's per-layer entries override the run's for their layer. The spec then holds typed objects only: the
method's settings, the per-layer policy, the tile-skip cache, the step-level cache, the model and the shape.
``accelerate(pipe, spec)`` installs exactly that, and ``generate``, ``compare`` and ``tune`` build one per run and
hand it down, so nothing is resolved (or a tuned YAML parsed) twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .caches import StepCache, TileSkip, parse_cache, split_settings, step_cache_settings, tileskip_settings
from .config import TunedTable
from .methods import get_method
from .policy import Policy
from .settings import Settings


@dataclass(frozen=True)
class Shape:
    """The video a run makes; ``None``: the pipeline's (or the model config's) default."""

    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides what a run computes, typed and checked."""

    policy: Policy  # the method, its settings, the tile-skip cache, and per-layer rules (a tuned table's)
    step_cache: StepCache | None = None
    model: str | None = None  # None: built for a pipeline in hand (Python)
    shape: Shape = Shape()
    tuned: TunedTable | None = None  # the table the per-layer rules and the step cache's measured settings came from

    @property
    def attention(self) -> str:
        return self.policy.method

    @property
    def settings(self) -> Settings:
        return self.policy.settings

    @property
    def tileskip(self) -> TileSkip | None:
        return self.policy.tileskip

    @property
    def cache(self) -> str:
        return self.policy.cache


def resolve(attention: str = "dense", cache: str = "none", settings: dict | None = None, *, tuned=None,
            model: str | None = None, model_defaults: dict | None = None, shape: Shape = Shape()) -> RunSpec:
    """The :class:`RunSpec` of a request, every part checked (a bad one is a ``ValueError`` naming it).

    ``settings``: canonical names (``density``, ``threshold``, ``tileskip.block_size``, ``magcache.threshold``, or
    nested ``{"magcache": {...}}``); ``tuned``: a table's name or path, a dict in the file's shape, or a
    :class:`~vdit_sparse.config.TunedTable`, read once here; ``model_defaults``: a model config's ``attention:``
    section (``{METHOD: {...}, "tileskip": {...}}``), under the request's settings. MagCache gets ``shape.steps``
    as its step count unless the request gives one.
    """
    tileskip_on, step = parse_cache(cache)
    given = dict((model_defaults or {}).get(attention) or {})
    if tileskip_on:
        given.update((model_defaults or {}).get("tileskip") or {})
    given.update(settings or {})
    own, tile, caches = split_settings(given)
    method_settings = get_method(attention).Settings().updated(**own)
    tileskip = tileskip_settings(cache, tile)
    table = TunedTable.read(tuned) if tuned is not None else None
    where = "" if table is None or table.source == "dict" else f"tuned={table.source!r}: "
    if step == "magcache" and shape.steps is not None:
        caches.setdefault("magcache", {}).setdefault("num_inference_steps", shape.steps)
    step_cache = step_cache_settings(cache, caches, table.caches if table else None)
    try:
        policy = Policy.build(attention, method_settings, cache, table.layers if table else None, tileskip)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    return RunSpec(policy, step_cache, model, shape, table)
