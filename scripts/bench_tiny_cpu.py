"""The CPU figures of BENCHMARKS.md on the embedded model: every command, run one after the other, summarised.

    python scripts/bench_tiny_cpu.py --out bench-cpu            # all experiments (about 25 minutes on 2 cores)
    python scripts/bench_tiny_cpu.py --out bench-cpu --only caches --prompts 4
    python scripts/bench_tiny_cpu.py --out bench-cpu --summary  # print the tables of what is there
    python scripts/bench_tiny_cpu.py --out bench-long --model tiny-long --only defaults --prompts 3 --threads 1

    python scripts/bench_tiny_cpu.py --out bench-cpu --only caches --repeats 5 --threads 1

Each experiment is one ``vdit-sparse compare`` (or ``tune``) command on held-out prompts of the shapes
world; its report folder lands under ``--out``. Speed-ups come from compare itself: the dense reference and
the accelerated run timed alternately, ``--repeats`` times each after a warm-up, in the same process; the
summary carries each speed-up's range and how many of its timings were reliable (compare's metrics.json).
Run it on an otherwise idle machine and note the load printed at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEP_CACHES = ("fbcache", "magcache", "taylorseer", "pab", "seacache")
THRESHOLD_SWEEPS = {"magcache": "0.02,0.03,0.04", "fbcache": "0.1,0.2,0.3", "seacache": "0.4,0.6"}


def experiments(prompts: Path, magcache: Path, steps: int, timing: tuple = (),
                tileskip: tuple = ("-3,-2,-1.5,-1", "16")) -> dict[str, list[list[str]]]:
    """name -> the commands (argv after ``vdit-sparse``) of one experiment; ``magcache``: ratios measured at ``steps``;
    ``timing``: flags for every compare (--repeats N, --threads N); ``tileskip``: the (thresholds, block sizes) swept."""
    common = ["--prompts", str(prompts), "--no-lpips", "--steps", str(steps), *timing]
    sweep_caches = ",".join(STEP_CACHES)
    return {
        "defaults": [["compare", *common, "--attention", "svg", "--sweep", "attention=svg,svg2,sta", "--report", "{out}/defaults"],
                     ["compare", *common, "--attention", "dense", "--cache", "tileskip", "--report", "{out}/tileskip"]],
        "density": [["compare", *common, "--attention", "svg", "--sweep", "attention=svg,svg2,sta",
                     "--sweep", "density=0.5,0.35,0.25,0.15", "--report", "{out}/density"],
                    # tile-skip above its default threshold, at smaller blocks: where it starts to skip here
                    ["compare", *common, "--attention", "dense", "--cache", "tileskip", "--sweep", f"threshold={tileskip[0]}",
                     "--sweep", f"block_size={tileskip[1]}", "--report", "{out}/tileskip-sweep"]],
        "tune": [["tune", "--attention", "svg", "--target-psnr", str(t), "--holdout", str(prompts), "--steps", str(steps),
                  *timing, "--overwrite", "--out", f"{{out}}/tuned/svg-{t}.yaml"] for t in (22, 24, 26)]
                + [["tune", "--attention", "svg2", "--knob", "density", "--target-psnr", "26", "--holdout", str(prompts),
                    "--steps", str(steps), "--overwrite", "--out", "{out}/tuned/svg2-26.yaml"]]
                # each layer's error weighed by the video error it causes
                + [["tune", "--attention", m, *knob, "--target-psnr", str(t), "--holdout", str(prompts), "--steps", str(steps),
                    "--layer-sensitivity", "--overwrite", "--out", f"{{out}}/tuned/{m}-{t}-sensitivity.yaml"]
                   for m, t, knob in (("svg", 22, []), ("svg", 24, []), ("svg2", 26, ["--knob", "density"]))],
        "caches": [
            ["compare", *common, "--attention", "dense", "--sweep", f"cache={sweep_caches}", "--tuned", str(magcache),
             "--report", f"{{out}}/caches-{steps}"],
            ["compare", *common, "--attention", "svg2", "--sweep", f"cache={sweep_caches}", "--tuned", str(magcache),
             "--report", f"{{out}}/caches-svg2-{steps}"],
            ["compare", *common, "--attention", "dense", "--sweep", "cache=" + ",".join(f"tileskip+{c}" for c in STEP_CACHES),
             "--tuned", str(magcache), "--report", f"{{out}}/caches-tileskip-{steps}"],
            # the thresholds of the caches that decide from the run, below and above their defaults
            *[["compare", *common, "--attention", "dense", "--cache", cache,
               *(["--tuned", str(magcache)] if cache == "magcache" else []),  # the ratios serve MagCache alone
               "--sweep", f"{cache}.threshold={values}", "--report", f"{{out}}/sweep-{cache}-{steps}"]
              for cache, values in THRESHOLD_SWEEPS.items()],
        ],
    }


def run(argv: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    print("+ vdit-sparse " + " ".join(argv), flush=True)
    with open(log, "a") as f:
        f.write("+ vdit-sparse " + " ".join(argv) + "\n")
        f.flush()
        code = subprocess.call([sys.executable, "-m", "vdit_sparse", *argv], stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"failed ({code}): vdit-sparse {' '.join(argv)}; see {log}")
    return time.perf_counter() - t0


def summary(out: Path) -> str:
    """A markdown table per report folder under ``out``: speed-up, PSNR, SSIM, density, computed, prompt following."""
    lines = []
    for metrics_path in sorted(out.glob("*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        machine = m.get("machine", {})
        timing = f", {machine['threads']} thread(s), --repeats {machine['repeats']}" if machine.get("repeats") else ""
        lines += [f"### {metrics_path.parent.name} (load {machine.get('load_before')} -> {machine.get('load_after')}{timing})", "",
                  "| setting | speed-up | PSNR dB | SSIM | density | computed | colour / motion / count (acc.) | (dense) |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = m.get("sweep") or [{"label": "(one setting)", "mean": m["mean"]}]
        for row in rows:
            e = row["mean"]
            pf, ref = e.get("prompt_following") or {}, e.get("prompt_following_reference") or {}
            cells = [row["label"], _speed(e), "identical" if e.get("identical") else _f(e.get("psnr")),
                     _f(e.get("ssim")), _f(e.get("density")), _f(e.get("computed_share")),
                     " / ".join(_f(pf.get(k)) for k in ("colour_ok", "motion_ok", "count_ok")),
                     " / ".join(_f(ref.get(k)) for k in ("colour_ok", "motion_ok", "count_ok"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    tuned = sorted(out.glob("tuned/*.report.json"))
    if tuned:
        lines += ["### tune: the tuned table against a uniform setting of equal predicted cost (held-out prompts)", "",
                  "| table | target dB | per-layer settings | uniform | tuned PSNR | uniform PSNR | gain dB | density |",
                  "|---|---|---|---|---|---|---|---|"]
        for path in tuned:
            r = json.loads(path.read_text())
            v, meta = r.get("validation") or {}, r["metadata"]
            if not v:
                continue
            t, u = v["mean"]["tuned"], v["mean"]["uniform"]
            chosen = ", ".join(f"{k}: {_setting(c)}" for k, c in r["chosen"].items()) if isinstance(r["chosen"], dict) else r["chosen"]
            lines.append(f"| {path.name.removesuffix('.report.json')} | {_f((meta.get('target') or {}).get('psnr'))} | {chosen} | "
                         f"{v['uniform_setting']} | {_f(t['psnr'])} | {_f(u['psnr'])} | {_f(t['psnr'] - u['psnr'])} | {_f(t['density'])} |")
        lines.append("")
    return "\n".join(lines)


def _speed(mean: dict) -> str:
    """The mean speed-up with its range and how many timings it averages (reports with alternated timings)."""
    text = _f(mean.get("speedup"), "x")
    if mean.get("speedup_spread"):
        text += " ({:.3g}-{:.3g})".format(*mean["speedup_spread"])
    if mean.get("timed_entries"):
        text += f", {mean['reliable_entries']} of {mean['timed_entries']} reliable"
    return text


def _setting(c) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else str(c)


def _f(v, unit: str = "") -> str:
    return "—" if v is None else f"{v:.3g}{unit}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="+", choices=("defaults", "density", "tune", "caches"), help="default: all")
    p.add_argument("--prompts", type=int, default=6, help="held-out prompts per experiment")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20], help="step counts of the cache experiments")
    p.add_argument("--summary", action="store_true", help="only print the tables of what --out holds")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side of every compare (alternated)")
    p.add_argument("--threads", type=int, help="torch's threads for every run (default: torch's; 1 on a busy machine)")
    p.add_argument("--model", default="tiny", help="the embedded model: tiny (448 tokens) or tiny-long (1,600)")
    p.add_argument("--tileskip-thresholds", default="-3,-2,-1.5,-1", help="the density experiment's tile-skip sweep")
    p.add_argument("--tileskip-blocks", default="16", help="block sizes of that sweep (comma-separated)")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.out))
        return 0
    from vdit_sparse import shapes_world

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    heldout = shapes_world.heldout_prompts()  # spread over the list: colours, shapes and motions vary
    prompts.write_text("\n".join(heldout[:: max(1, len(heldout) // args.prompts)][: args.prompts]) + "\n")
    log = args.out / "log.txt"
    print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
    todo = args.only or ["defaults", "density", "tune", "caches"]
    timings = {}
    timing = ("--repeats", str(args.repeats), *(("--threads", str(args.threads)) if args.threads else ()))
    for steps in args.steps if "caches" in todo else args.steps[:1]:
        # MagCache's ratios, measured on tune's own calibration prompts (training captions), not the held-out ones
        magcache = args.out / f"magcache-{steps}.yaml"
        if "caches" in todo and not magcache.exists():
            run(["tune", "--cache", "magcache", "--steps", str(steps), "--out", str(magcache), "--holdout", str(prompts),
                 "--model", args.model, *timing], log)
        for name, commands in experiments(prompts, magcache, steps, timing,
                                                (args.tileskip_thresholds, args.tileskip_blocks)).items():
            if name not in todo or (name != "caches" and steps != args.steps[0]):
                continue
            for argv in commands:
                key = f"{name}-{steps}"
                argv = [a.replace("{out}", str(args.out)) for a in argv] + ["--model", args.model]
                timings[key] = timings.get(key, 0.0) + run(argv, log)
    print(f"load after: {os.getloadavg()[0]:.2f}; wall per experiment: {json.dumps({k: round(v) for k, v in timings.items()})}")
    print(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
