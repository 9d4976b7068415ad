"""svg2's steady-state planning cost against one dense attention call, on the CPU.

    OMP_NUM_THREADS=1 python scripts/bench_svg2_planning.py --tokens 4096 8192 --heads 12 --dim 64 --repeats 7

Per shape: the warm-started plan (``kmeans_iters_step`` iterations from the previous call's centroids, the
cluster-mass estimate, the selection and the plan) and a dense SDPA call of the same q, k, v, timed alternately
``--repeats`` times after one untimed round (the cold k-means). Prints the median planning / dense ratio, its
spread (min-max of the per-round ratios) and the median milliseconds of each; ``--profile`` adds where one warm
plan spends its time, by function of svg2 and by torch operator.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an svg2 setting (repeatable)")
    p.add_argument("--profile", action="store_true", help="profile one more warm plan per shape")
    return p.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def structured_qkv(n, heads, dim, gen):
    """q, k, v (1, H, N, D) with some cluster structure: tokens around 64 centres per head, plus noise."""
    centres = torch.randn(heads, 64, dim, generator=gen)
    labels = torch.randint(0, 64, (heads, n), generator=gen)
    around = torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim))
    q, k, v = (around + torch.randn(heads, n, dim, generator=gen) for _ in range(3))
    return q[None], k[None], v[None]


def bench(n, args, settings):
    from vdit_sparse.layout import VideoLayout
    from vdit_sparse.methods import AttentionContext, get_method
    from vdit_sparse.methods import settings_for

    frames = max(1, n // 256)
    layout = VideoLayout(frames=frames, height=16, width=n // (16 * frames))
    q, k, v = structured_qkv(layout.num_tokens, args.heads, args.dim, torch.Generator().manual_seed(0))
    method, params = get_method("svg2")(), settings_for("svg2", settings)
    ctx = AttentionContext(layout=layout, state={})
    method.plan(q, k, ctx, params)  # the cold start, untimed
    ratios, plan_ms, dense_ms = [], [], []
    for i in range(args.repeats):
        jitter = [t + 0.01 * torch.randn_like(t) for t in (q, k)]  # the next step's q, k: a little moved
        runs = [("plan", lambda: method.plan(*jitter, ctx, params)),
                ("dense", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))]
        for name, fn in (runs if i % 2 == 0 else runs[::-1]):  # alternate which goes first
            (plan_ms if name == "plan" else dense_ms).append(timed(fn)[1])
        ratios.append(plan_ms[-1] / dense_ms[-1])
    if args.profile:
        profile(lambda: method.plan(q, k, ctx, params))
    return dict(tokens=layout.num_tokens, dense_ms=statistics.median(dense_ms), plan_ms=statistics.median(plan_ms),
                ratio=statistics.median(ratios), spread=(min(ratios), max(ratios)))


def profile(fn, rows: int = 12):
    """Print the cumulative time of the package's functions and the self time of torch's operators in fn()."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stats = cProfile.Profile()
    stats.runcall(fn)
    pstats.Stats(stats).sort_stats("cumulative").print_stats(r"vdit_sparse|kernels", rows)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    args = parse_args(argv)
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), heads {args.heads}, dim {args.dim}, "
          f"svg2 {settings or 'defaults'}")
    for n in args.tokens:
        r = bench(n, args, settings)
        print(f"N={r['tokens']}: dense {r['dense_ms']:.1f} ms, warm plan {r['plan_ms']:.1f} ms, plan/dense "
              f"{r['ratio']:.3f} (spread {r['spread'][0]:.3f}-{r['spread'][1]:.3f})")


if __name__ == "__main__":
    main()
