"""One generation run, from a request (Python) or flags (CLI), resolved through Hydra."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    def hydra_overrides(self) -> list[str]:
        """The run's Hydra overrides: model and run keys; settings stay typed and never become strings."""
        out = ["model=tiny"] if self.model == "tiny" else ["model=diffusers", f"model.name={_quote(self.model)}"]
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
    A step cache's own setting may be written without the group: ``magcache.threshold=0.1``."""
    from .caches import STEP_CACHES

    key = o.split("=", 1)[0].lstrip("+")
    group, _, name = key.partition(".")
    if group in STEP_CACHES and name:
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


def _given_settings(cfg, req: GenerateRequest | None) -> tuple[dict, dict]:
    """(method and tile-skip settings, step-cache settings by cache): the request's flags, then the config's
    attention.* / cache.* keys on top."""
    from omegaconf import OmegaConf

    from .caches import split_step_cache_settings

    given = dict(req.settings) if req is not None else {}
    for group in ("attention", "cache"):
        given.update({k: v for k, v in OmegaConf.to_container(cfg[group]).items() if k != "name"})
    return split_step_cache_settings(given)


def run_settings(cfg, req: GenerateRequest | None = None):
    """The run's typed settings (vdit_sparse.settings), checked against the method and the cache."""
    from .settings import settings_for

    try:
        return settings_for(cfg.attention.name, _given_settings(cfg, req)[0], cfg.cache.name)
    except ValueError as e:
        raise UserError(str(e)) from None


def run_step_cache_settings(cfg, req: GenerateRequest | None = None) -> dict[str, dict]:
    """The step-level cache's settings as accelerate() takes them ({"magcache.threshold": ..}), checked now
    (with a tuned table's measured ones); MagCache gets the run's step count."""
    from .caches import parse_cache, step_cache_settings

    caches = _given_settings(cfg, req)[1]
    _, name = parse_cache(cfg.cache.name)
    if name == "magcache":
        caches.setdefault("magcache", {}).setdefault("num_inference_steps", cfg.model.steps)
    try:
        tuned = {}
        if cfg.get("tuned"):
            from .config import load_tuned_caches

            tuned = load_tuned_caches(cfg.tuned)
        step_cache_settings(cfg.cache.name, caches, tuned)
    except ValueError as e:
        raise UserError(str(e)) from None
    return {f"{c}.{k}": v for c, values in caches.items() for k, v in values.items()}


# The model group's keys and the types they take (Hydra reads "abc" or "3" as it sees fit).
MODEL_TYPES = {"name": str, "steps": int, "frames": int, "height": int, "width": int, "guidance_scale": (int, float),
               "max_sequence_length": int, "fps": (int, float)}


def check_run(cfg, req: GenerateRequest | None = None):
    """Everything about a run that can be wrong before a model is loaded: the settings (returned), the types of
    the model keys and the seed, the tuned table (parsed and checked against the method), the dense backend."""
    from .policy import Policy

    settings = run_settings(cfg, req)
    for key, kind in MODEL_TYPES.items():
        value = cfg.model.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UserError(f"model.{key}={value!r}: must be {kinds}")
    if cfg.model.steps < 1:
        raise UserError(f"steps={cfg.model.steps!r}: must be a positive integer")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UserError(f"seed={cfg.seed!r}: must be an integer")
    run_step_cache_settings(cfg, req)
    if cfg.get("tuned"):
        from .config import load_tuned_table

        try:
            Policy.build(cfg.attention.name, settings, cfg.cache.name, load_tuned_table(cfg.tuned))
        except ValueError as e:
            raise UserError(f"tuned={cfg.tuned!r}: {e}") from None
    backend = cfg.get("dense_backend")
    if backend:
        from diffusers.models.attention_dispatch import AttentionBackendName

        if backend not in [b.value for b in AttentionBackendName]:
            known = ", ".join(b.value for b in AttentionBackendName if not b.value.startswith("_"))
            raise UserError(f"dense_backend={backend!r}: not a diffusers attention backend; known: {known}")
    return settings


def check_video_size(pipe, frames: int, height: int, width: int) -> None:
    """Frames, height and width the pipeline's VAE and transformer patching can take (the adapter's rule)."""
    from .pipelines import adapter_for

    t, mult = adapter_for(pipe.transformer).size_rule(pipe)
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % t:
        examples = ", ".join(str(t * k + 1) for k in (2, 4, 8, 20))
        raise UserError(f"frames={frames!r}: this model takes {t}k + 1 frames, e.g. {examples}")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < mult or value % mult:
            raise UserError(f"{name}={value!r}: this model takes multiples of {mult} (e.g. {mult * 8}, {mult * 16})")


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


def run_generation(req: GenerateRequest, pipe=None, cfg=None, progress: bool = True) -> GenerationResult:
    """Generate one video for ``req`` (loading the pipeline unless ``pipe`` is given)."""
    import torch
    from omegaconf import OmegaConf

    from . import parallel
    from .integration import accelerate
    from .loading import load_pipeline, resolve_device, resolve_dtype
    from .stats import summarize

    cfg = resolve(req) if cfg is None else cfg
    settings = check_run(cfg, req)
    m = cfg.model
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if pipe is None:
        pipe = load_pipeline(m.name, device=device, dtype=dtype)
    check_video_size(pipe, m.frames, m.height, m.width)
    parallel.enable(pipe)  # under torchrun with --ulysses-degree N; nothing otherwise
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="denoising")
    restore_backend = use_dense_backend(pipe, cfg.get("dense_backend"))
    try:
        handle = accelerate(
            pipe, attention=cfg.attention.name, cache=cfg.cache.name, tuned=cfg.tuned, compile=cfg.compile,
            **settings.changed(), **run_step_cache_settings(cfg, req),
        )
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
    config["settings"] = settings.as_dict()  # every setting the run used, defaults included
    config["ulysses_degree"] = parallel.degree()
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
    }


# --- command-line side -------------------------------------------------------------------------------


SETTING_FLAGS = ("density", "top_p", "warmup_steps", "threshold")  # the settings with a flag of their own


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The generation flags shared by generate, compare and tune; the method list comes from the registry."""
    from .caches import CACHES
    from .methods import METHODS

    p.add_argument("--model", default="tiny", help="tiny (embedded, default), a hub id, or a local pipeline directory")
    p.add_argument("--attention", default="dense", help="; ".join(f"{n}: {m.summary}" for n, m in METHODS.items()))
    p.add_argument("--cache", default="none", help=" | ".join(CACHES))
    p.add_argument("--density", type=float, help="fraction of attention computed, in (0, 1]")
    p.add_argument("--top-p", dest="top_p", type=float, help="svg2: share of attention mass kept per query cluster")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=float, help="first steps dense: a count, or a fraction when < 1")
    p.add_argument("--threshold", type=float, help="tile-skip: log2 units below the row maximum (default -14.4)")
    p.add_argument("--steps", type=int, help="denoising steps (model default when omitted)")
    p.add_argument("--frames", type=int, help="video frames (4k + 1 for Wan)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tuned", help="per-layer table: a name in configs/tuned/ or a YAML path")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer around our attention")
    p.add_argument("--dense-backend", dest="dense_backend",
                   help="diffusers attention backend for the dense calls: native (default), xformers, flash, sage, ...")
    p.add_argument("--threads", type=int, help="torch's CPU threads for the run (default: torch's; 1 on a busy machine)")
    p.add_argument("--ulysses-degree", dest="ulysses_degree", type=int, default=1,
                   help="GPUs sharing each video (Ulysses); run under torchrun --nproc-per-node N (default 1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides, e.g. attention.top_p=0.95 (any setting: " + settings_help() + ")")


def settings_help() -> str:
    """Each method's own settings, for --help."""
    from .methods import METHODS
    from .settings import Settings

    own = "; ".join(f"{n}: {', '.join(m.Settings.own_names()) or '-'}" for n, m in METHODS.items())
    return f"shared: {', '.join(Settings.names())}; {own}"


OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.]*=")  # a Hydra KEY=VALUE


def parse_generation_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse flags with KEY=VALUE overrides allowed anywhere (argparse leaves those after flags over)."""
    args, extra = parser.parse_known_args(argv)
    flags = [e for e in extra if e.startswith("-")]
    if flags:
        raise UserError(f"unrecognized arguments: {' '.join(flags)}; see --help")
    loose = [e for e in extra if not OVERRIDE.match(e)]
    if loose:
        raise UserError(f"override {loose[0]!r}: expected KEY=VALUE (e.g. attention.top_p=0.95)")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    return args


def read_prompt_file(path: str, flag: str) -> list[str]:
    """The prompts of a text file given as ``flag``: one per line, blank lines and # comments skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path!r}: no such file; expected a text file with one prompt per line")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path!r}: not UTF-8 text (byte {e.start}); expected one prompt per line") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"{flag} {path!r}: holds no prompt; expected one prompt per line")
    return prompts


def request_from_args(args: argparse.Namespace, prompt: str) -> GenerateRequest:
    """The request of parsed flags; its settings are checked against the method now, before any model work."""
    from .caches import parse_cache
    from .settings import settings_for

    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"PROMPT={prompt!r}: must be non-empty text")
    settings = {}
    for key in SETTING_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = int(value) if key == "warmup_steps" and float(value).is_integer() and value >= 1 else value
    for o in args.overrides:
        if "=" not in o:
            raise UserError(f"override {o!r}: expected KEY=VALUE (e.g. attention.top_p=0.95)")
    try:
        parse_cache(args.cache)
        settings_for(args.attention, settings, args.cache)
    except ValueError as e:
        raise UserError(str(e)) from None
    return GenerateRequest(
        prompt=prompt, model=args.model, attention=args.attention, cache=args.cache, settings=settings,
        steps=args.steps, frames=args.frames, height=args.height, width=args.width, seed=args.seed,
        device=args.device, dtype=args.dtype, tuned=args.tuned, compile=bool(getattr(args, "compile", False)),
        dense_backend=getattr(args, "dense_backend", None), overrides=tuple(args.overrides),
    )


def default_out(prompt: str, attention: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    return Path("outputs") / f"{slug}-{attention}.mp4"
