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
from .params import Params

CACHE_PARAMS = ("threshold", "refresh_every")


@dataclass(frozen=True)
class GenerateRequest:
    """Everything that determines a generated video. ``None`` sizes take the model config's defaults."""

    prompt: str
    model: str = "tiny"
    attention: str = "dense"
    cache: str = "none"
    params: dict = field(default_factory=dict)  # canonical parameter names -> values
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    tuned: str | None = None
    compile: bool | str = False
    overrides: tuple = ()  # extra Hydra KEY=VALUE overrides

    def hydra_overrides(self) -> list[str]:
        out = ["model=tiny"] if self.model == "tiny" else ["model=diffusers", f"model.name={_quote(self.model)}"]
        out += [f"attention={self.attention}", f"cache={self.cache}", f"seed={self.seed}"]
        for key in ("steps", "frames", "height", "width"):
            if getattr(self, key) is not None:
                out.append(f"model.{key}={getattr(self, key)}")
        if self.compile:
            out.append(f"compile={str(self.compile).lower() if self.compile is True else self.compile}")
        for key in ("device", "dtype", "tuned"):
            if getattr(self, key) is not None:
                out.append(f"{key}={getattr(self, key)}")
        unknown = sorted(set(self.params) - set(Params.names()))
        if unknown:
            raise UserError(f"unknown parameter {', '.join(unknown)}: known parameters are {', '.join(Params.names())}")
        for key, value in sorted(self.params.items()):
            group = "cache" if key in CACHE_PARAMS else "attention"
            out.append(f"++{group}.{key}={json.dumps(value)}")
        out.append(f"prompt={_quote(self.prompt)}")
        return out + [_group_param_override(o) for o in self.overrides]

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


def _group_param_override(o: str) -> str:
    """``attention.KEY=V`` / ``cache.KEY=V`` for any canonical parameter, present in the YAML or not."""
    key = o.split("=", 1)[0].lstrip("+")
    group, _, name = key.partition(".")
    if group in ("attention", "cache") and name and name != "name":
        if name not in Params.names():
            raise UserError(f"unknown parameter {name} in {o!r}: known parameters are {', '.join(Params.names())}")
        return f"++{key}={o.split('=', 1)[1]}"
    return o


def _quote(s: str) -> str:
    # Hydra override values: quote so spaces, commas and '=' in prompts survive
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resolve(req: GenerateRequest):
    from .config import compose

    cfg = compose(req.hydra_overrides())
    return cfg


def run_params(cfg) -> dict:
    """Canonical parameters from the resolved attention and cache groups, validated."""
    from omegaconf import OmegaConf

    params = {k: v for k, v in OmegaConf.to_container(cfg.attention).items() if k != "name"}
    params.update({k: v for k, v in OmegaConf.to_container(cfg.cache).items() if k != "name"})
    try:
        Params().updated(**params)
    except ValueError as e:
        raise UserError(str(e)) from None
    return params


def check_video_size(pipe, frames: int, height: int, width: int) -> None:
    """Frames, height and width the pipeline's VAE and transformer patching can take."""
    t = getattr(pipe, "vae_scale_factor_temporal", 1)
    s = getattr(pipe, "vae_scale_factor_spatial", 8)
    patch = getattr(pipe.transformer.config, "patch_size", (1, 2, 2))
    mult = s * (patch[-1] if patch else 1)
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

    from .integration import accelerate
    from .loading import load_pipeline, resolve_device, resolve_dtype
    from .stats import summarize

    cfg = resolve(req) if cfg is None else cfg
    params = run_params(cfg)
    m = cfg.model
    if not isinstance(m.steps, int) or m.steps < 1:
        raise UserError(f"steps={m.steps!r}: must be a positive integer")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if pipe is None:
        pipe = load_pipeline(m.name, device=device, dtype=dtype)
    check_video_size(pipe, m.frames, m.height, m.width)
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="denoising")
    try:
        handle = accelerate(
            pipe, attention=cfg.attention.name, cache=cfg.cache.name, tuned=cfg.tuned, compile=cfg.compile, **params
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    def call(steps: int):
        t0 = time.perf_counter()
        frames = call_pipeline(pipe, cfg, steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return frames, time.perf_counter() - t0

    try:
        # with compile, a one-step run first pays the compilation, reported apart from the generation
        compile_s = call(1)[1] if cfg.compile else None
        frames_float, wall = call(m.steps)
        table = handle.stats()
    finally:
        handle.remove()
    from .video import to_uint8

    summary = summarize(table)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["device"], config["dtype"] = str(device), str(dtype).removeprefix("torch.")
    return GenerationResult(
        frames=to_uint8(frames_float), frames_float=frames_float, wall_s=wall,
        attention_ms=summary["attention_ms"], density=summary["density"] if table else 1.0,
        stats=table, config=config, compile_s=compile_s,
    )


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
    from .stats import density_by_layer

    return {
        "config": result.config,
        "versions": versions(),
        "seed": result.config["seed"],
        "device": result.config["device"],
        "wall_s": round(result.wall_s, 4),
        "compile_s": None if result.compile_s is None else round(result.compile_s, 3),
        "attention_ms": round(result.attention_ms, 3),
        "density": result.density,
        "density_per_layer": density_by_layer(result.stats),
        "frames": list(result.frames.shape),
    }


# --- command-line side -------------------------------------------------------------------------------


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The generation flags shared by generate, compare and tune."""
    p.add_argument("--model", default="tiny", help="tiny (embedded, default), a hub id, or a local pipeline directory")
    p.add_argument("--attention", default="dense", help="dense | svg | svg2")
    p.add_argument("--cache", default="none", help="none | tileskip")
    p.add_argument("--density", type=float, help="fraction of attention computed, in (0, 1]")
    p.add_argument("--top-p", dest="top_p", type=float, help="svg2: share of attention mass kept per query cluster")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=float, help="first steps dense: a count, or a fraction when < 1")
    p.add_argument("--steps", type=int, help="denoising steps (model default when omitted)")
    p.add_argument("--frames", type=int, help="video frames (4k + 1 for Wan)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tuned", help="per-layer table: a name in configs/tuned/ or a YAML path")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer around our attention")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, e.g. attention.top_p=0.95")


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


def request_from_args(args: argparse.Namespace, prompt: str) -> GenerateRequest:
    params = {}
    for key in ("density", "top_p", "warmup_steps"):
        value = getattr(args, key, None)
        if value is not None:
            params[key] = int(value) if key == "warmup_steps" and float(value).is_integer() and value >= 1 else value
    for o in args.overrides:
        if "=" not in o:
            raise UserError(f"override {o!r}: expected KEY=VALUE (e.g. attention.top_p=0.95)")
    try:
        Params().updated(**params)
    except ValueError as e:
        raise UserError(str(e)) from None
    return GenerateRequest(
        prompt=prompt, model=args.model, attention=args.attention, cache=args.cache, params=params,
        steps=args.steps, frames=args.frames, height=args.height, width=args.width, seed=args.seed,
        device=args.device, dtype=args.dtype, tuned=args.tuned, compile=bool(getattr(args, "compile", False)),
        overrides=tuple(args.overrides),
    )


def default_out(prompt: str, attention: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    return Path("outputs") / f"{slug}-{attention}.mp4"
