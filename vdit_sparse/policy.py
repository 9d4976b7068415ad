"""Which method runs where: dense warm-up steps, dense first layers, per-layer overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from .params import Params


@dataclass(frozen=True)
class Policy:
    method: str
    params: Params
    cache: str = "none"
    # layer -> {"attention": name, or any canonical parameter}: a tuned table or hand overrides
    layers: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self):
        # per-layer overrides resolved once, not at every attention call
        resolved = {}
        for layer, override in self.layers.items():
            rest = {k: v for k, v in override.items() if k != "attention"}
            resolved[layer] = (override.get("attention", self.method), self.params.updated(**rest) if rest else self.params)
        object.__setattr__(self, "_resolved", resolved)

    def warmup_count(self, num_steps: int | None) -> int:
        w = self.params.warmup_steps
        if w >= 1 or w == 0:
            return int(w)
        if num_steps is None:
            raise ValueError(f"warmup_steps={w}: a fraction needs the number of steps, which this pipeline does not announce")
        return int(round(w * num_steps))

    def is_dense_layer(self, layer: int) -> bool:
        dl = self.params.dense_layers
        return layer < dl if isinstance(dl, int) else layer in dl

    def resolve(self, layer: int, step: int, num_steps: int | None) -> tuple[str, Params, str]:
        """(method, parameters, cache) for one call; warm-up steps and dense layers run plain dense."""
        if step < self.warmup_count(num_steps) or self.is_dense_layer(layer):
            return "dense", self.params, "none"
        method, params = self._resolved.get(layer, (self.method, self.params))
        return method, params, self.cache
