"""Benchmark block_sparse_attention against dense cuDNN SDPA and FlexAttention on one GPU.

    vdit-sparse bench --kernels                     # both Wan shapes, all densities: one table
    vdit-sparse bench --kernels --device cpu        # the CPU path against dense SDPA (kernels_cpu.py)
    vdit-sparse bench --kernels --shapes wan-1.3b-480p --densities 0.15 --patterns random
    python scripts/bench_kernels.py ...             # the same, from a checkout

Shapes: Wan2.1-1.3B 480p (H=12, N=32,760, D=128) and Wan2.1-14B 720p (H=40, N=75,600, D=128), bf16,
batch 1. Block masks are 128 x 128 over model order, random (each query block keeps a random share of
key blocks) or banded (a diagonal band). Every method gets the same mask; "ours" also runs with random
per-head token permutations (gathered inside the kernel). Times are triton.testing.do_bench medians;
TFLOP/s count only computed blocks (4 · pairs · D); ratios are against dense cuDNN from the same run.
"first call" is our first call per tuning key: Triton compile plus launch-config tuning, from an empty
config cache (a temporary VDIT_SPARSE_CACHE_DIR unless --keep-cache). "err" is our relative L2 error
against FlexAttention on the same mask (both bf16), a check that every tuned config is correct.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

from ..errors import argument_parser

SHAPES = {  # name: (heads, tokens, head dim)
    "wan-1.3b-480p": (12, 32760, 128),
    "wan-14b-720p": (40, 75600, 128),
}
BLOCK = 128


def parse_args(argv=None):
    p = argument_parser(prog="vdit-sparse bench --kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the CPU benchmark (kernels_cpu.py)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.3, 0.15, 0.08])
    p.add_argument("--patterns", nargs="+", default=["random", "banded"], choices=["random", "banded"])
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (e.g. when its compile is too slow)")
    p.add_argument("--no-perm", action="store_true", help="skip the runs with token permutations")
    p.add_argument("--keep-cache", action="store_true", help="use the normal config cache instead of an empty one")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    return p.parse_args(argv)


def random_mask(heads, nb, density, gen, device="cuda"):
    """(1, H, nb, nb) bool: each query block keeps round(density · nb) random key blocks."""
    keep = max(1, round(density * nb))
    order = torch.rand(heads, nb, nb, generator=gen, device=device).argsort(-1)[..., :keep]
    mask = torch.zeros(heads, nb, nb, dtype=torch.bool, device=device)
    return mask.scatter_(2, order, True)[None]


def banded_mask(heads, nb, density, device="cuda"):
    """(1, H, nb, nb) bool: |i - j| <= w, with w the smallest band reaching ``density``."""
    w = next(w for w in range(nb) if (nb * (2 * w + 1) - w * (w + 1)) / nb**2 >= density - 1e-9)
    i = torch.arange(nb, device=device)
    return ((i[:, None] - i[None, :]).abs() <= w).expand(1, heads, nb, nb)


def random_perms(groups, n, gen, device="cuda"):
    """(G, N) int32 random permutations: the worst case for gathers."""
    return torch.rand(groups, n, generator=gen, device=device).argsort(-1).to(torch.int32)


def flex_block_mask(mask, n):
    """FlexAttention's BlockMask for the same blocks, all marked full (no mask_mod work inside blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = mask.sum(-1, dtype=torch.int32)  # (1, H, nb)
    indices = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    args = (torch.zeros_like(counts), torch.zeros_like(indices), counts, indices)
    try:
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=BLOCK, seq_lengths=(n, n))
    except TypeError:  # a torch without seq_lengths: lengths then come from the inputs
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=BLOCK)


def bench(fn, rep):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def timed_first_call(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure(rows, row, fn, rep, dense_ms, flops, ref=None):
    """Time ``fn`` (first call, then do_bench median) into a new row; a failure becomes a row too."""
    try:
        out, first = timed_first_call(fn)
        ms = bench(fn, rep)
    except Exception as e:  # one failing method must not cost the rest of the table
        print(f"| {row['shape']} | {row['method']} | FAILED: {type(e).__name__}: {str(e)[:200]} |", flush=True)
        return None
    err = rel_l2(out, ref) if ref is not None else None
    rows.append(dict(row, ms=ms, tflops=flops / ms / 1e9, speedup=dense_ms / ms, first_s=first, err=err))
    print_table(rows[-1:], header=False)
    return out


def run_shape(name, args, rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from vdit_sparse.kernels import block_sparse_attention
    from vdit_sparse.plan import from_block_mask

    H, N, D = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    dense_flops = 4.0 * H * N * N * D

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return scaled_dot_product_attention(q, k, v)

    dense_ms = bench(cudnn, args.rep)
    rows.append(dict(shape=name, method="cuDNN SDPA (dense)", pattern="-", density=1.0, ms=dense_ms,
                     tflops=dense_flops / dense_ms / 1e9, speedup=1.0, first_s=None, err=None))
    print_table(rows[-1:], header=False)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    nb = math.ceil(N / BLOCK)
    for density in args.densities:
        for pattern in args.patterns if density < 1.0 else ["random"]:  # at 1.0 both are the full mask
            mask = random_mask(H, nb, density, gen) if pattern == "random" else banded_mask(H, nb, density)
            plan = from_block_mask(mask, (BLOCK, BLOCK), N)
            realised = float(plan.density().mean())
            flops = dense_flops * realised
            row = dict(shape=name, pattern=pattern, density=realised)
            flex_out = None
            if flex is not None:
                bm = flex_block_mask(mask, N)
                flex_out = measure(rows, dict(row, method="FlexAttention"), lambda: flex(q, k, v, block_mask=bm),
                                   args.rep, dense_ms, flops)
            measure(rows, dict(row, method="ours"), lambda: block_sparse_attention(q, k, v, plan),
                    args.rep, dense_ms, flops, ref=flex_out)
            if not args.no_perm:  # same work, rows and keys gathered through random per-head permutations
                perm = random_perms(H, N, gen)
                permuted = replace(plan, q_perm=perm, k_perm=perm)
                measure(rows, dict(row, method="ours + perm"), lambda: block_sparse_attention(q, k, v, permuted),
                        args.rep, dense_ms, flops)


def print_table(rows, header=True):
    cols = ("shape", "method", "pattern", "density", "ms", "TFLOP/s", "vs cuDNN", "first call s", "err")
    if header:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for r in rows:
        first = "-" if r["first_s"] is None else f"{r['first_s']:.1f}"
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        print(f"| {r['shape']} | {r['method']} | {r['pattern']} | {r['density']:.3f} | {r['ms']:.2f} | "
              f"{r['tflops']:.0f} | {r['speedup']:.2f}x | {first} | {err} |", flush=True)


def main(argv=None) -> int:
    from . import require_cuda

    if _wants_cpu(argv):
        from . import kernels_cpu

        return kernels_cpu.main(argv)
    args = parse_args(argv)
    require_cuda("--kernels")
    if not args.keep_cache:  # measure tuning from scratch; the user's cache stays untouched
        os.environ["VDIT_SPARSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdit_sparse_bench_")
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, batch 1")
    print("(rows as they finish; the full table follows)")
    print_table([], header=True)
    rows = []
    for name in args.shapes:
        run_shape(name, args, rows)
        torch.cuda.empty_cache()  # the shape's q, k, v died with run_shape
    print()
    print_table(rows)
    return 0


def _wants_cpu(argv) -> bool:
    """``--device cpu`` (or ``--device=cpu``) selects the CPU benchmark; this GPU one takes no --device."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return "--device=cpu" in argv or any(a == "--device" and argv[i + 1:i + 2] == ["cpu"] for i, a in enumerate(argv))
