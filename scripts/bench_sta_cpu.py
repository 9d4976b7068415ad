"""sta against svg and svg2 at equal density on the embedded model, on a CPU: quality and pipeline speed-up.

    python scripts/bench_sta_cpu.py --out bench-sta.json                 # 3 held-out prompts, the first timed
    python scripts/bench_sta_cpu.py --out bench-sta.json --summary       # print the table of a finished run
    python scripts/bench_sta_cpu.py --out per-call.json --per-call 200   # one attention call: sta against dense SDPA

For every prompt: the dense video and every setting's video; on the first ``--timed`` prompts, also R pairs of
(dense run, accelerated run) one after the other, in one process with one torch thread; the speed-up is the median
over those pairs of dense wall / accelerated wall, with its spread (low, high). PSNR / SSIM against the dense video of the same seed, prompt following
of the accelerated videos (colour, motion, count), realised density (warm-up steps included) and attention time.
Settings are grouped by the density they realise on their sparse steps (sta's windows: 0.128 / 0.25 / 0.51 at 448
tokens with 4 x 4 x 4 tiles); svg and svg2 get the same density.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SETTINGS = [  # (label, attention, settings)
    ("sta window (0,0,0)", "sta", {"window": (0, 0, 0)}),
    ("svg density 0.128", "svg", {"density": 0.128}),
    ("svg2 density 0.128", "svg2", {"density": 0.128}),
    ("sta window (1,0,0) (default)", "sta", {}),
    ("sta window (0,1,0)", "sta", {"window": (0, 1, 0)}),
    ("sta window (0,0,1)", "sta", {"window": (0, 0, 1)}),
    ("svg density 0.25", "svg", {"density": 0.25}),
    ("svg2 density 0.25", "svg2", {"density": 0.25}),
    ("sta window (1,1,0)", "sta", {"window": (1, 1, 0)}),
    ("sta window (0,1,1)", "sta", {"window": (0, 1, 1)}),
    ("svg density 0.5", "svg", {"density": 0.5}),
    ("svg2 density 0.5", "svg2", {"density": 0.5}),
]


def run(pipe, prompt: str, attention: str, settings: dict, steps: int):
    from vdit_sparse.generate import GenerateRequest, run_generation

    req = GenerateRequest(prompt=prompt, attention=attention, settings=settings, steps=steps)
    return run_generation(req, pipe=pipe, progress=False)


def measure(pipe, prompts: list[str], timed: int, repeats: int, steps: int) -> list[dict]:
    """Quality of every setting on ``prompts``; speed-up on the first ``timed`` of them, ``repeats`` pairs each."""
    from vdit_sparse.quality import psnr, ssim
    from vdit_sparse.quality.prompt_following import prompt_following

    rows = {label: {"label": label, "attention": a, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                    "ratios": [], "psnr": [], "ssim": [], "density": [], "attention_ms": [], "dense_attention_ms": [],
                    "following": []} for label, a, s in SETTINGS}
    dense_following = []
    for i, prompt in enumerate(prompts):
        reference = run(pipe, prompt, "dense", {}, steps)
        dense_following.append(prompt_following(reference.frames, prompt))
        for label, attention, settings in SETTINGS:
            row = rows[label]
            fast = run(pipe, prompt, attention, settings, steps)
            row["psnr"].append(psnr(reference.frames, fast.frames))
            row["ssim"].append(ssim(reference.frames, fast.frames))
            row["density"].append(fast.density)
            row["following"].append(prompt_following(fast.frames, prompt))
            for _ in range(repeats if i < timed else 0):  # dense, then accelerated: the pair shares the machine's load
                dense, fast = run(pipe, prompt, "dense", {}, steps), run(pipe, prompt, attention, settings, steps)
                row["ratios"].append(dense.wall_s / fast.wall_s)
                row["attention_ms"].append(fast.attention_ms)
                row["dense_attention_ms"].append(dense.attention_ms)
            timing = f"x{statistics.median(row['ratios']):.2f}" if row["ratios"] else "untimed"
            print(f"{prompt[:40]:40s} {label:30s} {timing} {row['psnr'][-1]:.1f} dB density {row['density'][-1]:.3f}", flush=True)
    return [summarise(row) for row in rows.values()] + [{"label": "dense", "following": rates(dense_following)}]


def per_call(repeats: int) -> dict:
    """One self-attention call at the embedded model's shape (6 heads x 32 dims, 7 x 8 x 8 tokens), alternated:
    dense SDPA, sta's default plan through the kernel op, and the same plan without its permutation."""
    import dataclasses
    import math

    import torch.nn.functional as F

    from vdit_sparse import VideoLayout
    from vdit_sparse.kernels.ops import run_plan
    from vdit_sparse.methods.sta import build_plan, default_window

    layout = VideoLayout(frames=7, height=8, width=8)
    q, k, v = (torch.randn(1, 6, layout.num_tokens, 32) for _ in range(3))
    plan = build_plan(layout, (4, 4, 4), default_window(layout, (4, 4, 4)), 1, 6)
    calls = {"dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
             "sta": lambda: run_plan(q, k, v, plan, 1 / math.sqrt(32)),
             "sta, permutation removed": lambda: run_plan(q, k, v, dataclasses.replace(plan, q_perm=None, k_perm=None), 1 / math.sqrt(32))}
    for call in calls.values():  # first calls: allocations and dispatch caches, untimed
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratios = {name: sorted(a / b for a, b in zip(times[name], times["dense SDPA"])) for name in calls}
    return {name: {"ms": statistics.median(times[name]), "ratio_to_dense": statistics.median(r), "spread": [r[0], r[-1]]}
            for name, r in ratios.items()}


def rates(results: list[dict]) -> dict:
    from vdit_sparse.quality.prompt_following import accuracy_of

    acc = accuracy_of(results)
    return {k: acc[f"{k}_accuracy"] for k in ("colour", "motion", "count")}


def summarise(row: dict) -> dict:
    ratios = sorted(row["ratios"]) or [float("nan")]
    return {
        "label": row["label"], "attention": row["attention"], "settings": row["settings"],
        "speedup": statistics.median(ratios), "speedup_spread": [ratios[0], ratios[-1]], "pairs": len(ratios),
        "psnr": statistics.mean(row["psnr"]), "ssim": statistics.mean(row["ssim"]),
        "density": statistics.mean(row["density"]), "attention_ms": statistics.median(row["attention_ms"] or [float("nan")]),
        "dense_attention_ms": statistics.median(row["dense_attention_ms"] or [float("nan")]), "following": rates(row["following"]),
    }


def table(result: dict) -> str:
    lines = ["| setting | speed-up (median, spread) | attention ms (dense) | PSNR dB | SSIM | density | colour / motion / count |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = r["following"]
        following = " / ".join(f"{f[k]:.2f}" if f[k] is not None else "—" for k in ("colour", "motion", "count"))
        if r["label"] == "dense":
            lines.append(f"| dense | 1 | | | | 1 | {following} |")
            continue
        lo, hi = r["speedup_spread"]
        lines.append(f"| {r['label']} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['attention_ms']:.0f} ({r['dense_attention_ms']:.0f}) "
                     f"| {r['psnr']:.1f} | {r['ssim']:.3f} | {r['density']:.3f} | {following} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the results (JSON)")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts for quality (default 3)")
    p.add_argument("--timed", type=int, default=1, help="of which timed (default the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed (dense, accelerated) pairs per timed prompt and setting")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--summary", action="store_true", help="print the table of --out")
    p.add_argument("--per-call", type=int, metavar="N", help="instead: N alternated single attention calls")
    args = p.parse_args(argv)
    if args.summary:
        print(table(json.loads(args.out.read_text())))
        return 0
    if args.per_call:
        torch.set_num_threads(1)
        load = os.getloadavg()[0]
        result = {"per_call": per_call(args.per_call), "calls": args.per_call, "load_before": load, "load_after": os.getloadavg()[0]}
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0
    from vdit_sparse import shapes_world
    from vdit_sparse.generate import versions
    from vdit_sparse.loading import load_pipeline

    torch.set_num_threads(1)
    heldout = shapes_world.heldout_prompts()
    prompts = heldout[:: max(1, len(heldout) // args.prompts)][: args.prompts]
    pipe = load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    run(pipe, prompts[0], "dense", {}, 1)  # first call's one-off costs stay out of the timings
    started, load = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.getloadavg()[0]
    rows = measure(pipe, prompts, args.timed, args.repeats, args.steps)
    result = {"prompts": prompts, "timed_prompts": prompts[: args.timed], "steps": args.steps, "repeats": args.repeats, "threads": 1, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": load,
              "load_after": os.getloadavg()[0], "versions": versions(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
