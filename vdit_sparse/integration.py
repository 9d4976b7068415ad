"""``accelerate(pipe, ...)``: our self-attention inside a diffusers pipeline, through diffusers' hooks.

A stateful ``ModelHook`` on each transformer learns the CFG branch and step from the pipeline's
``cache_context`` (or counts calls per branch where a pipeline announces no step) and the token
layout from the latents; processors installed on the self-attention modules hand q, k, v to the
handle, which applies the policy and the method. The handle is made of small parts: the wiring
(processors and hooks in, and out again), one state per (branch, model, layer) as diffusers'
``StateManager`` keeps one per context, the policy, and the statistics. At each transformer call the
hook first checks that the handle's processors are still installed and that the accelerated pipeline
is the caller (ownership.py): what the handle reports is what ran.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .attention import run_method
from .methods import METHODS, AttentionContext
from .ownership import Installed, already_accelerated_message, check_caller, check_processors, check_stands_in_for, restore
from .pipelines import adapter_for
from .pipelines.ulysses import check_supported, context_parallel
from .policy import Policy
from .stats import Stats, Timer, computed_share, gather_ranks, summarize

HOOK_NAME = "vdit_sparse"


class _BranchState(BaseState):
    def __init__(self):
        self.calls = 0

    def reset(self, *args, **kwargs):
        self.calls = 0


class _StepHook(ModelHook):
    """Announces each transformer call (model, branch, step, layout) to the handle."""

    _is_stateful = True

    def __init__(self, handle: "AccelerateHandle", model: str, adapter, installed: list[Installed]):
        super().__init__()
        self.handle, self.model, self.adapter, self.installed = handle, model, adapter, installed
        self.state_manager = StateManager(_BranchState)
        self._no_context_state = _BranchState()

    def pre_forward(self, module, *args, **kwargs):
        self._announce(module, args, kwargs)
        return args, kwargs

    # Under torch.compile this bookkeeping stays in Python: tracing it would specialise the graph
    # on the step number and recompile at every step.
    @torch.compiler.disable
    def _announce(self, module, args, kwargs) -> None:
        # what runs must be what the handle says: our processors, driven by the accelerated pipeline
        check_processors(self.model, self.installed, self.adapter)
        check_caller(self.handle.pipe, self.model, module)
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
            num_steps = scheduler_steps(self.handle.pipe)
        layout = self.adapter.layout(module, args, kwargs)
        self.handle._current = AttentionContext(layout, step=int(step), num_steps=num_steps, branch=branch, model=self.model)
        self.handle._record_call(self.model, branch, int(step), num_steps)
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


def scheduler_steps(pipe) -> int | None:
    """Steps of the run in flight, from the scheduler's timesteps (pipelines that announce no step count)."""
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return len(timesteps) if timesteps is not None else None


class HandleEntry:
    """What a processor holds: the handle's hot path, callable as ``attend(layer, q, k, v, dense_fn, ...)``."""

    def __init__(self, handle: "AccelerateHandle"):
        self.handle = handle

    # One graph break per self-attention call under torch.compile: the policy and the method's
    # planning are per-step Python and data-dependent; everything around it compiles.
    @torch.compiler.disable
    def __call__(self, layer, q, k, v, dense_fn, dense: bool = False, heads=None):
        return self.handle._attend(layer, q, k, v, dense_fn, dense, heads)

    @torch.compiler.disable
    def needs_full_sequence(self, layer: int) -> bool:
        return self.handle._needs_full_sequence(layer)


def context_parallel_config(transformer):
    """The transformer's ParallelConfig when it runs context parallelism (diffusers records it there), else None."""
    config = getattr(transformer, "_parallel_config", None)
    return config if getattr(config, "context_parallel_config", None) is not None else None


def check_context_parallel(transformer, policy: Policy) -> None:
    """Refuse now what the processors would refuse at the first call: a plan under ring attention, or heads
    that do not divide among the Ulysses ranks."""
    cp = context_parallel(context_parallel_config(transformer))
    if cp is not None and (policy.method != "dense" or policy.layers or policy.tileskip is not None):
        check_supported(cp, transformer.config.num_attention_heads, f"{type(transformer).__name__}")


def ulysses_group(models):
    """The process group of the Ulysses ranks of ``models`` (the first that has one), or None."""
    for model in models:
        cp = getattr(context_parallel_config(model), "context_parallel_config", None)
        if cp is not None and cp.ulysses_degree > 1:
            return cp._ulysses_mesh.get_group()
    return None


class LayerStates:
    """One method state per (branch, model, layer), as diffusers' StateManager keeps one per context."""

    def __init__(self):
        self._states: dict[tuple[str, str, int], dict] = {}

    def get(self, ctx: AttentionContext) -> dict:
        return self._states.setdefault((ctx.branch, ctx.model, ctx.layer), {})

    def items(self):
        return self._states.items()

    def reset(self) -> None:
        self._states.clear()


class _Wiring:
    """Our processors and step hook in a pipeline's transformers, and everything needed to take them out."""

    def __init__(self):
        self.installed: list[tuple[torch.nn.Module, list[Installed]]] = []  # per transformer, our processors
        self.models: list[torch.nn.Module] = []
        self.layers: dict[str, int] = {}  # self-attention layers per model
        self.cached: list[torch.nn.Module] = []  # transformers we enabled a step-level cache on

    def enable_step_cache(self, pipe, step_cache, num_steps: int | None) -> None:
        """diffusers' own step-level cache hooks on every transformer (``transformer.enable_cache``)."""
        if step_cache.data_dependent and ulysses_group(self.models) is not None:
            raise ValueError(f"cache={step_cache.name!r}: decides from the activations, which each Ulysses rank sees only "
                             "a shard of: the ranks could disagree; use magcache, taylorseer or pab under --ulysses-degree")
        for model in self.models:
            if model.is_cache_enabled:
                raise ValueError(f"{type(model).__name__}: a diffusers cache is enabled already ({type(model._cache_config).__name__}); "
                                 "disable it (transformer.disable_cache()) or leave cache= to us")
            adapter = adapter_for(model)
            if step_cache.name in adapter.unsupported_caches:
                raise ValueError(f"cache={step_cache.name!r}: not for {adapter.family}: "
                                 f"{adapter.unsupported_caches[step_cache.name]}; use fbcache, magcache, taylorseer or pab")
            model.enable_cache(step_cache.config(pipe, adapter, num_steps))
            self.cached.append(model)

    def install(self, name: str, transformer, handle: "AccelerateHandle") -> None:
        adapter = adapter_for(transformer)
        modules = adapter.self_attention(transformer)
        self.layers[name] = len(modules)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        earlier = registry.get_hook(HOOK_NAME)
        if earlier is not None:
            raise ValueError(already_accelerated_message(name, transformer, earlier.handle.pipe, handle.pipe))
        check_context_parallel(transformer, handle.policy)
        names = {id(m): n for n, m in transformer.named_modules()}
        for _, module in modules:
            check_stands_in_for(adapter, name, names[id(module)], module.processor)
        installed: list[Installed] = []
        self.installed.append((transformer, installed))  # before the first swap: remove() undoes a partial install
        for layer, module in modules:
            processor = adapter.processor(handle.entry(), layer, module.processor)
            # enabled before us on a stock processor without the attribute (CogVideoX's): the model has it
            processor._parallel_config = processor._parallel_config or context_parallel_config(transformer)
            installed.append(Installed(names[id(module)], module, processor, module.processor))
            module.set_processor(processor)
        registry.register_hook(_StepHook(handle, name, adapter, installed), HOOK_NAME)
        registry.invalidate_child_registries_cache()
        self.models.append(transformer)

    def compile(self, backend: str) -> None:
        for model in self.models:
            model.compile(backend=backend)

    def disable_step_cache(self) -> None:
        for model in self.cached:
            model.disable_cache()
        self.cached.clear()

    def remove(self) -> None:
        self.disable_step_cache()
        for transformer, installed in self.installed:
            restore(installed, transformer)
        for model in self.models:
            model._compiled_call_impl = None  # undo nn.Module.compile
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.remove_hook(HOOK_NAME, recurse=False)
            registry.invalidate_child_registries_cache()
        self.installed.clear()
        self.models.clear()


class AccelerateHandle:
    """What ``accelerate`` returns: the run's state, its stats, ``observe()`` and ``remove()``."""

    def __init__(self, pipe, policy: Policy, step_cache=None):
        self.pipe, self.policy, self.step_cache = pipe, policy, step_cache
        self.spec = None  # the RunSpec it was made from (set by accelerate)
        self.methods = {name: cls() for name, cls in METHODS.items()}  # built once: methods keep no state
        self.states = LayerStates()
        self._current: AttentionContext | None = None
        self._stats = Stats()
        self._last_run: list[dict] = []
        self._observers: list = []
        self._calls: list[tuple[str, str, int]] = []  # (model, branch, step) of every transformer call of the run
        self._last_calls: list[tuple[str, str, int]] = []
        self._wiring = _Wiring()
        self.removed = False

    @property
    def cache(self) -> str:
        return self.policy.cache

    def remove(self) -> None:
        """Restore the original processors and hooks: the pipeline is dense again, bit for bit."""
        if self.removed:
            return
        self._wiring.remove()
        self.states.reset()
        self.removed = True

    def _end_run(self) -> None:
        self.states.reset()
        if self._stats.rows:  # two-expert pipelines reset each transformer: keep the first snapshot
            self._last_run = self._stats.table()
            self._stats.clear()
        if self._calls:
            self._last_calls, self._calls = self._calls, []

    def _record_call(self, model: str, branch: str, step: int, num_steps: int | None) -> None:
        if not self._calls and self._wiring.cached:  # a run's first call: is the step cache laid out for it?
            planned = getattr(self.step_cache, "num_inference_steps", None)
            if planned is not None and num_steps is not None and planned != num_steps:
                raise ValueError(f"magcache.num_inference_steps={planned}, but this run has {num_steps} steps; "
                                 "accelerate again with the run's step count")
        self._calls.append((model, branch, step))

    @contextlib.contextmanager
    def step_cache_paused(self):
        """Pipeline calls inside run without the step-level cache (a compile warm-up of one step, say);
        it is enabled again, with fresh state, on leaving."""
        if not self._wiring.cached:
            yield
            return
        self._wiring.disable_step_cache()
        try:
            yield
        finally:
            self._wiring.enable_step_cache(self.pipe, self.step_cache, getattr(self.step_cache, "num_inference_steps", None))

    # --- the hot path -----------------------------------------------------------------------------
    def entry(self) -> "HandleEntry":
        """What a processor calls: ``attend(layer, q, k, v, dense_fn, dense=False, heads=None)``, (B, N, H, D)."""
        return HandleEntry(self)

    def _call(self) -> AttentionContext:
        if self._current is None:
            if self.removed:  # its hook is gone: the processor was put back by hand
                raise RuntimeError("vdit_sparse: a processor of a removed handle ran (put back by set_attn_processor or "
                                   "unfuse_qkv_projections); set the stock processors, or accelerate again")
            raise RuntimeError("vdit_sparse: self-attention ran outside a transformer forward; the step hook is missing")
        return self._current

    def _needs_full_sequence(self, layer: int) -> bool:
        """Whether this call plans (a method or tile-skip runs) or is observed: its q, k, v must then hold
        the whole sequence, which under Ulysses the processor exchanges for."""
        ctx = self._call()
        method, _, tileskip = self.policy.resolve(layer, ctx.step, ctx.num_steps)
        return method != "dense" or tileskip is not None or bool(self._observers)

    def _attend(self, layer, q, k, v, dense_fn, dense=False, heads=None):
        """``dense=True``: the processor needs the stock call (an input no plan can express); it is recorded.
        ``heads``: (first, total) when q, k, v hold some of the model's heads (a Ulysses rank)."""
        ctx = dataclasses.replace(self._call(), layer=layer, heads=heads)
        ctx.state = self.states.get(ctx)
        method, settings, tileskip = ("dense", None, None) if dense else self.policy.resolve(layer, ctx.step, ctx.num_steps)
        timer = Timer(q.device)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views, no copy
        out, info = None, {}
        if method != "dense" or tileskip is not None:
            out, info = run_method(qt, kt, vt, ctx, self.methods[method], settings, tileskip)
        out = dense_fn(q, k, v) if out is None else out.transpose(1, 2)  # (B, N, H, D)
        density = info["density"].mean() if "density" in info else 1.0  # tensors: read at stats()
        self._stats.record(timer.stop(), step=ctx.step, layer=layer, branch=ctx.branch, model=ctx.model,
                           method=method, density=density, heads=q.shape[2], **info.get("stats", {}))
        for observer in self._observers:
            observer(ctx, qt, kt, vt, out.transpose(1, 2), dense)
        return out

    # --- observing and reading results ------------------------------------------------------------
    def observe(self, observer):
        """Call ``observer(ctx, q, k, v, out, forced_dense)`` after every self-attention call (tensors
        (B, H, N, D); ``forced_dense``: the processor asked for the stock call). Returns a function
        that stops it. Calibration (``vdit-sparse tune``) records dense runs this way."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    @property
    def current_call(self) -> AttentionContext | None:
        """The transformer call in flight (model, branch, step, num_steps, layout), or None between calls."""
        return self._current

    def stats(self) -> list[dict]:
        """One dict per self-attention call of the latest run: step, layer, branch, model, method, density,
        heads, ms. Under Ulysses every rank must call it (before ``remove()``): each call's density is
        averaged over the heads of all ranks, ms is the slowest rank's."""
        table = self._local_stats()
        group = ulysses_group(self._wiring.models)
        return table if group is None else gather_ranks(table, group)

    def _local_stats(self) -> list[dict]:
        return self._stats.table() if self._stats.rows else self._last_run

    def computed(self) -> list[dict]:
        """Per transformer call of the latest run (model, branch, step): which self-attention layers ran and the
        share that did; the others were served by a step-level cache (their blocks or attention were skipped)."""
        calls = self._calls or self._last_calls
        ran: dict[tuple, set] = {}
        for row in self._local_stats():  # every rank makes the same calls: no need to gather
            ran.setdefault((row["model"], row["branch"], row["step"]), set()).add(row["layer"])
        out = []
        for model, branch, step in calls:
            layers = sorted(ran.get((model, branch, step), ()))
            total = self._wiring.layers.get(model, 0)
            out.append({"model": model, "branch": branch, "step": step, "layers": layers,
                        "computed": len(layers) / total if total else 1.0})
        return out

    def summary(self) -> dict:
        out = summarize(self.stats())
        out["computed"] = computed_share(self.computed())
        return out


def transformers_of(pipe) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(pipe, torch.nn.Module) and hasattr(pipe, "config") and not hasattr(pipe, "transformer"):
        return [("transformer", pipe)]
    found = [(name, getattr(pipe, name)) for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None]
    if not found:
        raise ValueError(f"pipe: {type(pipe).__name__} has no transformer; pass a diffusers video pipeline or its transformer")
    return found


def accelerate(
    pipe, attention="dense", cache: str = "none", tuned=None, compile: bool | str = False, **settings
) -> AccelerateHandle:
    """Swap the self-attention of ``pipe``'s transformer(s) for vdit-sparse's; returns the handle.

    ``attention``: a method name (``vdit_sparse.methods.METHODS``), or a resolved
    :class:`~vdit_sparse.runspec.RunSpec` (``accelerate(pipe, spec)``; then nothing else but ``compile``);
    ``cache``: none, tileskip, a diffusers step-level cache (fbcache, magcache, taylorseer, fastercache, pab,
    seacache) or tileskip+<step cache>; ``tuned``: a per-layer table (a dict ``{layer: {setting: value}}``, or the
    name/path of a tuned YAML, whose ``caches`` section may hold e.g. MagCache's measured ratios); ``settings``:
    the method's settings by their canonical names (density, top_p, warmup_steps, dense_layers, ...), defaults
    from the method's settings class, the same ones the CLI uses; the tile-skip cache's (threshold,
    refresh_every, ``tileskip.block_size``); a step cache's own settings, namespaced,
    ``**{"magcache.threshold": 0.1}`` or ``magcache={"threshold": 0.1}``. All of it resolves once into a RunSpec
    (``handle.spec``). ``compile``: True (inductor) or a torch.compile backend name: the transformers are
    compiled in place, with one graph break per self-attention call. ``remove()`` undoes all of it, bit for bit.
    """
    from .runspec import RunSpec, resolve

    if isinstance(attention, RunSpec):
        if cache != "none" or tuned is not None or settings:
            raise ValueError("accelerate(pipe, spec): the RunSpec holds the whole request; pass no cache, tuned or "
                             "settings beside it")
        spec = attention
    else:
        spec = resolve(attention, cache, settings, tuned=tuned)
    handle = AccelerateHandle(pipe, spec.policy, spec.step_cache)
    handle.spec = spec
    try:
        for name, transformer in transformers_of(pipe):
            handle._wiring.install(name, transformer, handle)
        if spec.step_cache is not None:
            handle._wiring.enable_step_cache(pipe, spec.step_cache, getattr(spec.step_cache, "num_inference_steps", None))
        if compile:
            handle._wiring.compile("inductor" if compile is True else compile)
    except Exception:
        handle.remove()
        raise
    return handle
