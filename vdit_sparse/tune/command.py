"""``vdit-sparse tune``: a per-layer table of settings, the cheapest that keeps quality within a target.

1. Calibrate: dense runs on a few prompts, recorded (calibrate.py): per layer, the relative error
   and realised density of every candidate setting at sampled steps after warm-up.
2. Search (search.py): one setting per layer, least predicted attention time (cost.py: a GPU
   measurement, or a proportional fallback that the outputs name), mean error ≤ ``--target-error``.
   ``--target-psnr`` runs uniform settings end to end, fits PSNR against predicted error, searches
   at the error that fit gives, and checks the table with real runs (tightening up to ``--rounds``).
3. Write ``--out`` (YAML: ``metadata`` and ``layers``, read by ``accelerate(pipe, tuned=...)``,
   ``generate --tuned`` and ``tuned=``), validate on held-out prompts against a uniform setting of
   the same predicted cost, and write the report (report.py) beside the YAML.

With ``--cache tileskip`` the knob is the tile-skip threshold (log2 units): per-layer thresholds whose
attention error against dense stays within the target.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import UserError, argument_parser
from ..flags import add_generation_args, parse_generation_args, read_prompt_file, request_from_args
from ..generate import GenerateRequest
from .calibrate import TILESKIP_KNOB, Candidate, Recorder, candidates, knobs_of, recording, sampled_steps
from .cost import CostModel, load_cost_model
from .direct import measured_options, probe_table, video_mse
from .job import Calibration, TuneJob
from .search import PSNR_CAP, InfeasibleTarget, Option, choose, error_for_psnr, fit_psnr, totals

HELP = ("find per-layer sparse-attention settings for a quality target, or (--cache magcache) measure MagCache's "
        "ratios; write a tuned table and a report")
# Defaults: captions of the embedded model's world (plain English for any other model); the held-out pair is
# from the world's held-out split, which the embedded model never saw in training.
CALIBRATION_PROMPTS = ("a red square moving right on a plain background", "two blue circles moving up on a textured background")
HOLDOUT_PROMPTS = ("a red circle moving right on a plain background", "two red squares moving left on a plain background")


# --- arguments ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser(prog="vdit-sparse tune", description=HELP)
    p.add_argument("--out", required=True, metavar="PATH|NAME",
                   help="the table: a .yaml path, or a NAME for NAME.yaml in your tuned folder ($VDIT_SPARSE_HOME/tuned, else "
                        "~/.config/vdit-sparse/tuned); the report goes beside it")
    p.add_argument("--target-psnr", type=float, metavar="DB", help="end-to-end PSNR against dense on the calibration prompts")
    p.add_argument("--target-error", type=float, metavar="E", help="mean relative attention error against dense, in (0, 1]")
    p.add_argument("--knob", help="the setting that varies per layer: one of the method's knobs (density for svg, "
                   "density or top_p for svg2, window for sta), or threshold with --cache tileskip (default: the first of these)")
    p.add_argument("--values", metavar="V1,V2,...",
                   help="the knob's candidate values (default: a built-in grid; negative thresholds as --values=-14.4,-6; "
                        "sta's windows as --values=[1,0,0],[1,1,1])")
    p.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (default: 2 built-in)")
    p.add_argument("--holdout", metavar="FILE", help="held-out validation prompts, one per line (default: 2 built-in)")
    p.add_argument("--sampled-steps", type=int, default=3, help="steps observed per calibration run (default 3)")
    p.add_argument("--cost-model", metavar="JSON", help="cost model from vdit-sparse bench --cost-model (default: configs/cost_model.json if present)")
    p.add_argument("--rounds", type=int, default=3, help="--target-psnr: end-to-end checks before giving up (default 3)")
    p.add_argument("--no-validate", action="store_true", help="skip the held-out validation runs")
    p.add_argument("--repeats", type=int, default=3,
                   help="held-out validation: timed runs of dense, tuned and uniform, alternated (default 3)")
    p.add_argument("--layer-sensitivity", action="store_true",
                   help="weigh each layer's attention error by how much of it reaches the video, measured with one "
                        "run per layer and calibration prompt (that layer sparse, the others dense)")
    p.add_argument("--measure-candidates", action="store_true",
                   help="measure every candidate's own video error (one run per layer, candidate and calibration "
                        "prompt, that layer at the candidate and the others dense) instead of predicting it from "
                        "the attention error")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    # --cache magcache (no target, no knob): measure MagCache's magnitude ratios on dense runs and write them
    # into the table (caches: magcache: mag_ratios), for generate --tuned NAME --cache magcache
    add_generation_args(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return parse_generation_args(build_parser(), argv)


def check_args(args) -> None:
    """Refuse bad input before any run: each error names the flag, the value, and what is allowed."""
    from ..caches import parse_cache
    from ..methods import METHODS

    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be a positive integer (3 or more gives a spread to judge)")
    if args.cache == "magcache":  # the calibration mode: no target, no knob
        if args.target_psnr is not None or args.target_error is not None or args.attention != "dense":
            raise UserError("tune --cache magcache: measures MagCache's ratios on dense runs; drop --target-* and --attention")
        if args.tuned:
            raise UserError(f"--tuned {args.tuned!r}: tune writes a table and does not start from one; drop --tuned")
        return
    if (args.target_psnr is None) == (args.target_error is None):
        raise UserError("tune: give exactly one target, --target-psnr DB or --target-error E")
    if args.target_error is not None and not 0 < args.target_error <= 1:
        raise UserError(f"--target-error {args.target_error!r}: must be in (0, 1] (a relative error, e.g. 0.05)")
    if args.target_psnr is not None and not 0 < args.target_psnr <= 100:
        raise UserError(f"--target-psnr {args.target_psnr!r}: must be in (0, 100] dB (e.g. 30)")
    if args.attention not in METHODS:
        raise UserError(f"--attention {args.attention!r}: unknown; known: {', '.join(METHODS)}")
    try:
        parse_cache(args.cache)
    except ValueError as e:
        raise UserError(f"--cache: {e}") from None
    if args.tuned:
        raise UserError(f"--tuned {args.tuned!r}: tune writes a table and does not start from one; drop --tuned")
    if args.ulysses_degree != 1:  # calibration observes every head of a layer in one process
        raise UserError(f"--ulysses-degree {args.ulysses_degree}: tune runs on one device; drop the flag")
    if args.layer_sensitivity and args.measure_candidates:
        raise UserError("--measure-candidates: measures what --layer-sensitivity estimates; give one of them")
    for flag, on in (("--layer-sensitivity", args.layer_sensitivity), ("--measure-candidates", args.measure_candidates)):
        if on and parse_cache(args.cache)[0]:
            raise UserError(f"{flag}: not with --cache tileskip (its probe runs need the other layers plain dense)")
    if args.sampled_steps < 1 or args.rounds < 1:
        raise UserError(f"--sampled-steps {args.sampled_steps} / --rounds {args.rounds}: must be positive integers")
    _check_knob(args)


def _check_knob(args) -> None:
    """The knob: one the method (or the tile-skip cache) declares, and not also fixed by a flag."""
    knobs = knobs_of(args.attention, args.cache)
    if not knobs and args.knob == TILESKIP_KNOB[0]:
        raise UserError("--knob threshold: tunes the tile-skip cache; add --cache tileskip")
    if not knobs:
        raise UserError(f"--attention {args.attention!r}: nothing to tune; use a sparse method "
                        f"(or --cache tileskip for thresholds)")
    args.knob = args.knob or next(iter(knobs))
    if args.knob == TILESKIP_KNOB[0] and args.knob not in knobs:
        raise UserError("--knob threshold: tunes the tile-skip cache; add --cache tileskip")
    if args.knob not in knobs:
        where = "with --cache tileskip" if "tileskip" in args.cache else f"of --attention {args.attention}"
        raise UserError(f"--knob {args.knob!r}: not a knob {where}; known: {', '.join(knobs)}")
    if getattr(args, args.knob, None) is not None:
        raise UserError(f"--{args.knob.replace('_', '-')} {getattr(args, args.knob)}: tune chooses it per layer; drop the flag")
    if args.knob == "top_p" and args.density is not None:
        raise UserError(f"--knob top_p: a fixed --density {args.density} would override it; drop --density")


def knob_values(args) -> list:
    from ..methods import settings_for

    if args.values is None:
        return list(knobs_of(args.attention, args.cache)[args.knob])
    try:
        values = _parse_values(args.values)
        for v in values:
            settings_for(args.attention, {args.knob: v}, args.cache)
    except ValueError as e:
        raise UserError(f"--values {args.values!r}: {e if 'must' in str(e) else 'expected numbers V1,V2,...'}") from None
    return sorted(set(values))


def _parse_values(text: str) -> list:
    """``V1,V2,...``: numbers as floats; a list value in Hydra's syntax (``[1,0,0],[1,1,1]``: sta's windows) as a tuple."""
    import yaml

    try:
        items = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        raise ValueError("not a list") from None
    number = (int, float)
    return [tuple(v) if isinstance(v, list) else float(v) if isinstance(v, number) and not isinstance(v, bool) else v
            for v in items]


def out_path(args) -> Path:
    """``--out`` as a path: a bare NAME means NAME.yaml in the user's tuned folder ($VDIT_SPARSE_HOME/tuned or the
    platform's user config folder), never inside the installed package; a path means exactly that path."""
    from ..config import user_tuned_dir
    from ..video import check_writable

    raw = args.out
    path = Path(raw).expanduser()
    if path.suffix == "" and len(path.parts) == 1:
        path = user_tuned_dir() / f"{raw}.yaml"
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out {raw!r}: expected a .yaml path or a bare NAME (for {user_tuned_dir()}/NAME.yaml)")
    if path.exists() and not args.overwrite:
        raise UserError(f"--out {str(path)!r}: exists; pass --overwrite to replace it, or choose another name")
    check_writable(path, "--out")
    return path


def read_prompts(path: str | None, default: tuple[str, ...], flag: str) -> list[str]:
    return list(default) if path is None else read_prompt_file(path, flag)


# --- runs --------------------------------------------------------------------------------------------


def dense_run_frames(pipe, cfg, on_step=None) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one run of ``pipe`` with the resolved config ``cfg``, as generate runs it."""
    from ..generate import call_pipeline
    from ..video import to_uint8

    return to_uint8(call_pipeline(pipe, cfg, on_step=on_step))


def _bar(total: int, desc: str, unit: str = "run"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def calibrate(pipe, requests: list[GenerateRequest], recorder: Recorder) -> list[np.ndarray]:
    """Dense runs of ``requests``, recorded; returns their frames (the references for PSNR)."""
    from ..generate import resolve

    frames = []
    cfgs = [resolve(req) for req in requests]
    # one tick per denoising step: the observed steps are the slow ones, and a run can take minutes on a CPU
    with _bar(sum(int(c.model.steps) for c in cfgs), "calibrating", unit="step") as bar:
        for cfg in cfgs:
            recorder.new_run()
            with recording(pipe, recorder):
                frames.append(dense_run_frames(pipe, cfg, on_step=bar.update))
    return frames


def prepare_run(req: GenerateRequest, tuned: Path | None = None) -> tuple:
    """(request, config, RunSpec) of one run, with the tuned table at ``tuned`` if given: resolved once, for as
    many repeats as it runs.

    The table is set on the resolved config, not passed as a Hydra override: configs/tuned/ is a
    directory, so Hydra reads ``tuned=...`` as a config-group choice and refuses it.
    """
    from ..generate import preflight, resolve

    cfg = resolve(req)
    if tuned is not None:
        cfg.tuned = str(tuned)
    return req, cfg, preflight(cfg, req)


def generate(pipe, req: GenerateRequest, tuned: Path | None = None, prepared: tuple | None = None):
    """run_generation of ``req`` on ``pipe``, with the tuned table at ``tuned`` if given (``prepared``: the run as
    :func:`prepare_run` resolved it already)."""
    from ..generate import run_generation

    req, cfg, spec = prepared or prepare_run(req, tuned)
    return run_generation(req, pipe=pipe, cfg=cfg, spec=spec, progress=True)  # the pipeline's own bar, under ours


def psnr_of(pipe, requests: list[GenerateRequest], references: list[np.ndarray], desc: str,
            tuned: Path | None = None) -> float:
    """Mean PSNR against ``references`` of runs of ``requests`` (with the table at ``tuned``, if given)."""
    from ..quality import psnr

    values = []
    with _bar(len(requests), desc) as bar:
        for req, ref in zip(requests, references):
            result = generate(pipe, req, tuned)
            values.append(min(psnr(ref, result.frames), PSNR_CAP))
            bar.update()
    return float(np.mean(values))


# --- options and the search ----------------------------------------------------------------------------


def layer_options(recorder: Recorder, cands: list[Candidate], cost: CostModel, sparse_share: float, num_runs: int,
                  dense_layers: set[int]) -> dict[int, list[Option]]:
    """Per layer, every candidate with its calibrated error and density and its predicted cost per run.

    ``sparse_share``: the share of steps after warm-up, the only ones a layer's setting changes.
    """
    out = {}
    for layer in recorder.layers:
        shape = recorder.shapes[layer]
        calls = recorder.calls[layer] / num_runs  # per run, every step and branch
        sparse_calls = calls * sparse_share
        dense_ms = cost.ms("dense", 1.0, shape)
        fixed = (calls - sparse_calls) * dense_ms  # warm-up steps run dense whatever the layer gets
        if layer in dense_layers:
            out[layer] = [Option({"attention": "dense"}, 0.0, 1.0, calls * dense_ms)]
            continue
        out[layer] = [
            Option(c.setting, err, density, fixed + sparse_calls * cost.ms(c.method, density, shape))
            for c, (err, density) in zip(cands, recorder.curve(layer))
        ]
    return out


def dense_cost(options: dict[int, list[Option]], recorder: Recorder, cost: CostModel, num_runs: int) -> float:
    return sum(recorder.calls[layer] / num_runs * cost.ms("dense", 1.0, recorder.shapes[layer]) for layer in options)


def uniform_of_equal_cost(job: TuneJob, cal: Calibration, chosen: dict[int, Option]) -> float:
    """The uniform knob value whose predicted total cost matches the tuned table's."""
    target, knob, options = totals(chosen)["cost"], job.knob, cal.options
    if knob == "density":  # any density can run: solve Σ cost(d) = target by bisection
        realised = {layer: _realised_density(opts, knob) for layer, opts in options.items()}

        def total(d):
            s = 0.0
            for layer in options:
                shape, calls = cal.recorder.shapes[layer], cal.recorder.calls[layer] / cal.num_runs
                sparse = calls * cal.sparse_share if layer not in cal.dense_layers else 0.0
                s += (calls - sparse) * job.cost.ms("dense", 1.0, shape) + sparse * job.cost.ms(job.attention, realised[layer](d), shape)
            return s

        smallest = min(c.setting[knob] for c in cal.cands if knob in c.setting)
        if total(smallest) >= target:  # the grid realises no cheaper uniform setting: compare with its cheapest
            print(f"warning: no uniform density is as cheap as the table; comparing with the cheapest candidate, {smallest}")
            return smallest
        lo, hi = smallest, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
        return round(lo, 4)
    sums = {i: sum(o[i].cost for o in options.values() if len(o) > i) for i, c in enumerate(cal.cands) if knob in c.setting}
    best = min(sums, key=lambda i: abs(sums[i] - target))
    return cal.cands[best].setting[knob]


def _realised_density(opts: list[Option], knob: str):
    """requested density -> realised density of one layer, interpolated between calibrated candidates
    (a method realises its request only up to its granularity: whole blocks, whole clusters)."""
    pts = sorted((o.setting[knob], o.density) for o in opts if knob in o.setting) + [(1.0, 1.0)]
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    return lambda d: float(np.interp(d, xs, ys))


def grid_warnings(options: dict[int, list[Option]], knob: str) -> list[str]:
    """What the calibration says about the candidates themselves: a requested density the token grid cannot
    realise (off by more than 0.1 on average), and candidate values that realise the same density."""
    from ..stats import DENSITY_GAP, same_density

    out, realised = [], []
    values = list(dict.fromkeys(o.setting[knob] for opts in options.values() for o in opts if knob in o.setting))
    for value in values:
        mean = float(np.mean([o.density for opts in options.values() for o in opts if o.setting.get(knob) == value]))
        realised.append((value, mean))
        if knob == "density" and abs(mean - value) > DENSITY_GAP:
            out.append(f"density {value} realises {mean:.3f} on average: the token grid is too small for that "
                       "budget at this block size (more frames or pixels, or a smaller block_size)")
    return out + same_density(realised, f"{knob} values")


def search(options: dict[int, list[Option]], target_error: float) -> dict[int, Option]:
    try:
        return choose(options, target_error)
    except InfeasibleTarget as e:
        raise UserError(f"--target-error {target_error:.4g}: {e}; allow more error or add safer --values") from None


def tune_to_psnr(job: TuneJob, pipe, cal: Calibration, meta: dict) -> tuple[dict, dict]:
    """Fit PSNR against predicted error with uniform runs, then search and verify until the target holds."""
    target, knob, options, cands, references = job.target_psnr, job.knob, cal.options, cal.cands, cal.references
    cal_requests = job.requests(job.cal_prompts)

    def uniform_error(i):  # forced-dense layers have one option: they add no error
        return float(np.mean([opts[i].error if len(opts) > i else 0.0 for opts in options.values()]))

    ranked = sorted((i for i, c in enumerate(cands) if knob in c.setting), key=uniform_error)
    picks = {ranked[len(ranked) // 3], ranked[(2 * len(ranked)) // 3]}  # two uniform runs spanning the middle
    points = []
    for i in sorted(picks):
        value = cands[i].setting[knob]
        reqs = [_with_settings(r, {knob: value}) for r in cal_requests]
        err = uniform_error(i)
        psnr = psnr_of(pipe, reqs, references, f"fit {knob}={value}")
        points.append({"setting": {knob: value}, "predicted_error": err, "psnr": psnr})
    history = []
    error = None
    for _ in range(job.rounds):
        a, b = fit_psnr([(p["predicted_error"], p["psnr"]) for p in points + history])
        fitted = error_for_psnr(a, b, target)
        error = min(fitted, 1.0) if error is None else min(fitted, 0.7 * error)
        chosen = search(options, error)
        write_table(job.out, chosen, {**meta, "target": {"psnr": target, "error": error}})
        psnr = psnr_of(pipe, cal_requests, references, f"check error {error:.3g}", tuned=job.out)
        history.append({"predicted_error": totals(chosen)["error"], "psnr": psnr, "searched_error": error, "fit": [a, b]})
        if psnr >= target:
            break
    fit = {"a": a, "b": b, "uniform_points": points, "rounds": history, "met": history[-1]["psnr"] >= target}
    return chosen, fit


def layer_sensitivity(job: TuneJob, pipe, cal: Calibration) -> dict[int, float]:
    """Per layer, how much of its predicted attention error reaches the video, relative to the mean layer (1.0).

    Layers are not alike: an error in one may wash out while the same error in another steers the whole
    sampling trajectory. Each layer with a choice runs once per calibration prompt at its middle option
    (by error) with every other layer dense; its weight is the video's MSE against dense per unit of
    predicted error. The search then spends the error budget where it costs the video least.
    """
    options = cal.options
    run = probe_runner(pipe, job.requests(job.cal_prompts), cal.references, job.out)
    raw = {}
    for layer, opts in options.items():
        lossy = sorted((o for o in opts if o.error > 0), key=lambda o: o.error)
        if not lossy:
            continue
        option = lossy[len(lossy) // 2]
        psnr = run(probe_table(options, layer, option), f"layer {layer} alone at {option.setting}")
        raw[layer] = video_mse(psnr) / option.error  # video MSE (frames in [0, 1]) per unit attention error
    mean = float(np.mean(list(raw.values()))) if raw else 1.0
    return {layer: raw.get(layer, mean) / mean if mean > 0 else 1.0 for layer in options}


def probe_runner(pipe, cal_requests, references, out: Path):
    """A function (table, label) -> mean PSNR of the calibration prompts run with that per-layer table."""
    import yaml

    from ..atomicfile import atomic_write

    probe = out.with_name(out.stem + ".probe.yaml")

    def run(table: dict, desc: str) -> float:
        atomic_write(probe, yaml.safe_dump({"layers": table}, sort_keys=False))
        try:
            return psnr_of(pipe, cal_requests, references, desc, tuned=probe)
        finally:
            probe.unlink(missing_ok=True)

    return run


def _with_settings(req: GenerateRequest, settings: dict) -> GenerateRequest:
    return replace(req, settings={**req.settings, **settings})


# --- outputs -------------------------------------------------------------------------------------------


def write_table(path: Path, chosen: dict[int, Option], meta: dict) -> None:
    import yaml

    from ..atomicfile import atomic_write

    header = "# vdit-sparse tuned table, written by `vdit-sparse tune`; use: generate --tuned NAME, accelerate(pipe, tuned=...)\n"
    body = {"metadata": meta, "layers": {int(layer): dict(o.setting) for layer, o in chosen.items()}}
    atomic_write(path, header + yaml.safe_dump(_plain(body), sort_keys=False))


def _plain(x):
    """Plain YAML-safe values: numpy numbers, tuples and str subclasses become float, list and str."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, str):
        return str(x)  # str subclasses (torch's version string) are not YAML-safe
    return x


def validate(job: TuneJob, pipe, knob_value) -> dict:
    """Held-out prompts: PSNR against dense, wall and attention time of the tuned table and of the uniform setting,
    the three runs alternated after one warm-up each, ``--repeats`` times (vdit_sparse/timing.py)."""
    from ..compare import reference_request
    from ..quality import psnr
    from ..timing import alternate, mean_speedups, paired, verdict

    rows = []
    with _bar(3 * (job.repeats + 1) * len(job.holdout), "validating") as bar:
        for req in job.requests(job.holdout):
            runs = {  # each resolved once for its repeats
                "dense": prepare_run(reference_request(req, "dense")),
                "tuned": prepare_run(req, job.out),
                "uniform": prepare_run(_with_settings(req, {job.knob: knob_value})),
            }

            def run(prepared):
                result = generate(pipe, prepared[0], prepared=prepared)
                bar.update()
                return result

            series, results, loads = alternate({name: functools.partial(run, r) for name, r in runs.items()},
                                               job.repeats, seconds=lambda r: r.wall_s)
            attention = {name: float(np.median([r.attention_ms for r in rs])) for name, rs in results.items()}
            ref = results["dense"][-1]
            row = {"prompt": req.prompt}
            for name in ("tuned", "uniform"):
                res = results[name][-1]
                row[name] = {"psnr": min(psnr(ref.frames, res.frames), PSNR_CAP), "density": res.density,
                             "attention_ms": attention[name],
                             "attention_speedup": attention["dense"] / max(attention[name], 1e-9),
                             **verdict(paired(series, "dense", name, loads))}
            rows.append(row)
    mean = {name: {**{k: float(np.mean([r[name][k] for r in rows])) for k in ("psnr", "density", "attention_ms")},
                   **mean_speedups([r[name] for r in rows])}
            for name in ("tuned", "uniform")}
    return {"prompts": rows, "mean": mean, "uniform_setting": {job.knob: knob_value}, "repeats": job.repeats}


def metadata(job: TuneJob, cal: Calibration, chosen: dict[int, Option]) -> dict:
    from ..generate import versions

    t, cost, dense_total = totals(chosen), job.cost, cal.dense_total
    m = job.cfg.model
    meta = {
        "model": job.base.model, "attention": job.attention, "cache": job.cache, "knob": job.knob,
        "target": {"psnr": job.target_psnr} if job.target_psnr is not None else {"error": job.target_error},
        "predicted": {
            "mean_error": t["error"], "mean_density": t["density"], "attention_cost": t["cost"],
            "dense_attention_cost": dense_total, "attention_speedup": dense_total / max(t["cost"], 1e-12), "unit": cost.unit,
        },
        "cost_model": cost.source,
        "calibration": {"prompts": list(job.cal_prompts), "steps": m.steps, "frames": m.frames, "height": m.height,
                        "width": m.width, "seed": int(job.cfg.seed), "sampled_steps": sorted(cal.steps_seen)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    if cal.weights is not None:
        meta["layer_sensitivity"] = {layer: round(w, 4) for layer, w in cal.weights.items()}
    if job.measure_candidates:
        meta["error_unit"] = "video MSE of the layer's candidate alone (measured)"
    return meta


# --- the command ---------------------------------------------------------------------------------------


def choose_table(job: TuneJob, pipe, cal: Calibration):
    """(chosen, metadata, PSNR fit or None) for the target, the table written to ``job.out``."""
    fit = None
    if job.target_error is not None:
        chosen = search(cal.options, job.target_error)
        meta = metadata(job, cal, chosen)
    else:
        chosen, fit = tune_to_psnr(job, pipe, cal, metadata(job, cal, {}))
        meta = metadata(job, cal, chosen)
        meta["target"]["error"] = fit["rounds"][-1]["searched_error"]
        meta["calibration"]["psnr"] = fit["rounds"][-1]["psnr"]
    write_table(job.out, chosen, meta)
    return chosen, meta, fit


def make_job(args) -> TuneJob:
    """The checked flags as a :class:`TuneJob`: values, output path, prompts and cost model read, the run resolved
    once (everything refused before any model work)."""
    from ..generate import prepare

    magcache = args.cache == "magcache"
    values = () if magcache else tuple(knob_values(args))
    out = out_path(args)
    cal_prompts = read_prompts(args.prompts, CALIBRATION_PROMPTS, "--prompts")
    holdout = read_prompts(args.holdout, HOLDOUT_PROMPTS, "--holdout")
    cost = load_cost_model(args.cost_model)
    base = request_from_args(args, cal_prompts[0])
    if magcache:  # the runs are dense; the ratios come from diffusers' calibration mode
        base = replace(base, cache="none")
    cfg, spec = prepare(base)
    return TuneJob(None if magcache else args.knob, values, args.target_psnr, args.target_error, out, tuple(cal_prompts),
                   tuple(holdout), cost, base, cfg, spec, rounds=args.rounds, repeats=args.repeats,
                   validate=not args.no_validate, layer_sensitivity=args.layer_sensitivity,
                   measure_candidates=args.measure_candidates,
                   sampled_steps=args.sampled_steps)


def calibrate_layers(job: TuneJob, pipe) -> Calibration:
    """Dense runs of the calibration prompts, every candidate measured per layer, and the per-layer options."""
    policy, steps = job.spec.policy, job.steps
    warmup = policy.warmup_count(steps)
    every_step = job.knob == TILESKIP_KNOB[0]  # tile-skip marks carry between steps: observe them all
    steps_seen = set(range(warmup, steps)) if every_step else sampled_steps(steps, warmup, job.sampled_steps)
    if not steps_seen:
        raise UserError(f"--warmup-steps: all {steps} steps are warm-up (dense); nothing to tune")
    cands = candidates(job.attention, job.cache, job.knob, list(job.values), job.spec.settings, job.spec.tileskip)
    recorder = Recorder(cands, None if every_step else steps_seen, share_state=not every_step)
    references = calibrate(pipe, job.requests(job.cal_prompts), recorder)
    dense_layers = {layer for layer in recorder.layers if policy.is_dense_layer(layer)}
    sparse_share = (steps - warmup) / steps
    options = layer_options(recorder, cands, job.cost, sparse_share, len(references), dense_layers)
    cal = Calibration(cands, recorder, references, steps_seen, dense_layers, sparse_share, options,
                      dense_cost(options, recorder, job.cost, len(references)))
    if job.layer_sensitivity:  # each layer's errors in units of the video error they cause
        cal.weights = layer_sensitivity(job, pipe, cal)
        cal.options = {layer: [replace(o, error=o.error * cal.weights[layer]) for o in opts]
                       for layer, opts in options.items()}
    if job.measure_candidates:  # the video's own error per candidate replaces the attention-error curves
        cal.options = measured_options(options, probe_runner(pipe, job.requests(job.cal_prompts), cal.references, job.out))
    return cal


def main(argv: list[str], pipe=None) -> int:
    """Run ``vdit-sparse tune``; ``pipe``, a loaded pipeline, replaces loading ``--model`` (tests)."""
    from ..generate import check_video_size
    from ..loading import load_pipeline, resolve_device, resolve_dtype
    from ..timing import set_threads
    from .report import write_report

    t0 = time.perf_counter()
    args = parse_args(argv)
    check_args(args)
    job = make_job(args)
    set_threads(args.threads)
    cfg = job.cfg
    device = resolve_device(cfg.device)
    if pipe is None:
        pipe = load_pipeline(cfg.model.name, device=device, dtype=resolve_dtype(cfg.dtype, device),
                             random_weights=job.base.random_weights)
    check_video_size(pipe, cfg.model.frames, cfg.model.height, cfg.model.width)
    pipe.set_progress_bar_config(disable=True)
    if job.knob is None:
        from . import magcache as magcache_mode

        return magcache_mode.run(job, pipe)

    cal = calibrate_layers(job, pipe)
    chosen, meta, fit = choose_table(job, pipe, cal)
    meta["warnings"] = grid_warnings(cal.options, job.knob)
    for warning in meta["warnings"]:
        print(f"warning: {warning}")
    uniform = uniform_of_equal_cost(job, cal, chosen)
    validation = validate(job, pipe, uniform) if job.validate else None
    report = write_report(job.out, meta, cal.cands, cal.options, chosen, validation, fit, {job.knob: uniform})
    _print_summary(job, report, meta, chosen, validation, fit, time.perf_counter() - t0)
    return 0


def _db(psnr: float) -> str:
    return "identical (capped at 100 dB)" if psnr >= PSNR_CAP else f"{psnr:.2f} dB"


def _speeds(mean: dict) -> str:
    """Measured speed-ups of a validation mean, over its reliable timings only (n/a when none was)."""
    def x(v):
        return "n/a" if v is None else f"{v:.2f}x"
    return (f"speed-up {x(mean['speedup'])}, attention speed-up {x(mean['attention_speedup'])}; "
            f"{mean['reliable_entries']} of {mean['timed_entries']} timings reliable")


def _print_summary(job: TuneJob, report, meta, chosen, validation, fit, seconds) -> None:
    p = meta["predicted"]
    layers = ", ".join(f"{layer}: {', '.join(f'{k}={v}' for k, v in o.setting.items())}" for layer, o in chosen.items())
    print(f"tuned {len(chosen)} layers: {layers}")
    print(f"predicted: mean attention error {p['mean_error']:.4g}, mean density {p['mean_density']:.3f}, "
          f"attention speed-up {p['attention_speedup']:.2f}x (cost model: {job.cost.source})")
    if fit is not None:
        last = fit["rounds"][-1]
        verdict = "met" if fit["met"] else "NOT met"
        print(f"calibration PSNR {_db(last['psnr'])} against target {meta['target']['psnr']} dB: {verdict}")
    if validation is not None:
        m = validation["mean"]
        u = ", ".join(f"{k}={v}" for k, v in validation["uniform_setting"].items())
        print(f"held-out ({len(validation['prompts'])} prompts): tuned PSNR {_db(m['tuned']['psnr'])} "
              f"(density {m['tuned']['density']:.3f}, {_speeds(m['tuned'])}) | "
              f"uniform {u} of equal predicted cost: PSNR {_db(m['uniform']['psnr'])} "
              f"(density {m['uniform']['density']:.3f}, {_speeds(m['uniform'])})")
        print(f"tuned minus uniform on held-out prompts: {m['tuned']['psnr'] - m['uniform']['psnr']:+.2f} dB")
        for row in validation["prompts"]:
            for name in ("tuned", "uniform"):
                if not row[name]["timing_reliable"]:
                    print(f"unreliable speed-up, {name} on {row['prompt'][:48]!r}: {'; '.join(row[name]['timing_reasons'])}")
    print(f"wrote {job.out} and {report} in {seconds:.0f} s")
