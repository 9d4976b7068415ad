"""Calibration for ``vdit-sparse tune``: per layer, the attention error of each candidate setting.

A dense run of the pipeline is recorded; at sampled steps every self-attention call's q, k, v are
handed to each candidate setting (run_method, exactly what a tuned run would compute) and its
output is compared with the dense output of the same call: relative L2 error ‖o − o_dense‖/‖o_dense‖
and realised density. Nothing is stored but those numbers, so memory stays that of one call.

How the calls are seen: ``accelerate(pipe, attention="dense")`` installs our processors, and the
recorder wraps each processor's ``attend`` callable (its documented entry to the handle), calling
through to it: the run stays the dense run, bit for bit, and its frames are the reference video.
No global registry is touched, and the handle's ``remove()`` drops the wrappers with the processors.

Errors are measured on the dense trajectory: the error one call would make, not the error that
accumulates over a sparse run (the end-to-end PSNR check in ``tune`` measures that). The tile-skip
cache is the exception: its marks carry from step to step, so with the threshold knob every step
after warm-up is observed, each candidate with its own cache state.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attention import run_method
from .methods import AttentionContext
from .params import Params
from .tune_cost import CallShape

KNOBS = ("density", "top_p", "threshold")
DEFAULT_VALUES = {
    "density": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7),
    "top_p": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
    "threshold": (-14.0, -10.0, -8.0, -6.0, -4.0, -3.0, -2.0, -1.0),
}


@dataclass(frozen=True)
class Candidate:
    """One setting a layer may get: what the tuned table says, and how calibration runs it."""

    setting: dict  # the layer's entry in the tuned table, e.g. {"density": 0.2} or {"attention": "dense"}
    method: str
    params: Params
    cache: str

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting.items())


def candidates(attention: str, cache: str, knob: str, values, base: Params) -> list[Candidate]:
    """The candidates of ``knob`` at ``values``; the density and top_p knobs also offer a dense layer.

    Calibration runs them in this order on one shared method state (all but the threshold knob), so
    svg2's k-means advances once per call, in the first candidate: the others reuse its centroids
    (``kmeans_iters_step=0``) and differ only in which cluster pairs they keep, as their settings do.
    """
    shared = knob != "threshold"
    out = []
    for i, v in enumerate(values):
        params = base.updated(**{knob: v})
        if shared and attention == "svg2" and i > 0:
            params = params.updated(kmeans_iters_step=0)
        out.append(Candidate({knob: v}, attention, params, cache))
    if knob != "threshold":
        out.append(Candidate({"attention": "dense"}, "dense", base, "none"))
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

    def new_run(self) -> None:
        self._state.clear()  # a new prompt: methods start as they would in a fresh run

    def wrap(self, handle, model: str, attend):
        def recording(layer, q, k, v, dense_fn, dense: bool = False):  # (B, N, H, D) each, as the processors hand them
            out = attend(layer, q, k, v, dense_fn, dense=dense)  # the dense run itself
            call = handle.current_call
            self.calls[layer] += 1
            # dense=True: an input no plan can express (a padding mask); a tuned run computes it densely too
            sampled = self.sample_steps is None or call.step in self.sample_steps
            if sampled and not dense and q.shape[1] == call.layout.num_tokens:
                self.observe(model, layer, call, q, k, v, out)
            return out

        return recording

    @torch.no_grad()
    def observe(self, model, layer, call, q, k, v, out) -> None:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
        exact = out.transpose(1, 2)  # (B, H, N, D)
        B, H, N, D = qt.shape
        self.shapes[layer] = CallShape(B * H, N, D)
        for i, cand in enumerate(self.cands):
            key = (model, call.branch, layer) if self.share_state else (model, call.branch, layer, i)
            ctx = AttentionContext(
                layout=call.layout, layer=layer, step=call.step, num_steps=call.num_steps, branch=call.branch,
                state=self._state.setdefault(key, {}),
            )
            approx, info = run_method(qt, kt, vt, ctx, cand.method, cand.params, cache=cand.cache)
            self.observed[(layer, i)].append((relative_error(approx, exact), float(info["density"].float().mean())))

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
    """The pipeline, accelerated with dense attention and recorded by ``recorder``, until the block ends."""
    from .integration import accelerate, transformers_of
    from .pipelines import adapter_for

    handle = accelerate(pipe, attention="dense")
    try:
        for name, transformer in transformers_of(pipe):
            for _, module in adapter_for(transformer).self_attention(transformer):
                module.processor.attend = recorder.wrap(handle, name, module.processor.attend)
        yield handle
    finally:
        handle.remove()  # the wrapped processors go with it: the pipeline is dense again


def sampled_steps(num_steps: int, warmup: int, count: int) -> set[int]:
    """``count`` steps spread evenly over the steps after warm-up (the ones a tuned table changes)."""
    sparse = list(range(min(warmup, num_steps), num_steps))
    if not sparse:
        return set()
    if count >= len(sparse):
        return set(sparse)
    return {sparse[round(i * (len(sparse) - 1) / max(1, count - 1))] for i in range(count)} if count > 1 else {sparse[len(sparse) // 2]}
