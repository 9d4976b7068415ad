"""Record q, k, v of a dense run's self-attention calls, for offline studies of sparse methods.

    python scripts/capture_qkv.py --model tiny --out /tmp/qkv-tiny.pt              # every step and layer
    python scripts/capture_qkv.py --model DIR --frames 97 --height 128 --width 128 --dtype float16 --out /tmp/qkv-long.pt
    python scripts/capture_qkv.py --model tiny --steps 6 --layers 1,4 --heads 0 --branch cond \\
        --dtype float16 --out tests/methods/data/svg2_sample.pt                    # the sample the tests ship

The pipeline runs with ``accelerate(pipe, attention="dense")`` and an observer (``handle.observe``): the
run stays the dense run, bit for bit, and every call it sees at the chosen steps and layers is kept as
``{"layer", "step", "branch", "q", "k", "v"}`` with tensors (B, H, N, D). The file also holds the
call's ``layout`` (frames, height, width, text tokens) and the run's settings. Written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def int_list(text: str, flag: str) -> list[int] | None:
    """'3,6,9' -> [3, 6, 9]; 'all' -> None (every one)."""
    if text == "all":
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag}={text!r}: expected comma-separated integers or 'all'") from None
    if any(v < 0 for v in values):
        raise SystemExit(f"{flag}={text!r}: values must be >= 0")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, a local pipeline directory or a diffusers id")
    p.add_argument("--prompt", default="a red square moving right on a plain background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-steps", type=int, default=None, help="denoising steps (default: the model config's)")
    for size in ("frames", "height", "width"):
        p.add_argument(f"--{size}", type=int, default=None, help=f"video {size} (default: the model config's)")
    p.add_argument("--steps", default="all", help="steps to record, e.g. 3,6,9 (default: all)")
    p.add_argument("--layers", default="all", help="layers to record, e.g. 0,3 (default: all)")
    p.add_argument("--heads", default="all", help="heads to keep, e.g. 0,2 (default: all)")
    p.add_argument("--branch", default=None, help="keep one CFG branch only (cond or uncond)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype of q, k, v")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.steps, args.layers = int_list(args.steps, "--steps"), int_list(args.layers, "--layers")
    args.heads = int_list(args.heads, "--heads")
    return args


class Capture:
    """The handle's observer: keeps the chosen calls' q, k, v (B, H, N, D) on the CPU."""

    def __init__(self, steps, layers, heads, branch, dtype):
        self.steps, self.layers, self.heads, self.branch, self.dtype = steps, layers, heads, branch, dtype
        self.calls: list[dict] = []
        self.layout = None

    def __call__(self, ctx, q, k, v, out, forced_dense):
        if forced_dense or (self.steps is not None and ctx.step not in self.steps):
            return
        if (self.layers is not None and ctx.layer not in self.layers) or (self.branch and ctx.branch != self.branch):
            return
        if self.heads is not None and max(self.heads) >= q.shape[1]:
            raise SystemExit(f"--heads={self.heads}: this model has {q.shape[1]} heads")
        pick = (lambda t: t[:, self.heads]) if self.heads is not None else (lambda t: t)
        self.layout = dataclasses.asdict(ctx.layout)
        self.calls.append(dict(layer=ctx.layer, step=ctx.step, num_steps=ctx.num_steps, branch=ctx.branch,
                               **{name: pick(t).to("cpu", self.dtype).contiguous() for name, t in zip("qkv", (q, k, v))}))


@torch.no_grad()
def capture(args) -> dict:
    from vdit_sparse.generate import GenerateRequest, call_pipeline, resolve
    from vdit_sparse.integration import accelerate
    from vdit_sparse.loading import load_pipeline

    from vdit_sparse.errors import UserError
    from vdit_sparse.generate import check_video_size

    cfg = resolve(GenerateRequest(prompt=args.prompt, model=args.model, seed=args.seed, steps=args.num_steps,
                                  frames=args.frames, height=args.height, width=args.width))
    pipe = load_pipeline(cfg.model.name, device="cpu", dtype=torch.float32)
    try:
        check_video_size(pipe, int(cfg.model.frames), int(cfg.model.height), int(cfg.model.width))
    except UserError as e:
        raise SystemExit(f"capture_qkv: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    recorder = Capture(args.steps, args.layers, args.heads, args.branch, DTYPES[args.dtype])
    handle = accelerate(pipe, attention="dense")
    handle.observe(recorder)
    try:
        call_pipeline(pipe, cfg)
    finally:
        handle.remove()
    if not recorder.calls:
        raise SystemExit(f"--steps={args.steps} --layers={args.layers} --branch={args.branch}: no call matched")
    meta = dict(model=args.model, prompt=args.prompt, seed=args.seed, num_steps=int(cfg.model.steps),
                frames=int(cfg.model.frames), height=int(cfg.model.height), width=int(cfg.model.width),
                guidance_scale=float(cfg.model.guidance_scale), heads=args.heads, torch=str(torch.__version__))
    return dict(meta=meta, layout=recorder.layout, calls=recorder.calls)


def save(record: dict, path: Path) -> None:
    from vdit_sparse.atomicfile import atomic_write

    buffer = io.BytesIO()
    torch.save(record, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def load(path) -> dict:
    """A capture file: ``{"meta", "layout", "calls"}`` (see the module docstring)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    record = capture(args)
    save(record, args.out)
    size = args.out.stat().st_size / 2**20
    print(f"{len(record['calls'])} calls, layout {record['layout']}, {size:.2f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
