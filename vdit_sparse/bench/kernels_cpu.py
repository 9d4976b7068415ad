"""Benchmark the CPU path of block_sparse_attention against torch's fused dense SDPA on the same CPU.

    vdit-sparse bench --kernels --device cpu                   # N 1,792 / 4,096 / 16,384, D 32 / 64, 1 and 2 threads
    vdit-sparse bench --kernels --device cpu --sizes 4096 --head-dims 32 --threads 1 --repeats 5

Inputs are (1, H, N, D) float32 (``--dtype`` for bf16), H = 6 by default, like the embedded model's
attention. Plans are random 64 × 64 block masks over model order: each query block keeps
round(density · nb) key blocks, so the realised density is the asked one up to a block. Every repeat
times dense SDPA and then the sparse call back to back (wall time, one call each), so both see the same
load; the table gives the median of the per-repeat ratios and their range. "+ stats" also returns the
tile statistics (what tile-skip asks on every call). At N >= 16,384 each point runs ``--long-repeats``
times (default 1): a dense call there takes seconds.

The compiled loop (kernels/cpu_compiled.py) is built first, into an empty cache directory unless
``--keep-cache``, and its build time is printed apart. A second table gives the planning costs at
N >= 4,096 as a share of one dense call: svg's row profiling (``SVG.plan``, N/256 frames of 16 x 16)
and tile-skip's statistics and mark updates (a non-refresh ``run_with_tileskip`` call minus the same
plan run without statistics).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from ..errors import UserError, argument_parser

BLOCK = 64


def parse_args(argv=None):
    p = argument_parser(prog="vdit-sparse bench --kernels --device cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu"], default="cpu")
    p.add_argument("--sizes", nargs="+", type=int, default=[1792, 4096, 16384], help="token counts N")
    p.add_argument("--head-dims", nargs="+", type=int, default=[32, 64])
    p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="dense/sparse pairs timed per point")
    p.add_argument("--long-repeats", type=int, default=1, help="pairs per point at N >= 16,384")
    p.add_argument("--no-stats", action="store_true", help="skip the timing with tile statistics")
    p.add_argument("--no-planning", action="store_true", help="skip the planning-cost table")
    p.add_argument("--keep-cache", action="store_true", help="use the normal build cache instead of an empty one")
    args = p.parse_args(argv)
    counts = {"sizes": args.sizes, "head-dims": args.head_dims, "threads": args.threads, "repeats": [args.repeats],
              "long-repeats": [args.long_repeats], "heads": [args.heads]}
    for name, values in counts.items():
        if any(v < 1 for v in values):
            raise UserError(f"bench --kernels --device cpu: --{name} {' '.join(map(str, values))}: every value must be an int >= 1")
    if any(not 0 < d <= 1 for d in args.densities):
        raise UserError(f"bench --kernels --device cpu: --densities {' '.join(map(str, args.densities))}: each must lie in (0, 1]")
    return args


def random_plan(heads: int, n: int, density: float, gen: torch.Generator):
    """A BlockPlan over (1, heads) of random 64 x 64 blocks: each query block keeps round(density · nb) key blocks."""
    from vdit_sparse.plan import from_block_mask

    nb = -(-n // BLOCK)
    keep = max(1, round(density * nb))
    order = torch.rand(heads, nb, nb, generator=gen).argsort(-1)[..., :keep]
    mask = torch.zeros(heads, nb, nb, dtype=torch.bool).scatter_(2, order, True)
    return from_block_mask(mask[None], (BLOCK, BLOCK), n)


def wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_point(q, k, v, plan, repeats: int, stats: bool) -> dict:
    """Per repeat: dense, sparse (and sparse + stats), back to back. Ratios are dense / sparse."""
    from torch.nn.functional import scaled_dot_product_attention

    from vdit_sparse.kernels import block_sparse_attention

    calls = {"sparse": lambda: block_sparse_attention(q, k, v, plan)}
    if stats:
        calls["stats"] = lambda: block_sparse_attention(q, k, v, plan, tile_stats=True)
    dense = lambda: scaled_dot_product_attention(q, k, v)  # noqa: E731
    for fn in (dense, *calls.values()):  # warm-up: allocator, first-call costs
        fn()
    times = {"dense": [], **{name: [] for name in calls}}
    for _ in range(repeats):
        times["dense"].append(wall(dense))
        for name, fn in calls.items():
            times[name].append(wall(fn))
    row = {"dense_ms": 1e3 * statistics.median(times["dense"])}
    for name in calls:
        ratios = [d / s for d, s in zip(times["dense"], times[name])]
        row[name] = (1e3 * statistics.median(times[name]), statistics.median(ratios), min(ratios), max(ratios))
    return row


def print_row(r, header=False):
    if header:
        print("| threads | N | D | density | dense ms | sparse ms | speed-up (range) | + stats ms | speed-up (range) |")
        print("|---|---|---|---|---|---|---|---|---|")
    if r is None:
        return
    cells = [str(r["threads"]), f"{r['n']:,}", str(r["d"]), f"{r['density']:.3f}", f"{r['dense_ms']:.0f}"]
    for name in ("sparse", "stats"):
        if name in r:
            ms, med, lo, hi = r[name]
            cells += [f"{ms:.0f}", f"{med:.2f}x ({lo:.2f}-{hi:.2f})"]
        else:
            cells += ["-", "-"]
    print("| " + " | ".join(cells) + " |", flush=True)


def report_build() -> None:
    from vdit_sparse.kernels import cpu_compiled

    built = cpu_compiled.extension() is not None
    state = f"built in {cpu_compiled.compile_seconds():.1f} s (once per machine; cached)" if built else "not available"
    print(f"# compiled loop: {state}")


def planning_rows(args, threads: int) -> None:
    """svg's profiling and tile-skip's bookkeeping as shares of one dense call, at N >= 4,096."""
    from torch.nn.functional import scaled_dot_product_attention

    from vdit_sparse.kernels import block_sparse_attention
    from vdit_sparse.layout import VideoLayout
    from vdit_sparse.methods import AttentionContext
    from vdit_sparse.methods.svg import SVG
    from vdit_sparse.tileskip import run_with_tileskip

    torch.set_num_threads(threads)
    print()
    print("| threads | N | D | planning step | ms | dense ms | share of dense (range) |")
    print("|---|---|---|---|---|---|---|")
    for n in (n for n in args.sizes if n >= 4096 and n % 256 == 0):
        layout = VideoLayout(frames=n // 256, height=16, width=16)
        repeats = args.long_repeats if n >= 16384 else args.repeats
        for d in args.head_dims:
            gen = torch.Generator().manual_seed(n + d)
            q, k, v = (torch.randn(1, args.heads, n, d, generator=gen) for _ in range(3))
            ctx, svg = AttentionContext(layout=layout, step=5), SVG()
            settings = SVG.Settings()
            plan, _ = svg.plan(q, k, ctx, settings)
            state: dict = {}
            tileskip = lambda: run_with_tileskip(q, k, v, plan, state, step=3, num_steps=20, threshold=-14.4, refresh_every=10**9)  # noqa: E731
            tileskip()  # the first call builds the marks (a refresh); the timed ones reuse them
            dense, profile, ts, plain = [], [], [], []
            for _ in range(repeats):
                dense.append(wall(lambda: scaled_dot_product_attention(q, k, v)))
                profile.append(wall(lambda: svg.plan(q, k, ctx, settings)))
                ts.append(wall(tileskip))
                plain.append(wall(lambda: block_sparse_attention(q, k, v, plan, reverse=True)))
            extra = [t - p for t, p in zip(ts, plain)]
            for name, times in (("svg row profiling (SVG.plan)", profile), ("tile-skip stats + marks", extra)):
                shares = [t / dn for t, dn in zip(times, dense)]
                print(f"| {threads} | {n:,} | {d} | {name} | {1e3 * statistics.median(times):.0f} | {1e3 * statistics.median(dense):.0f} | "
                      f"{statistics.median(shares):.1%} ({min(shares):.1%} to {max(shares):.1%}) |", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not args.keep_cache:  # time the build from scratch; the user's cache stays untouched
        os.environ["VDIT_SPARSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdit_sparse_bench_")
    report_build()
    print(f"# CPU kernel benchmark: torch {torch.__version__}, {args.dtype}, batch 1, {args.heads} heads, "
          f"{BLOCK}x{BLOCK} random block masks; ratios are dense SDPA / block_sparse_attention, same run")
    print_row(None, header=True)
    threads_before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.sizes:
                repeats = args.long_repeats if n >= 16384 else args.repeats
                for d in args.head_dims:
                    gen = torch.Generator().manual_seed(n * 131 + d)
                    q, k, v = (torch.randn(1, args.heads, n, d, generator=gen).to(dtype) for _ in range(3))
                    for density in args.densities:
                        plan = random_plan(args.heads, n, density, gen)
                        row = measure_point(q, k, v, plan, repeats, stats=not args.no_stats)
                        print_row(dict(row, threads=threads, n=n, d=d, density=float(plan.density().mean())))
        if not args.no_planning:
            planning_rows(args, args.threads[0])
    finally:
        torch.set_num_threads(threads_before)
    return 0
