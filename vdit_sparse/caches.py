"""What ``cache=`` may name: our tile-skip cache (inside attention) and diffusers' step-level caches.

``cache`` is ``none``, ``tileskip``, one step-level cache, or ``tileskip+<step cache>``. A step-level
cache skips whole blocks (or whole attention calls) at steps where their output barely changes; it
is diffusers' own hook (``transformer.enable_cache(config)``), configured here from typed settings
whose keys are namespaced by the cache (``magcache.threshold``, ``fbcache.threshold``), so they never
collide with the tile-skip ``threshold``.

A block that a step cache skips makes no attention call: our per-(branch, layer) counters, tile-skip
marks and k-means warm starts only ever see the calls that happened.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import ClassVar

from .registry import CACHES_GROUP, discover
from .settings import Checked, Settings, _is_number, count, flag, fraction, log2_bound, nonnegative, positive_int, setting

TILESKIP = "tileskip"


def optional_ratios(name, v):
    if v is not None and (not isinstance(v, tuple) or not v or not all(_is_number(x) and x > 0 for x in v)):
        raise ValueError(f"{name}={v!r}: must be a list of positive numbers (one per step), or null")


def optional_positive_int(name, v):
    if v is not None:
        positive_int(name, v)


def timestep_range(name, v):
    if not (isinstance(v, tuple) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] < v[1]):
        raise ValueError(f"{name}={v!r}: must be [low, high] timesteps, low < high")


def optional_block_size(name, v):
    if v is not None:
        positive_int(name, v)


@dataclass(frozen=True)
class TileSkip(Checked):
    """The tile-skip cache (vdit_sparse/tileskip.py): tiles found negligible at one step are not computed at later
    ones. Its knobs are its own, not a method's; ``threshold`` and ``refresh_every`` keep their canonical names
    (``--threshold``, ``accelerate(..., threshold=...)``, a tuned table's per-layer ``threshold``), and any field can
    be written ``tileskip.NAME`` (``tileskip.block_size=16``)."""

    name: ClassVar[str] = TILESKIP
    threshold: float = setting(
        -14.4, log2_bound,
        "a tile whose largest logit is more than this many log2 units below the row maximum is skipped at later steps "
        "(LiteAttention's unit; -14.4 = -10 in natural log)",
    )
    refresh_every: int = setting(5, positive_int, "calls of a (branch, layer) between full re-checks")
    block_size: int | None = setting(None, optional_block_size,
                                     "tokens per tile where the method plans nothing (dense); default: the method's block_size")

    def tile(self, settings: Settings) -> int:
        """Tokens per tile of the full plan that tile-skip starts from when the method plans nothing."""
        return self.block_size or settings.block_size


# The tile-skip knobs that keep their bare canonical names (block_size bare is the method's)
TILESKIP_KEYS = ("threshold", "refresh_every")


@dataclass(frozen=True)
class StepCache(Checked):
    """A step-level cache's settings; ``config(...)`` builds diffusers' config object from them."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # decides to skip from the activations it sees: under Ulysses each rank sees only its shard, so ranks could
    # disagree and one would wait forever in an all-to-all the others skipped
    data_dependent: ClassVar[bool] = False

    def label(self, name: str) -> str:
        return f"{self.name}.{name}"

    def config(self, pipe, adapter, num_steps: int | None):
        raise NotImplementedError


@dataclass(frozen=True)
class FBCache(StepCache):
    name = "fbcache"
    summary = "First-Block Cache: the rest of the blocks are skipped while the first block's residual barely changes"
    data_dependent = True
    threshold: float = setting(0.05, nonnegative, "relative change of the first block's residual below which the rest is skipped")

    def config(self, pipe, adapter, num_steps):
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


@dataclass(frozen=True)
class MagCache(StepCache):
    name = "magcache"
    summary = "MagCache: blocks skipped while the accumulated residual-magnitude error stays small (needs mag_ratios)"
    threshold: float = setting(0.06, nonnegative, "accumulated error below which the blocks are skipped")
    max_skip_steps: int = setting(3, count, "consecutive steps that may be skipped")
    retention_ratio: float = setting(0.2, fraction, "share of the first steps never skipped")
    mag_ratios: tuple | None = setting(None, optional_ratios, "the model's magnitude ratios, one per step (tune --cache magcache)")
    num_inference_steps: int | None = setting(None, optional_positive_int, "steps of the runs (default: the pipeline's)")
    calibrate: bool = setting(False, flag, "measure the ratios instead of skipping (tune --cache magcache does this)")

    def __post_init__(self):
        super().__post_init__()
        if self.mag_ratios is None and not self.calibrate:  # refused before any model work
            raise ValueError("magcache.mag_ratios: MagCache needs the model's ratios; measure them with "
                             "`vdit-sparse tune --cache magcache --out NAME` and pass --tuned NAME")

    def config(self, pipe, adapter, num_steps):
        from diffusers import MagCacheConfig

        steps = self.num_inference_steps or num_steps
        if steps is None:
            raise ValueError("magcache.num_inference_steps: the pipeline's step count is not known here; give it")
        return MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                              retention_ratio=self.retention_ratio, num_inference_steps=steps,
                              mag_ratios=None if self.mag_ratios is None else list(self.mag_ratios),
                              calibrate=self.calibrate)


@dataclass(frozen=True)
class TaylorSeer(StepCache):
    name = "taylorseer"
    summary = "TaylorSeer: self-attention outputs predicted by a Taylor expansion between full computations"
    cache_interval: int = setting(5, positive_int, "steps between full computations")
    disable_cache_before_step: int = setting(3, count, "first steps always computed")
    max_order: int = setting(1, positive_int, "order of the Taylor expansion")

    def config(self, pipe, adapter, num_steps):
        import torch
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval, disable_cache_before_step=self.disable_cache_before_step,
            max_order=self.max_order, taylor_factors_dtype=torch.float32,
            cache_identifiers=adapter.self_attention_patterns(),  # diffusers' defaults miss Wan's attn1
        )


@dataclass(frozen=True)
class PAB(StepCache):
    name = "pab"
    summary = "Pyramid Attention Broadcast: self-attention reused for some blocks in a middle range of timesteps"
    block_skip_range: int = setting(2, positive_int, "attention recomputed every this many calls of a block")
    timestep_skip_range: tuple = setting((100, 800), timestep_range, "timesteps (0-1000) in which reuse is allowed")

    def config(self, pipe, adapter, num_steps):
        from diffusers import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.block_skip_range,
            spatial_attention_timestep_skip_range=tuple(self.timestep_skip_range),
            spatial_attention_block_identifiers=adapter.self_attention_patterns(),
            current_timestep_callback=lambda: pipe.current_timestep,
        )


@dataclass(frozen=True)
class FasterCache(StepCache):
    name = "fastercache"
    summary = "FasterCache: attention reused across steps, the unconditional branch reused across steps (batched CFG)"
    block_skip_range: int = setting(2, positive_int, "attention recomputed every this many calls of a block")
    timestep_skip_range: tuple = setting((-1, 681), timestep_range, "timesteps in which attention reuse is allowed")
    attention_weight: float = setting(0.3, nonnegative, "weight of the cached attention's change")

    def config(self, pipe, adapter, num_steps):
        from diffusers import FasterCacheConfig

        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.block_skip_range,
            spatial_attention_timestep_skip_range=tuple(self.timestep_skip_range),
            spatial_attention_block_identifiers=adapter.self_attention_patterns(),
            attention_weight_callback=lambda _: self.attention_weight,
            current_timestep_callback=lambda: pipe.current_timestep,
            tensor_format=adapter.latents, is_guidance_distilled=False,
        )


@dataclass(frozen=True)
class SeaCache(StepCache):
    name = "seacache"
    summary = "SeaCache: the block stack replaced by a predicted residual while spectral indicators change little"
    data_dependent = True
    threshold: float = setting(0.25, nonnegative, "accumulated relative change below which the cached residual is used")
    retention_steps: int = setting(1, count, "first steps always computed")
    cache_end_steps: int = setting(1, count, "last steps always computed")
    max_consecutive_cached: int = setting(2, count, "cached steps in a row before a full one (0: no limit)")

    def config(self, pipe, adapter, num_steps):
        from diffusers import SeaCacheConfig

        return SeaCacheConfig(threshold=self.threshold, retention_steps=self.retention_steps,
                              cache_end_steps=self.cache_end_steps, max_consecutive_cached=self.max_consecutive_cached,
                              raw_vision_callback=adapter.output_latents)


BUILTIN = (FBCache, MagCache, TaylorSeer, FasterCache, PAB, SeaCache)


def step_caches() -> dict[str, type[StepCache]]:
    """``{name: StepCache subclass}``: the built-in step caches, then those other packages declare (entry point
    group vdit_sparse.caches, found once, on first use: registry.py)."""
    return discover(CACHES_GROUP, StepCache, BUILTIN)


def cache_names() -> tuple[str, ...]:
    """Every value ``cache=`` takes."""
    steps = step_caches()
    return ("none", TILESKIP, *steps, *(f"{TILESKIP}+{name}" for name in steps))


def __getattr__(name: str):  # STEP_CACHES and CACHES as module attributes, built on first use
    if name == "STEP_CACHES":
        return step_caches()
    if name == "CACHES":
        return cache_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_cache(cache: str) -> tuple[bool, str | None]:
    """(tile-skip on, step-level cache name or None) of a ``cache=`` value; a bad value is a named error."""
    if not isinstance(cache, str) or cache not in cache_names():
        names = ", ".join(["none", TILESKIP, *step_caches()])
        raise ValueError(f"cache={cache!r}: unknown cache; known caches are {names}, or tileskip+<one of the step caches>")
    parts = cache.split("+")
    step = [p for p in parts if p in step_caches()]
    return TILESKIP in parts, step[0] if step else None


def split_settings(settings: dict) -> tuple[dict, dict, dict[str, dict]]:
    """(method settings, tile-skip settings, step-cache settings by cache) of one flat request: ``threshold``,
    ``refresh_every``, ``tileskip.NAME`` and a nested ``{"tileskip": {...}}`` are the tile-skip cache's; a step cache's
    are namespaced (:func:`split_step_cache_settings`); the rest are the method's."""
    plain, caches = split_step_cache_settings(settings)
    return (*split_tileskip(plain), caches)


def split_tileskip(settings: dict) -> tuple[dict, dict]:
    """(the rest, tile-skip settings) of ``settings``: see :func:`split_settings`."""
    method, tile = {}, {}
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if key in TILESKIP_KEYS:
            tile[key] = value
        elif head == TILESKIP and dot:
            tile[rest] = value
        elif key == TILESKIP and isinstance(value, dict):
            tile.update(value)
        else:
            method[key] = value
    return method, tile


def tileskip_settings(cache: str, given: dict) -> TileSkip | None:
    """The tile-skip cache of ``cache`` with ``given`` settings, or None when ``cache`` runs none; tile-skip
    settings without it are an error: they would change nothing."""
    if not parse_cache(cache)[0]:
        if given:
            raise ValueError(f"{', '.join(given)}: a tile-skip setting, used only with cache='tileskip' (cache is {cache!r})")
        return None
    unknown = sorted(set(given) - set(TileSkip.names()))
    if unknown:
        raise ValueError(f"tileskip.{unknown[0]}: not a setting of the tile-skip cache; its settings are "
                         f"{', '.join(TileSkip.names())}")
    return TileSkip(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def split_step_cache_settings(settings: dict) -> tuple[dict, dict[str, dict]]:
    """Canonical settings and the namespaced ones: {"density": .., "magcache.threshold": ..} ->
    ({"density": ..}, {"magcache": {"threshold": ..}}); a nested {"magcache": {...}} is read the same way."""
    plain, caches = {}, {}
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if head in step_caches() and dot:
            caches.setdefault(head, {})[rest] = value
        elif key in step_caches() and isinstance(value, dict):
            caches.setdefault(key, {}).update(value)
        else:
            plain[key] = value
    return plain, caches


def step_cache_settings(cache: str, given: dict[str, dict], tuned: dict | None = None) -> StepCache | None:
    """The step-level cache of ``cache`` with its settings: defaults, then a tuned table's (e.g. calibrated
    mag_ratios), then ``given``. Settings for a cache that is not in use are an error."""
    _, name = parse_cache(cache)
    stray = sorted(set(given) - {name})
    if stray:
        raise ValueError(f"{stray[0]}.*: settings of a step cache that is not in use (cache is {cache!r})")
    if name is None:
        return None
    cls = step_caches()[name]
    values = {**(tuned or {}).get(name, {}), **given.get(name, {})}
    unknown = sorted(set(values) - set(cls.names()))
    if unknown:
        raise ValueError(f"{name}.{unknown[0]}: not a setting of cache {name!r}; its settings are "
                         f"{', '.join(f'{name}.{n}' for n in cls.names())}")
    return cls(**values)


def calibrate_mag_ratios(run) -> list[list[float]]:
    """Run ``run()`` (pipeline calls with MagCache in calibration mode) and return the ratios diffusers prints
    at the end of each trajectory, one list per trajectory (each guidance branch of each call)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run()
    found = re.findall(r"Calibration Complete[^\n]*\n\[([^\]]*)\]", printed.getvalue())
    return [[float(x) for x in block.split(",")] for block in found]
