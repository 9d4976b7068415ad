"""Calibration for ``vdit-sparse tune``: per layer, the attention error of each candidate setting.

A dense run of the pipeline is recorded; at sampled steps every self-attention call's q, k, v are
handed to each candidate setting (run_method, exactly what a tuned run would compute) and its
output is compared with the dense output of the same call: relative L2 error ‖o − o_dense‖/‖o_dense‖
and realised density. Nothing is stored but those numbers, so memory stays that of one call.

How the calls are seen: ``accelerate(pipe, attention="dense")`` installs our processors, and the
recorder is an observer of the handle (``handle.observe``), which sees every call's q, k, v and
dense output: the run stays the dense run, bit for bit, and its frames are the reference video.

Errors are measured on the dense trajectory: the error one call would make, not the error that
accumulates over a sparse run (the end-to-end PSNR check in ``tune`` measures that). The tile-skip
cache is the exception: its marks carry from step to step, so with the threshold knob every step
after warm-up is observed, each candidate with its own cache state.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from ..attention import run_method
from ..caches import TileSkip, parse_cache
from ..methods import METHODS, AttentionContext
from ..settings import Settings
from .cost import CallShape

# The tile-skip cache's knob (log2 units); each method declares its own knobs (Method.knobs).
TILESKIP_KNOB = ("threshold", (-20.0, -14.4, -11.5, -8.7, -5.8, -4.3, -2.9, -1.4))


def knobs_of(attention: str, cache: str) -> dict[str, tuple]:
    """The knobs tune may vary for this method and cache, with their default values; the first is the default."""
    if parse_cache(cache)[0]:
        return dict([TILESKIP_KNOB])
    return dict(METHODS[attention].knobs)


@dataclass(frozen=True)
class Candidate:
    """One setting a layer may get: what the tuned table says, and how calibration runs it."""

    setting: dict  # the layer's entry in the tuned table, e.g. {"density": 0.2} or {"attention": "dense"}
    method: str
    params: Settings
    tileskip: TileSkip | None  # the tile-skip cache it runs with, if any

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting.items())


def candidates(attention: str, cache: str, knob: str, values, base: Settings,
               tileskip: TileSkip | None = None) -> list[Candidate]:
    """The candidates of ``knob`` at ``values``; the density and top_p knobs also offer a dense layer. ``tileskip``:
    the run's tile-skip cache (default: the default one when ``cache`` runs tile-skip), whose threshold the
    threshold knob varies.

    Calibration runs them in this order on one shared method state (all but the threshold knob), so
    svg2's k-means advances once per call, in the first candidate: the others reuse its centroids
    (``kmeans_iters_step=0``) and differ only in which cluster pairs they keep, as their settings do.
    """
    shared = knob != TILESKIP_KNOB[0]
    if parse_cache(cache)[0]:
        tileskip = tileskip or TileSkip()
    out = []
    for i, v in enumerate(values):
        params = base if not shared else base.updated(**{knob: v})
        if shared and i > 0 and "kmeans_iters_step" in base.names():
            params = params.updated(kmeans_iters_step=0)
        out.append(Candidate({knob: v}, attention, params, tileskip if shared else replace(tileskip, threshold=v)))
    if shared:
        dense = METHODS["dense"].Settings(**{k: getattr(base, k) for k in Settings.names()})
        out.append(Candidate({"attention": "dense"}, "dense", dense, None))
    return out


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ over the whole tensor, in float32."""
    exact = exact.float()
    return float((approx.float() - exact).norm() / exact.norm().clamp_min(1e-12))


class Recorder:
    """Per (layer, candidate): the (error, density) of every observed call; per layer its call shape."""

    def __init__(self, cands: list[Candidate], sample_steps, share_state: bool):
        self.cands = cands
        self.sample_steps = sample_steps  # set of step indices, or None for every step
        self.share_state = share_state  # one method state for all candidates (k-means warm starts)
        self.observed: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
        self.shapes: dict[int, CallShape] = {}
        self.calls: dict[int, int] = defaultdict(int)  # attention calls per layer, all runs together
        self._state: dict[tuple, dict] = {}
        self._methods: dict = {}

    def new_run(self) -> None:
        self._state.clear()  # a new prompt: methods start as they would in a fresh run

    def __call__(self, ctx: AttentionContext, q, k, v, out, forced_dense: bool) -> None:
        """The handle's observer: every call of the dense run, tensors (B, H, N, D)."""
        self.calls[ctx.layer] += 1
        # forced_dense: an input no plan can express (a padding mask); a tuned run computes it densely too
        sampled = self.sample_steps is None or ctx.step in self.sample_steps
        if sampled and not forced_dense and q.shape[2] == ctx.layout.num_tokens:
            self.observe(ctx, q, k, v, out)

    @torch.no_grad()
    def observe(self, call: AttentionContext, q, k, v, exact) -> None:
        B, H, N, D = q.shape
        self.shapes[call.layer] = CallShape(B * H, N, D)
        for i, cand in enumerate(self.cands):
            key = (call.model, call.branch, call.layer) if self.share_state else (call.model, call.branch, call.layer, i)
            ctx = replace(call, state=self._state.setdefault(key, {}))
            method = self._methods.setdefault(cand.method, METHODS[cand.method]())
            approx, info = run_method(q, k, v, ctx, method, cand.params, tileskip=cand.tileskip)
            if approx is None:  # a dense candidate: exactly the dense output
                approx = exact
            self.observed[(call.layer, i)].append((relative_error(approx, exact), float(info["density"].float().mean())))

    def curve(self, layer: int) -> list[tuple[float, float]]:
        """[(mean error, mean density)] per candidate for ``layer``, in candidate order."""
        out = []
        for i in range(len(self.cands)):
            seen = self.observed.get((layer, i), [])
            n = max(1, len(seen))
            out.append((sum(e for e, _ in seen) / n, sum(d for _, d in seen) / n))
        return out

    @property
    def layers(self) -> list[int]:
        return sorted(self.shapes)


@contextmanager
def recording(pipe, recorder: Recorder):
    """The pipeline, accelerated with dense attention and observed by ``recorder``, until the block ends."""
    from ..integration import accelerate

    handle = accelerate(pipe, attention="dense")
    handle.observe(recorder)
    try:
        yield handle
    finally:
        handle.remove()  # the pipeline is dense again


def sampled_steps(num_steps: int, warmup: int, count: int) -> set[int]:
    """``count`` steps spread evenly over the steps after warm-up (the ones a tuned table changes)."""
    sparse = list(range(min(warmup, num_steps), num_steps))
    if not sparse:
        return set()
    if count >= len(sparse):
        return set(sparse)
    return {sparse[round(i * (len(sparse) - 1) / max(1, count - 1))] for i in range(count)} if count > 1 else {sparse[len(sparse) // 2]}
