"""One generation run, from a request (Python, or the CLI through flags.py), resolved through Hydra."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class GenerateRequest:
    """Everything that determines a generated video. ``None`` sizes take the model config's defaults."""

    prompt: str
    model: str = "tiny"
    attention: str = "dense"
    cache: str = "none"
    settings: dict = field(default_factory=dict)  # canonical setting names -> values (vdit_sparse.settings)
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    tuned: str | None = None
    compile: bool | str = False
    dense_backend: str | None = None  # diffusers' attention backend for every dense call (e.g. xformers)
    overrides: tuple = ()  # extra Hydra KEY=VALUE overrides
    random_weights: bool = False  # an embedded model with random weights (draws noise): tests and checks only

    def hydra_overrides(self) -> list[str]:
        """The run's Hydra overrides: model and run keys; settings stay typed and never become strings."""
        from .pipelines.tiny import EMBEDDED

        if self.model in EMBEDDED:  # an embedded model has its own config group entry (configs/model/NAME.yaml)
            out = [f"model={self.model}"]
        else:
            out = ["model=diffusers", f"model.name={_quote(self.model)}"]
        out += [f"attention={self.attention}", f"cache={self.cache}", f"seed={self.seed}"]
        for key in ("steps", "frames", "height", "width"):
            if getattr(self, key) is not None:
                out.append(f"model.{key}={getattr(self, key)}")
        if self.compile:
            out.append(f"compile={str(self.compile).lower() if self.compile is True else self.compile}")
        for key in ("device", "dtype", "tuned", "dense_backend"):
            if getattr(self, key) is not None:
                out.append(f"{key}={getattr(self, key)}")
        out.append(f"prompt={_quote(self.prompt)}")
        return out + [_group_override(o) for o in self.overrides]

    def key(self) -> str:
        """A stable hash of everything that determines the output (device and dtype included)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class GenerationResult:
    frames: np.ndarray  # (T, H, W, 3) uint8, what users see
    frames_float: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    wall_s: float
    attention_ms: float
    density: float
    stats: list[dict]
    config: dict
    compile_s: float | None = None  # the one-step warm-up run that compiled the transformer
    computed: list = field(default_factory=list)  # per transformer call: the layers that ran (handle.computed())


def _group_override(o: str) -> str:
    """``attention.KEY=V`` / ``cache.KEY=V``: added to the group (its YAML holds only the name); checked later.
    A cache's own setting may be written without the group: ``magcache.threshold=0.1``, ``tileskip.threshold=-3``."""
    from .caches import STEP_CACHES, TILESKIP

    key = o.split("=", 1)[0].lstrip("+")
    group, _, name = key.partition(".")
    if (group in STEP_CACHES or group == TILESKIP) and name:
        return f"++cache.{key}={o.split('=', 1)[1]}"
    if group in ("attention", "cache") and name and name != "name":
        return f"++{key}={o.split('=', 1)[1]}"
    return o


def _quote(s: str) -> str:
    # Hydra override values: quote so spaces, commas and '=' in prompts survive
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resolve(req: GenerateRequest):
    from .config import compose

    return compose(req.hydra_overrides())


def _model_section(cfg) -> dict:
    """The model config's ``attention:`` section: method defaults by method name, and ``tileskip``'s."""
    from omegaconf import OmegaConf

    section = cfg.model.get("attention") or {}
    return OmegaConf.to_container(section) if not isinstance(section, dict) else dict(section)


def model_method_defaults(cfg) -> dict:
    """The settings the model config's ``attention:`` section sets for this run: its entry for the run's method,
    and its ``tileskip`` entry when the cache runs tile-skip (a model's best setting can depend on its size)."""
    from .caches import parse_cache

    section = _model_section(cfg)
    out = dict(section.get(cfg.attention.name) or {})
    if parse_cache(cfg.cache.name)[0]:
        out.update(section.get("tileskip") or {})
    return out


def _hydra_settings(cfg) -> dict:
    """The config's ``attention.*`` and ``cache.*`` keys (Hydra overrides), as flat setting names. The tile-skip
    knobs were once method settings: ``attention.threshold`` still works, with a warning, for ``tileskip.threshold``."""
    import warnings

    from omegaconf import OmegaConf

    from .caches import TILESKIP_KEYS

    given = {}
    for group in ("attention", "cache"):
        for key, value in OmegaConf.to_container(cfg[group]).items():
            if key == "name":
                continue
            if group == "attention" and key in TILESKIP_KEYS:
                warnings.warn(f"attention.{key}: a setting of the tile-skip cache since 0.3; write tileskip.{key} "
                              f"(or --{key.replace('_', '-')})", FutureWarning, stacklevel=2)
            given[key] = value
    return given


def run_spec(cfg, req: GenerateRequest | None = None):
    """The run's :class:`~vdit_sparse.runspec.RunSpec`, resolved once from the config and the request: the model
    config's method defaults, then the request's flags, then the config's attention.* / cache.* keys; the tuned
    table read here, once; MagCache given the run's step count."""
    from .runspec import Shape, resolve

    given = {**(req.settings if req is not None else {}), **_hydra_settings(cfg)}
    m = cfg.model
    try:
        return resolve(cfg.attention.name, cfg.cache.name, given, tuned=cfg.get("tuned") or None, model=m.name,
                       model_defaults=_model_section(cfg), shape=Shape(m.steps, m.frames, m.height, m.width))
    except ValueError as e:
        raise UserError(str(e)) from None


def run_settings(cfg, req: GenerateRequest | None = None):
    """The run's typed method settings (vdit_sparse.settings), checked against the method and the cache."""
    return run_spec(cfg, req).settings


# The model group's keys and the types they take (Hydra reads "abc" or "3" as it sees fit).
MODEL_TYPES = {"name": str, "steps": int, "frames": int, "height": int, "width": int, "guidance_scale": (int, float),
               "max_sequence_length": int, "fps": (int, float)}


def check_run(cfg, req: GenerateRequest | None = None, spec=None):
    """Everything about a run that can be wrong before a model is loaded: the settings, the step cache and the tuned
    table (resolved into the returned RunSpec, unless ``spec`` is given), the types of the model keys and the seed,
    the dense backend."""
    spec = run_spec(cfg, req) if spec is None else spec
    for key, kind in MODEL_TYPES.items():
        value = cfg.model.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UserError(f"model.{key}={value!r}: must be {kinds}")
    if cfg.model.steps < 1:
        raise UserError(f"steps={cfg.model.steps!r}: must be a positive integer")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UserError(f"seed={cfg.seed!r}: must be an integer")
    backend = cfg.get("dense_backend")
    if backend:
        from diffusers.models.attention_dispatch import AttentionBackendName

        if backend not in [b.value for b in AttentionBackendName]:
            known = ", ".join(b.value for b in AttentionBackendName if not b.value.startswith("_"))
            raise UserError(f"dense_backend={backend!r}: not a diffusers attention backend; known: {known}")
    return spec


def preflight(cfg, req: GenerateRequest | None = None, degree: int = 1, step_caches: set | None = None):
    """:func:`check_run`; whether a tuned table was made for this method, model and step count (and the step caches
    its caches section serves: ``step_caches`` when the command runs more than this run's); and for the embedded
    models, whose configs are known without loading them, the video size and the Ulysses degree: everything
    refused before any model work. Returns the run's RunSpec."""
    from . import parallel
    from .config import check_tuned_fits
    from .pipelines.tiny import EMBEDDED, TRANSFORMER_CONFIG, embedded_size_rule

    spec = check_run(cfg, req)
    m = cfg.model
    if spec.tuned is not None:
        check_tuned_fits(spec.tuned, cfg.attention.name, cfg.cache.name, m.name, m.steps, step_caches)
    if m.name in EMBEDDED:
        check_video_size(None, m.frames, m.height, m.width, embedded_size_rule())
        parallel.check_degree(TRANSFORMER_CONFIG["num_attention_heads"], degree)
    return spec


def prepare(req: GenerateRequest, degree: int = 1, step_caches: set | None = None):
    """(config, RunSpec) of ``req``: composed, resolved and checked once (:func:`preflight`), before any model work."""
    cfg = resolve(req)
    return cfg, preflight(cfg, req, degree, step_caches)


def check_video_size(pipe, frames: int, height: int, width: int, rule: tuple | None = None) -> None:
    """Frames, height and width the pipeline's VAE and transformer patching can take: ``rule`` (t, s, max latent
    positions per axis or None), by default the adapter's rule for ``pipe`` and its transformer's rotary table."""
    if rule is None:
        from .pipelines import adapter_for

        t, mult = adapter_for(pipe.transformer).size_rule(pipe)
        rule = (t, mult, pipe.transformer.config.get("rope_max_seq_len"))
    t, mult, most = rule
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % t:
        examples = ", ".join(str(t * k + 1) for k in (2, 4, 8, 20))
        raise UserError(f"frames={frames!r}: this model takes {t}k + 1 frames, e.g. {examples}")
    if most is not None and (frames - 1) // t + 1 > most:  # the rotary table has `most` positions per axis
        raise UserError(f"frames={frames}: this model takes at most {(most - 1) * t + 1} frames")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < mult or value % mult:
            raise UserError(f"{name}={value!r}: this model takes multiples of {mult} (e.g. {mult * 8}, {mult * 16})")
        if most is not None and value // mult > most:
            raise UserError(f"{name}={value}: this model takes at most {most * mult}")


def call_pipeline(pipe, cfg, steps: int | None = None, on_step=None) -> np.ndarray:
    """(T, H, W, 3) float32 frames in [0, 1] of one call of ``pipe`` with the resolved config ``cfg``.

    ``steps`` overrides the config's step count; ``on_step()`` runs after each denoising step.
    """
    import torch

    def step_end(pipeline, step, timestep, callback_kwargs):
        on_step()
        return callback_kwargs

    m = cfg.model
    with torch.inference_mode():
        out = pipe(
            prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, num_frames=m.frames, height=m.height,
            width=m.width, num_inference_steps=m.steps if steps is None else steps, guidance_scale=m.guidance_scale,
            max_sequence_length=m.max_sequence_length, generator=torch.Generator(device="cpu").manual_seed(int(cfg.seed)),
            output_type="np", callback_on_step_end=step_end if on_step is not None else None,
        )
    return np.asarray(out.frames[0], dtype=np.float32)


def run_generation(req: GenerateRequest, pipe=None, cfg=None, progress: bool = True,
                   step_caches: set | None = None, spec=None) -> GenerationResult:
    """Generate one video for ``req`` (loading the pipeline unless ``pipe`` is given); ``step_caches``: the step
    caches of the whole command this run belongs to, when more than its own (see :func:`preflight`). ``cfg`` and
    ``spec``: the run's config and RunSpec when the caller resolved them already (:func:`prepare`)."""
    import torch
    from omegaconf import OmegaConf

    from . import parallel
    from .integration import accelerate
    from .loading import load_pipeline, resolve_device, resolve_dtype
    from .stats import summarize

    from .pipelines.tiny import EMBEDDED, VOCAB_WORDS, unknown_words, weights_info

    cfg = resolve(req) if cfg is None else cfg
    spec = preflight(cfg, req, parallel.degree(), step_caches) if spec is None else spec
    m = cfg.model
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if m.name in EMBEDDED and progress:
        unknown = unknown_words(cfg.prompt)
        if unknown:
            import sys

            print(f"vdit-sparse: notice: the embedded model does not know {', '.join(map(repr, unknown))} (read as "
                  f"unknown); the words it knows: {' '.join(VOCAB_WORDS)}", file=sys.stderr)
    random_weights = bool(req is not None and req.random_weights)
    if pipe is None:
        pipe = load_pipeline(m.name, device=device, dtype=dtype, random_weights=random_weights)
    check_video_size(pipe, m.frames, m.height, m.width)
    parallel.enable(pipe)  # under torchrun with --ulysses-degree N; nothing otherwise
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="denoising")
    restore_backend = use_dense_backend(pipe, cfg.get("dense_backend"))
    try:
        handle = accelerate(pipe, spec, compile=cfg.compile)
    except ValueError as e:
        restore_backend()
        raise UserError(str(e)) from None

    def call(steps: int):
        t0 = time.perf_counter()
        frames = call_pipeline(pipe, cfg, steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return frames, time.perf_counter() - t0

    try:
        # with compile, a one-step run first pays the compilation, reported apart from the generation
        if cfg.compile:  # the step cache is laid out for the run's step count, not the warm-up's one step
            with handle.step_cache_paused():
                compile_s = call(1)[1]
        else:
            compile_s = None
        frames_float, wall = call(m.steps)
        table, computed = handle.stats(), handle.computed()
    finally:
        handle.remove()
        restore_backend()
    from .video import to_uint8

    summary = summarize(table)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["device"], config["dtype"] = str(device), str(dtype).removeprefix("torch.")
    config["settings"] = spec.settings.as_dict()  # every setting the run used, defaults included
    config["tileskip"] = None if spec.tileskip is None else spec.tileskip.as_dict()
    config["ulysses_degree"] = parallel.degree()
    config["model_method_defaults"] = model_method_defaults(cfg)  # what the model config set, before user flags
    if m.name not in EMBEDDED:  # a diffusers model: its files are the user's; hashing gigabytes is not our call
        config["weights"] = {"source": m.name, "trained": None, "sha256": None}
    elif random_weights:
        config["weights"] = {"source": "random (--random-weights)", "trained": False, "sha256": None}
    else:
        config["weights"] = dict(weights_info(m.name))  # a copy: the cached answer stays as found
    config["threads"] = torch.get_num_threads()  # torch's intra-op threads during the run (--threads)
    return GenerationResult(
        frames=to_uint8(frames_float), frames_float=frames_float, wall_s=wall,
        attention_ms=summary["attention_ms"], density=summary["density"] if table else 1.0,
        stats=table, config=config, compile_s=compile_s, computed=computed,
    )


def use_dense_backend(pipe, name: str | None):
    """Route every dense attention call of ``pipe``'s transformers through diffusers' backend ``name``
    (native, xformers, flash, sage, ...: the name is checked by check_run, its package and device by
    diffusers). Returns the function that undoes it."""
    if not name:
        return lambda: None
    from .integration import transformers_of

    models = [t for _, t in transformers_of(pipe)]
    try:
        for model in models:
            model.set_attention_backend(name)
    except Exception as e:  # diffusers checks the backend's package and device here
        for model in models:
            model.reset_attention_backend()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"dense_backend={name!r}: {first}") from None
    return lambda: [model.reset_attention_backend() for model in models]


def versions() -> dict:
    import diffusers
    import torch

    from . import __version__

    out = {"vdit_sparse": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def sidecar(result: GenerationResult) -> dict:
    from .stats import computed_share, density_by_layer

    return {
        "config": result.config,
        "versions": versions(),
        "seed": result.config["seed"],
        "device": result.config["device"],
        "wall_s": round(result.wall_s, 4),
        "threads": result.config.get("threads"),
        "compile_s": None if result.compile_s is None else round(result.compile_s, 3),
        "attention_ms": round(result.attention_ms, 3),
        "density": result.density,
        "density_per_layer": density_by_layer(result.stats),
        "computed_share": computed_share(result.computed),
        "computed": result.computed,  # per transformer call: the self-attention layers that ran (the rest: a step cache)
        "frames": list(result.frames.shape),
        "weights": result.config.get("weights"),
    }
