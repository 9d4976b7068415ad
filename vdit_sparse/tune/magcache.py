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


def validate(pipe, requests, table: Path) -> dict:
    """MagCache at its default threshold with the measured ratios, against dense: PSNR, blocks computed, time."""
    from ..generate import run_generation
    from ..quality import psnr
    from ..stats import computed_share
    from .search import PSNR_CAP

    rows = []
    for req in requests:
        dense = run_generation(req, pipe=pipe, progress=False)
        cached = run_generation(replace(req, cache="magcache", tuned=str(table)), pipe=pipe, progress=False)
        rows.append({"prompt": req.prompt, "psnr": min(psnr(dense.frames, cached.frames), PSNR_CAP),
                     "computed_share": computed_share(cached.computed),
                     "speedup": dense.wall_s / cached.wall_s})
    return {"prompts": rows, "mean_psnr": float(np.mean([r["psnr"] for r in rows])),
            "mean_speedup": float(np.mean([r["speedup"] for r in rows]))}


def run(args, pipe, base, cfg, cal_prompts, holdout, out: Path) -> int:
    from ..generate import versions

    t0 = time.perf_counter()
    steps = cfg.model.steps
    ratios = calibrate(pipe, [replace(base, prompt=p, attention="dense", cache="none", settings={}) for p in cal_prompts],
                       steps)
    meta = {"model": args.model, "cache": "magcache", "steps": steps, "scheduler": type(pipe.scheduler).__name__,
            "scheduler_shift": getattr(pipe.scheduler.config, "shift", None), "prompts": list(cal_prompts),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
    write(out, ratios, meta)
    print(f"MagCache ratios over {len(cal_prompts)} prompts, {steps} steps: {', '.join(f'{r:.4f}' for r in ratios)}")
    if not args.no_validate:
        held = [replace(base, prompt=p, attention="dense", cache="none", settings={}) for p in holdout]
        result = validate(pipe, held, out)
        for row in result["prompts"]:
            share = "n/a" if row["computed_share"] is None else f"{row['computed_share']:.2f}"
            print(f"held-out {row['prompt'][:48]!r}: PSNR {row['psnr']:.2f} dB, blocks computed {share}, "
                  f"speed-up {row['speedup']:.2f}x (dense timed just before, same process)")
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s; use it with --tuned {out} --cache magcache")
    return 0
