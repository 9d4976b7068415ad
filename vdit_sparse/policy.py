"""Which method runs where: dense warm-up steps, dense layers, per-layer settings (a tuned table)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .methods import get_method
from .settings import Settings


@dataclass(frozen=True)
class Policy:
    method: str
    settings: Settings
    cache: str = "none"
    # layer -> (method, settings): a tuned table or hand overrides, resolved once
    layers: dict[int, tuple[str, Settings]] = field(default_factory=dict)
    tileskip: bool = field(init=False)  # whether ``cache`` runs tile-skip, parsed once

    def __post_init__(self):
        from .caches import parse_cache

        object.__setattr__(self, "tileskip", parse_cache(self.cache)[0])

    @classmethod
    def build(cls, method: str, settings: Settings, cache: str = "none", table: dict | None = None) -> "Policy":
        """A policy from a per-layer table ``{layer: {"attention": name?, setting: value, ...}}``.

        A layer's entry overrides the run's settings; with another ``attention`` it starts from that
        method's defaults and keeps the run's shared settings (warm-up, dense layers, tile-skip knobs).
        """
        layers = {}
        for layer, entry in (table or {}).items():
            if not isinstance(entry, dict):
                raise ValueError(f"tuned table: layer {layer} must map to a dict of settings, got {entry!r}")
            rest = {k: v for k, v in entry.items() if k != "attention"}
            name = entry.get("attention", method)
            try:
                if name == method:
                    layer_settings = settings.updated(**rest)
                else:
                    shared = {k: getattr(settings, k) for k in Settings.names()}
                    layer_settings = get_method(name).Settings(**shared).updated(**rest)
            except ValueError as e:
                raise ValueError(f"tuned table: layer {layer}: {e}") from None
            layers[int(layer)] = (get_method(name).name, layer_settings)
        return cls(method, settings, cache, layers)

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

    def resolve(self, layer: int, step: int, num_steps: int | None) -> tuple[str, Settings, bool]:
        """(method, settings, tile-skip on) for one call; warm-up steps and dense layers run plain dense. A layer's
        own settings (a tuned table's entry) decide its warm-up and whether it is a dense layer."""
        method, settings = self.layers.get(layer, (self.method, self.settings))
        if step < self.warmup_count(num_steps, settings) or self.is_dense_layer(layer, settings):
            return "dense", settings, False
        return method, settings, self.tileskip
