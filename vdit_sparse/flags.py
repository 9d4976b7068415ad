"""The command line's side of a run: the generation flags that generate, compare and tune share, and the
request (vdit_sparse.generate.GenerateRequest) they make. The run itself is in generate.py."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .errors import UserError
from .generate import GenerateRequest


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
    p.add_argument("--random-weights", dest="random_weights", action="store_true",
                   help="an embedded model with random weights instead of its trained ones (draws noise; for checks)")
    p.add_argument("--threads", type=int, help="torch's CPU threads for the run (default: torch's; 1 on a busy machine)")
    p.add_argument("--ulysses-degree", dest="ulysses_degree", type=int, default=1,
                   help="GPUs sharing each video (Ulysses); run under torchrun --nproc-per-node N (default 1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides, e.g. attention.top_p=0.95 (any setting: " + settings_help() + ")")


def settings_help() -> str:
    """Each method's own settings and the tile-skip cache's, for --help."""
    from .caches import TILESKIP_KEYS
    from .methods import METHODS
    from .settings import Settings

    own = "; ".join(f"{n}: {', '.join(m.Settings.own_names()) or '-'}" for n, m in METHODS.items())
    return f"shared: {', '.join(Settings.names())}; {own}; --cache tileskip: {', '.join(TILESKIP_KEYS)}, tileskip.block_size"


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
    """The request of parsed flags; its method and cache are checked now, its settings when it is resolved
    (vdit_sparse.generate.prepare), both before any model work."""
    from .caches import parse_cache
    from .methods import get_method

    from .pipelines.tiny import EMBEDDED

    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"PROMPT={prompt!r}: must be non-empty text")
    if getattr(args, "random_weights", False) and args.model not in EMBEDDED:
        raise UserError(f"--random-weights: only for the embedded models ({', '.join(EMBEDDED)}), not model={args.model!r}")
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
        get_method(args.attention)
    except ValueError as e:
        raise UserError(str(e)) from None
    return GenerateRequest(
        prompt=prompt, model=args.model, attention=args.attention, cache=args.cache, settings=settings,
        steps=args.steps, frames=args.frames, height=args.height, width=args.width, seed=args.seed,
        device=args.device, dtype=args.dtype, tuned=args.tuned, compile=bool(getattr(args, "compile", False)),
        dense_backend=getattr(args, "dense_backend", None), overrides=tuple(args.overrides),
        random_weights=bool(getattr(args, "random_weights", False)),
    )


def default_out(prompt: str, attention: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    return Path("outputs") / f"{slug}-{attention}.mp4"
