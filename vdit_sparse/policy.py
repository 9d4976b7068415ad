"""Which method runs where: dense warm-up steps, dense layers, per-layer settings (a tuned table)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .caches import TileSkip, parse_cache, split_tileskip, tileskip_settings
from .methods import get_method
from .settings import Settings


@dataclass(frozen=True)
class Policy:
    method: str
    settings: Settings
    cache: str = "none"
    # layer -> (method, settings, tile-skip cache or None): a tuned table or hand overrides, resolved once
    layers: dict[int, tuple] = field(default_factory=dict)
    tileskip: TileSkip | None = None  # the run's tile-skip cache; the default one when ``cache`` runs tile-skip

    def __post_init__(self):
        on = parse_cache(self.cache)[0]
        if on and self.tileskip is None:
            object.__setattr__(self, "tileskip", TileSkip())
        elif not on and self.tileskip is not None:
            raise ValueError(f"tileskip: a tile-skip cache given, but cache={self.cache!r} runs none")

    @classmethod
    def build(cls, method: str, settings: Settings, cache: str = "none", table: dict | None = None,
              tileskip=None) -> "Policy":
        """A policy from a per-layer table ``{layer: {"attention": name?, setting: value, ...}}``.

        A layer's entry overrides the run's settings; with another ``attention`` it starts from that
        method's defaults and keeps the run's shared settings (warm-up, dense layers, block size). Its
        tile-skip knobs (``threshold``, ``refresh_every``) override the run's tile-skip cache for that layer.
        """
        run = cls(method, settings, cache, {}, tileskip)
        layers = {}
        for layer, entry in (table or {}).items():
            if not isinstance(entry, dict):
                raise ValueError(f"tuned table: layer {layer} must map to a dict of settings, got {entry!r}")
            try:
                layers[int(layer)] = run._layer_rule(entry)
            except ValueError as e:
                raise ValueError(f"tuned table: layer {layer}: {e}") from None
        return replace(run, layers=layers)

    def _layer_rule(self, entry: dict) -> tuple:
        own, tile = split_tileskip({k: v for k, v in entry.items() if k != "attention"})
        name = entry.get("attention", self.method)
        if name == self.method:
            layer_settings = self.settings.updated(**own)
        else:
            shared = {k: getattr(self.settings, k) for k in Settings.names()}
            layer_settings = get_method(name).Settings(**shared).updated(**own)
        tileskip = self.tileskip
        if tile:
            tileskip_settings(self.cache, tile)  # refused without the cache, checked as its settings
            tileskip = replace(tileskip, **tile)
        return get_method(name).name, layer_settings, tileskip

    def warmup_count(self, num_steps: int | None, settings: Settings | None = None) -> int:
        """Dense warm-up steps of ``settings`` (a layer's own; default the run's)."""
        w = (settings or self.settings).warmup_steps
        if w >= 1 or w == 0:
            return int(w)
        if num_steps is None:
            raise ValueError(f"warmup_steps={w}: a fraction needs the number of steps, which this pipeline does not announce")
        return int(round(w * num_steps))

    def is_dense_layer(self, layer: int, settings: Settings | None = None) -> bool:
        dl = (settings or self.settings).dense_layers
        return layer < dl if isinstance(dl, int) else layer in dl

    def resolve(self, layer: int, step: int, num_steps: int | None) -> tuple:
        """(method, settings, tile-skip cache or None) for one call; warm-up steps and dense layers run plain dense.
        A layer's own settings (a tuned table's entry) decide its warm-up and whether it is a dense layer."""
        method, settings, tileskip = self.layers.get(layer, (self.method, self.settings, self.tileskip))
        if step < self.warmup_count(num_steps, settings) or self.is_dense_layer(layer, settings):
            return "dense", settings, None
        return method, settings, tileskip
