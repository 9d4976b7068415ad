"""``vdit-sparse`` (also ``python -m vdit_sparse``): generate, and the commands that work so far."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


def _generate(args) -> int:
    from . import parallel
    from .flags import default_out, request_from_args
    from .generate import prepare, run_generation, sidecar
    from .atomicfile import atomic_write_json
    from .timing import set_threads
    from .video import check_output, sidecar_path, write_video

    req = request_from_args(args, args.prompt)
    set_threads(args.threads)
    out = Path(args.out) if args.out else default_out(args.prompt, args.attention)
    check_output(out, args.overwrite)  # refuse before any work, so nothing is half-done
    parallel.start(args.ulysses_degree, "generate")
    cfg, spec = prepare(req, parallel.degree())  # the run, resolved and checked once, before any model work
    result = run_generation(req, cfg=cfg, spec=spec, progress=parallel.is_main())
    if not parallel.is_main():  # every rank generated its share of the video; rank 0 writes it
        return 0
    result.config.update(out=str(out), overwrite=bool(args.overwrite))
    write_video(out, result.frames, fps=int(result.config["model"]["fps"]))
    atomic_write_json(sidecar_path(out), sidecar(result))
    print(f"wrote {out} ({result.frames.shape[0]} frames, {result.wall_s:.1f} s, density {result.density:.3f}) "
          f"and {sidecar_path(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .flags import add_generation_args

    from .errors import argument_parser

    parser = argument_parser(prog="vdit-sparse", description="Faster video diffusion transformers, measured against dense.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))
    gen = sub.add_parser("generate", help="make a video (embedded model by default)")
    gen.add_argument("prompt")
    gen.add_argument("--out", help="video path, .mp4 or .gif (default: outputs/<prompt>-<attention>.mp4)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_generation_args(gen)
    gen.set_defaults(run=_generate)
    for name, module in _EXTRA_COMMANDS.items():
        mod = _optional(module)
        if mod is not None:
            p = sub.add_parser(name, help=mod.HELP, add_help=False)
            p.add_argument("argv", nargs=argparse.REMAINDER)
            p.set_defaults(run=lambda a, m=mod: m.main(a.argv))
    return parser


# Commands appear in --help only once their module exists and works.
_EXTRA_COMMANDS = {"compare": "compare", "tune": "tune", "bench": "bench"}


def _optional(module: str):
    import importlib

    try:
        mod = importlib.import_module(f".{module}", __package__)
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.{module}":
            return None
        raise
    return mod if hasattr(mod, "main") and hasattr(mod, "HELP") else None


def _quiet_libraries() -> None:
    # diffusers/transformers log advice meant for library authors; the CLI shows only its own lines
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()  # "Loading pipeline components": our own bars say what runs
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return _guarded(lambda: _main(argv))


def _main(argv: list[str]) -> int:
    _quiet_libraries()  # imports diffusers: seconds, inside the guard so a Ctrl-C here is one line too
    from .flags import parse_generation_args

    if argv and argv[0] in _EXTRA_COMMANDS and _optional(_EXTRA_COMMANDS[argv[0]]) is not None:
        # these commands parse their own flags (argparse would not hand a leading option through)
        return _optional(_EXTRA_COMMANDS[argv[0]]).main(argv[1:])
    args = parse_generation_args(build_parser(), argv)
    return args.run(args)


def _one_line_warning(message, category, filename, lineno, file=None, line=None, _default=None):
    """Our own warnings (a deprecated key, say) as one line for a command-line user; others as Python shows them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"vdit-sparse: warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def _guarded(run) -> int:
    """Run a command; bad input becomes one line on stderr and exit code 2, and our warnings one line each."""
    import functools
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_one_line_warning, _default=warnings.showwarning)
            return run() or 0
    except (UserError, ValueError) as e:
        if os.environ.get("VDIT_SPARSE_DEBUG"):
            raise
        print(f"vdit-sparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vdit-sparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
