"""``accelerate(pipe, ...)``: our self-attention inside a diffusers pipeline, through diffusers' hooks.

A stateful ``ModelHook`` on each transformer learns the CFG branch and step from the pipeline's
``cache_context`` (or counts calls per branch where a pipeline announces no step) and the token
layout from the latents; processors installed on the self-attention modules hand q, k, v to the
handle, which applies the policy and the method. All state lives on the handle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .attention import run_method
from .layout import VideoLayout
from .methods import METHODS, AttentionContext
from .params import Params
from .pipelines import adapter_for
from .policy import Policy
from .stats import Stats, Timer, summarize

HOOK_NAME = "vdit_sparse"
CACHES = ("none", "tileskip")


@dataclass
class CallInfo:
    """The transformer call in flight: what the processors of its layers need to know."""

    model: str
    branch: str
    step: int
    num_steps: int | None
    layout: VideoLayout


class _BranchState(BaseState):
    def __init__(self):
        self.calls = 0

    def reset(self, *args, **kwargs):
        self.calls = 0


class _StepHook(ModelHook):
    """Announces each transformer call (model, branch, step, layout) to the handle."""

    _is_stateful = True

    def __init__(self, handle: "AccelerateHandle", model: str, adapter):
        super().__init__()
        self.handle, self.model, self.adapter = handle, model, adapter
        self.state_manager = StateManager(_BranchState)
        self._no_context_state = _BranchState()

    def pre_forward(self, module, *args, **kwargs):
        self._announce(module, args, kwargs)
        return args, kwargs

    # Under torch.compile this bookkeeping stays in Python: tracing it would specialise the graph
    # on the step number and recompile at every step.
    @torch.compiler.disable
    def _announce(self, module, args, kwargs) -> None:
        try:
            context = self.state_manager.context
        except ValueError:  # called outside a pipeline's cache_context
            context, state = None, self._no_context_state
        else:
            state = self.state_manager.get_state()
        branch = context.name if context is not None else "default"
        step = context.step_index if context is not None and context.step_index is not None else state.calls
        num_steps = context.num_inference_steps if context is not None else None
        if num_steps is None:
            num_steps = self.handle._scheduler_steps()
        layout = self.adapter.layout(module, args, kwargs)
        self.handle._current = CallInfo(self.model, branch, int(step), num_steps, layout)
        state.calls += 1

    def post_forward(self, module, output):
        self.handle._current = None
        return output

    def reset_state(self, module):
        # the pipeline finished a run: per-run state goes, the run's stats stay readable
        self.state_manager.reset()
        self._no_context_state.reset()
        self.handle._end_run()
        return module


class AccelerateHandle:
    """What ``accelerate`` returns: the run's state, its stats, and ``remove()``."""

    def __init__(self, pipe, policy: Policy, cache: str):
        self.pipe, self.policy, self.cache = pipe, policy, cache
        self._current: CallInfo | None = None
        self._method_state: dict[tuple, dict] = {}  # (branch, model, layer) -> the method's memory
        self._stats = Stats()
        self._last_run: list[dict] = []
        self._originals: list[tuple[torch.nn.Module, object]] = []
        self._models: list[torch.nn.Module] = []
        self.removed = False

    # --- wiring ---------------------------------------------------------------------------------
    def _install(self, name: str, transformer) -> None:
        adapter = adapter_for(transformer)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        if registry.get_hook(HOOK_NAME) is not None:
            raise ValueError(f"pipe.{name}: already accelerated; call .remove() on the earlier handle first")
        for layer, module in adapter.self_attention(transformer):
            original = module.processor
            self._originals.append((module, original))
            module.set_processor(adapter.make_processor(self._make_attend(name), layer, original))
        registry.register_hook(_StepHook(self, name, adapter), HOOK_NAME)
        registry.invalidate_child_registries_cache()
        self._models.append(transformer)

    def _compile(self, backend: str) -> None:
        for model in self._models:
            model.compile(backend=backend)

    def remove(self) -> None:
        """Restore the original processors and hooks: the pipeline is dense again, bit for bit."""
        if self.removed:
            return
        for module, original in self._originals:
            module.set_processor(original)
        for model in self._models:
            model._compiled_call_impl = None  # undo nn.Module.compile
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.remove_hook(HOOK_NAME, recurse=False)
            registry.invalidate_child_registries_cache()
        self._originals.clear()
        self._method_state.clear()
        self.removed = True

    def _scheduler_steps(self) -> int | None:
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    def _end_run(self) -> None:
        self._method_state.clear()
        if self._stats.rows:  # two-expert pipelines reset each transformer: keep the first snapshot
            self._last_run = self._stats.table()
            self._stats.clear()

    # --- the hot path -----------------------------------------------------------------------------
    def _make_attend(self, model: str):
        # One graph break per self-attention call under torch.compile, named here: the policy and the
        # method's planning are per-step Python and data-dependent; everything around it compiles.
        @torch.compiler.disable
        def attend(layer, q, k, v, dense_fn, dense: bool = False):  # all (B, N, H, D), the diffusers layout
            return self._attend(model, layer, q, k, v, dense_fn, dense)

        return attend

    def _attend(self, model, layer, q, k, v, dense_fn, dense=False):
        """``dense=True``: the processor needs the stock call (an input no plan can express); it is recorded."""
        call = self._current
        if call is None:
            raise RuntimeError("vdit_sparse: self-attention ran outside a transformer forward; the step hook is missing")
        method, params, cache = ("dense", None, "none") if dense else self.policy.resolve(layer, call.step, call.num_steps)
        timer = Timer(q.device)
        if method == "dense" and cache == "none":
            out, density, extras = dense_fn(q, k, v), 1.0, {}
        else:
            ctx = AttentionContext(
                layout=call.layout, layer=layer, step=call.step, num_steps=call.num_steps, branch=call.branch,
                state=self._method_state.setdefault((call.branch, model, layer), {}),
            )
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views, no copy
            out, info = run_method(qt, kt, vt, ctx, method, params, dense_fn=lambda a, b, c: dense_fn(
                a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)).transpose(1, 2), cache=cache)
            out = out.transpose(1, 2)
            density, extras = info["density"].mean(), info.get("stats", {})  # tensors: read at stats()
        self._stats.record(
            timer.stop(), step=call.step, layer=layer, branch=call.branch, model=model, method=method,
            density=density, **extras,
        )
        return out

    # --- reading results --------------------------------------------------------------------------
    @property
    def current_call(self) -> CallInfo | None:
        """The transformer call in flight (model, branch, step, num_steps, layout), or None between calls."""
        return self._current

    def stats(self) -> list[dict]:
        """One dict per self-attention call of the latest run: step, layer, branch, model, method, density, ms."""
        return self._stats.table() if self._stats.rows else self._last_run

    def summary(self) -> dict:
        return summarize(self.stats())


def transformers_of(pipe) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(pipe, torch.nn.Module) and hasattr(pipe, "config") and not hasattr(pipe, "transformer"):
        return [("transformer", pipe)]
    found = [(name, getattr(pipe, name)) for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None]
    if not found:
        raise ValueError(f"pipe: {type(pipe).__name__} has no transformer; pass a diffusers video pipeline or its transformer")
    return found


def accelerate(
    pipe, attention: str = "dense", cache: str = "none", tuned=None, compile: bool | str = False, **overrides
) -> AccelerateHandle:
    """Swap the self-attention of ``pipe``'s transformer(s) for vdit-sparse's; returns the handle.

    ``attention``: a method name (dense, svg, svg2); ``cache``: none; ``tuned``: a per-layer table
    (a dict ``{layer: {param: value}}``, or the name/path of a tuned YAML); ``overrides``: canonical
    parameters (density, top_p, warmup_steps, dense_layers, ...). ``compile``: True (inductor) or a
    torch.compile backend name: the transformers are compiled in place, with one graph break per
    self-attention call; ``remove()`` undoes it.
    """
    if attention not in METHODS:
        raise ValueError(f"attention={attention!r}: unknown method; known methods are {', '.join(sorted(METHODS))}")
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}: unknown cache; known caches are {', '.join(CACHES)}")
    params = Params().updated(**overrides)
    layers = _load_tuned(tuned) if tuned is not None else {}
    handle = AccelerateHandle(pipe, Policy(attention, params, cache=cache, layers=layers), cache)
    try:
        for name, transformer in transformers_of(pipe):
            handle._install(name, transformer)
        if compile:
            handle._compile("inductor" if compile is True else compile)
    except Exception:
        handle.remove()
        raise
    return handle


def _load_tuned(tuned) -> dict[int, dict]:
    if isinstance(tuned, dict):
        table = tuned
    else:
        from .config import load_tuned_table

        table = load_tuned_table(tuned)
    out = {}
    for layer, settings in table.items():
        if not isinstance(settings, dict):
            raise ValueError(f"tuned table: layer {layer} must map to a dict of settings, got {settings!r}")
        rest = {k: v for k, v in settings.items() if k != "attention"}
        Params().updated(**rest)  # validate names and values now, not mid-run
        if "attention" in settings and settings["attention"] not in METHODS:
            raise ValueError(f"tuned table: layer {layer} attention={settings['attention']!r}: known methods are {', '.join(sorted(METHODS))}")
        out[int(layer)] = dict(settings)
    return out
