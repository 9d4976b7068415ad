"""Measure the cost model of ``vdit-sparse tune`` on one GPU: ms per computed block at each density.

    vdit-sparse bench --cost-model --out configs/cost_model.json            # Wan shapes, bf16
    vdit-sparse bench --cost-model --shapes tiny --device cpu --dtype float32 --repeats 2 --out /tmp/c.json
    python scripts/bench_cost_model.py ...                                  # the same, from a checkout

Per shape (batch 1, ``heads`` heads of ``tokens`` tokens, head dim ``head_dim``) it times, with the
same entry points a tuned run uses:

- ``dense_ms``: dense attention through torch SDPA (what a dense layer runs);
- ``kernel``: the block-sparse kernel through its custom op (``run_plan``) on banded block plans
  (svg's own band, built by ``svg.band_mask``) at each density; each point stores the realised
  density, the computed blocks and ``ms_per_block``, the number ``tune`` interpolates;
- ``planning_ms``: one steady-state planning call of svg and of svg2 (k-means warm-started, as at
  every step after the first sparse one), which a sparse layer pays on top of its kernel.

Times are medians of ``--repeats`` runs after ``--warmup`` runs (CUDA events on GPU). The JSON's
format is read by ``vdit_sparse.tune.cost.load_cost_model``; ``tune`` picks it up from
``configs/cost_model.json`` or ``--cost-model PATH``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from ..errors import argument_parser

SHAPES = {  # name: (heads, tokens, head dim)
    "wan-1.3b-480p": (12, 32760, 128),
    "wan-14b-720p": (40, 75600, 128),
    "hunyuan-720p": (24, 119056, 128),
    "tiny": (6, 448, 32),  # the embedded model at its default 25 frames x 128 x 128 (7 x 8 x 8 tokens)
}
DENSITIES = (0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def parse_args(argv=None):
    p = argument_parser(prog="vdit-sparse bench --cost-model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON to write (e.g. configs/cost_model.json)")
    p.add_argument("--shapes", nargs="+", default=["wan-1.3b-480p", "wan-14b-720p"], choices=list(SHAPES))
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--block-size", type=int, default=64, help="tokens per band block (the block_size setting)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def timed_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``; the warm-up runs absorb compilation and autotuning."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layout_for(tokens: int):
    """A video layout of ``tokens`` tokens, frame-major, near Wan's aspect: only the count matters to the kernel."""
    from vdit_sparse import VideoLayout

    for frames in (21, 33, 5, 3, 1):
        if tokens % frames == 0:
            per = tokens // frames
            h = int(math.isqrt(per))
            while per % h:
                h -= 1
            return VideoLayout(frames=frames, height=h, width=per // h)
    return VideoLayout(frames=1, height=1, width=tokens)


def band_plan(heads: int, tokens: int, block: int, density: float, device):
    """svg's spatial band at ``density`` over ``tokens`` tokens, the same mask for every head."""
    from vdit_sparse.methods.svg import band_mask
    from vdit_sparse.plan import from_block_mask

    mask = band_mask(tokens, block, 0, density * tokens * tokens, device)  # (nb, nb)
    return from_block_mask(mask.expand(1, heads, -1, -1).contiguous(), (block, block), tokens), int(mask.sum()) * heads


def kernel_points(q, k, v, args, device) -> list[dict]:
    from vdit_sparse.kernels.ops import run_plan

    heads, tokens, dim = q.shape[1], q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dim)
    points = []
    for d in sorted(args.densities):
        plan, blocks = band_plan(heads, tokens, args.block_size, d, device)
        ms = timed_ms(lambda: run_plan(q, k, v, plan, scale), device, args.repeats, args.warmup)
        realised = float(plan.density().mean())
        points.append({"requested": d, "density": realised, "blocks": blocks, "ms": ms, "ms_per_block": ms / blocks})
        print(f"  kernel density {realised:.3f}: {ms:.3f} ms, {ms / blocks * 1e3:.3f} us per block", flush=True)
    return points


def planning_ms(q, k, v, args, device) -> dict:
    from vdit_sparse.methods import AttentionContext, get_method, sparse_methods
    from vdit_sparse.methods import settings_for

    layout = layout_for(q.shape[2])
    out = {}
    for name in sparse_methods():
        ctx = AttentionContext(layout=layout, step=1, num_steps=50)
        params = settings_for(name, {"density": 0.2, "block_size": args.block_size})
        method = get_method(name)()
        method.plan(q, k, ctx, params, v=v)  # the first call: cold k-means, masks built; not the steady state
        out[name] = timed_ms(lambda: method.plan(q, k, ctx, params, v=v), device, args.repeats, args.warmup)
        print(f"  planning {name}: {out[name]:.3f} ms", flush=True)
    return out


def measure_shape(name: str, args, device, dtype) -> dict:
    heads, tokens, dim = SHAPES[name]
    print(f"{name}: {heads} heads x {tokens} tokens x {dim}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    dense = timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, args.repeats, args.warmup)
    print(f"  dense SDPA: {dense:.3f} ms", flush=True)
    return {
        "name": name, "groups": heads, "tokens": tokens, "head_dim": dim, "block_size": args.block_size,
        "dense_ms": dense, "planning_ms": planning_ms(q, k, v, args, device), "kernel": kernel_points(q, k, v, args, device),
    }


def main(argv=None) -> int:
    from vdit_sparse.atomicfile import atomic_write_json
    from vdit_sparse.generate import versions
    from vdit_sparse.tune.cost import FORMAT, load_cost_model

    from . import require_cuda

    args = parse_args(argv)
    if args.device.startswith("cuda"):
        require_cuda("--cost-model")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = [measure_shape(name, args, device, dtype) for name in args.shapes]
    data = {
        "format": FORMAT,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "repeats": args.repeats,
        "shapes": shapes,
    }
    atomic_write_json(args.out, data)
    load_cost_model(args.out)  # what tune will read: fail here, not there
    print(f"wrote {args.out}")
    return 0
