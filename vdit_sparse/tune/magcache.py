"""``vdit-sparse tune --cache magcache``: measure MagCache's magnitude ratios for a model and write them.

MagCache skips blocks while the accumulated error predicted from per-step *magnitude ratios* stays small;
the ratios are a property of the model, the step count and the scheduler, so they must be measured. This
runs diffusers' own calibration (``MagCacheConfig(calibrate=True)``: nothing is skipped, the ratio of
each step's residual norm to the previous step's is recorded) on the calibration prompts, averages the
ratios over prompts and guidance branches, and writes them into a tuned table:

    caches:
      magcache: {mag_ratios: [...]}      # one per step of the calibration runs (metadata.steps)

``generate --tuned NAME --cache magcache`` (or ``accelerate(pipe, cache="magcache", tuned=NAME)``) then
uses them; diffusers interpolates them to another step count. The held-out prompts are then run with
MagCache at its default threshold against dense, and the share of skipped blocks and the PSNR printed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import UserError


def calibrate(pipe, requests, steps: int) -> list[float]:
    """Mean magnitude ratio per step over ``requests`` (dense runs with MagCache calibrating), one per step."""
    from ..caches import calibrate_mag_ratios
    from ..generate import call_pipeline, resolve
    from ..integration import accelerate

    def runs():
        for req in requests:
            handle = accelerate(pipe, cache="magcache", **{"magcache.calibrate": True, "magcache.num_inference_steps": steps})
            try:
                call_pipeline(pipe, resolve(req))
            finally:
                handle.remove()

    found = [r for r in calibrate_mag_ratios(runs) if len(r) == steps]
    if not found:
        raise UserError(f"tune --cache magcache: no calibration printed by diffusers for {steps} steps; "
                        "is this diffusers >= 0.42?")
    return [round(float(x), 6) for x in np.mean(np.array(found), axis=0)]


def write(path: Path, ratios: list[float], meta: dict) -> None:
    import json

    import yaml

    from ..atomicfile import atomic_write

    header = "# vdit-sparse tune --cache magcache: MagCache magnitude ratios, measured (see metadata)\n"
    meta = json.loads(json.dumps(meta, default=str))  # plain values only: versions are objects with a text form
    body = {"metadata": meta, "layers": {}, "caches": {"magcache": {"mag_ratios": ratios}}}
    atomic_write(path, header + yaml.safe_dump(body, sort_keys=False))


def validate(pipe, requests, table: Path, repeats: int = 3) -> dict:
    """MagCache at its default threshold with the measured ratios, against dense: PSNR, blocks computed, and the
    speed-up of the two timed alternately after one warm-up each, ``repeats`` times (vdit_sparse/timing.py)."""
    from ..generate import prepare, run_generation
    from ..quality import psnr
    from ..stats import computed_share
    from ..timing import alternate, mean_speedups, paired, speedup_bound, verdict
    from .search import PSNR_CAP

    rows = []
    for req in requests:
        cached_req = replace(req, cache="magcache", tuned=str(table))
        dense_run, cached_run = prepare(req), prepare(cached_req)  # each resolved once for its repeats
        series, results, loads = alternate(
            {"dense": lambda: run_generation(req, pipe=pipe, progress=False, cfg=dense_run[0], spec=dense_run[1]),
             "magcache": lambda: run_generation(cached_req, pipe=pipe, progress=False, cfg=cached_run[0],
                                                spec=cached_run[1])},
            repeats, seconds=lambda r: r.wall_s)
        dense, cached = results["dense"][-1], results["magcache"][-1]
        share = computed_share(cached.computed)
        rows.append({"prompt": req.prompt, "psnr": min(psnr(dense.frames, cached.frames), PSNR_CAP),
                     "computed_share": share,  # dense attention on both sides: the work bound is 1 / share
                     **verdict(paired(series, "dense", "magcache", loads), speedup_bound(share, None, False))})
    return {"prompts": rows, "mean_psnr": float(np.mean([r["psnr"] for r in rows])),
            "mean_speedup": mean_speedups(rows, ("speedup",))["speedup"], "repeats": repeats}


def run(job, pipe) -> int:
    """``tune --cache magcache`` for ``job`` (a vdit_sparse.tune.job.TuneJob): measure, write, check on held-out prompts."""
    from ..generate import versions

    t0 = time.perf_counter()
    steps, out, repeats = job.steps, job.out, job.repeats
    dense = replace(job.base, attention="dense", cache="none", settings={})
    ratios = calibrate(pipe, [replace(dense, prompt=p) for p in job.cal_prompts], steps)
    meta = {"model": job.base.model, "cache": "magcache", "steps": steps, "scheduler": type(pipe.scheduler).__name__,
            "scheduler_shift": getattr(pipe.scheduler.config, "shift", None), "prompts": list(job.cal_prompts),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
    write(out, ratios, meta)
    print(f"MagCache ratios over {len(job.cal_prompts)} prompts, {steps} steps: {', '.join(f'{r:.4f}' for r in ratios)}")
    if job.validate:
        result = validate(pipe, [replace(dense, prompt=p) for p in job.holdout], out, repeats)
        for row in result["prompts"]:
            share = "n/a" if row["computed_share"] is None else f"{row['computed_share']:.2f}"
            low, high = row["speedup_spread"]
            judged = "" if row["timing_reliable"] else f"; unreliable: {'; '.join(row['timing_reasons'])}"
            print(f"held-out {row['prompt'][:48]!r}: PSNR {row['psnr']:.2f} dB, blocks computed {share}, "
                  f"speed-up {row['speedup']:.2f}x ({low:.2f}-{high:.2f}, {repeats} runs each alternated with "
                  f"dense){judged}")
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s; use it with --tuned {out} --cache magcache")
    return 0
