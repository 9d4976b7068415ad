"""``vdit-sparse compare``: accelerated videos against dense ones from the same seeds.

For every prompt (and every setting of a ``--sweep``) it generates the reference video
(``--against``, dense by default) and the accelerated one with the same seed, measures
them with :func:`vdit_sparse.quality.compare_videos`, and writes ``DIR/metrics.json``,
``DIR/report.md`` and ``DIR/report.html``.

Every finished run is stored at once, whole or not at all (vdit_sparse/runs.py): reference runs in a cache
shared between comparisons (keyed by the request, the model's files and the package version),
accelerated runs under ``DIR/runs``. So a second comparison against the same dense videos does
not regenerate them, and an interrupted comparison resumes where it stopped.

Speed-ups are honest: a cached dense *video* may be reused, its *timing* never is. Each accelerated run that
this process makes is timed against its reference alternately (vdit_sparse/timing.py): one untimed warm-up of
each, then reference and accelerated in turn ``--repeats`` times; the speed-up is the ratio of the medians and
``speedup_spread`` the ratio of the extremes. An entry whose runs spread by more than 10 %, whose machine was
overloaded, or whose ratio is more than the computed work allows is marked ``timing_reliable: false`` with the
reason, and the mean speed-up leaves it out. With ``--no-timing`` the speed-up is null: not measured.
One comparison writes a report directory at a time: a second one is refused (a lock file).
"""

from __future__ import annotations

import argparse
import functools
import contextlib
import itertools
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import parallel
from .errors import UserError, argument_parser
from .flags import OVERRIDE, add_generation_args, parse_generation_args, read_prompt_file, request_from_args
from .generate import GenerateRequest, GenerationResult
from .runs import RunStore, default_cache_dir, reference_key

HELP = "compare accelerated videos with dense ones from the same seeds; write metrics.json and report.html"
SWEEP_FIELDS = ("attention", "cache")  # request fields a sweep may vary; all other keys are setting names
OWN_ENTRIES = ("comparison.json", "metrics.json", "report.md", "report.html", "runs", "pairs")  # .lock stays
MEAN_SCALARS = (
    "psnr", "ssim", "lpips", "density", "psnr_float", "ssim_float",
    "wall_s", "reference_wall_s", "attention_ms", "reference_attention_ms", "computed_share",
)
MEAN_DICTS = ("vbench", "vbench_reference", "prompt_following", "prompt_following_reference")


@dataclass(frozen=True)
class Pair:
    """One accelerated run and the reference run it is measured against."""

    prompt: str
    reference: GenerateRequest
    accelerated: GenerateRequest
    setting: tuple  # ((key, value), ...) of the sweep; () without one
    label: str

    @functools.cached_property
    def ref_key(self) -> str:  # the model's fingerprint walks its folder: once per pair
        return reference_key(self.reference)

    @functools.cached_property
    def acc_key(self) -> str:
        return self.accelerated.key()


# --- arguments ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser(prog="vdit-sparse compare", description=HELP)
    p.add_argument("prompt", nargs="?", help="one prompt (or give --prompts FILE)")
    p.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line (# comments and blank lines skipped)")
    p.add_argument("--report", metavar="DIR", required=True, help="where metrics.json, report.md and report.html go")
    p.add_argument("--against", default="dense", help="attention of the reference runs (default: dense)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every value (repeat for a grid), e.g. density=0.1,0.2,0.4, attention=svg,svg2 or "
                        "window=[1,2,2],[3,0,0] (lists in brackets)")
    p.add_argument("--dense-cache", metavar="DIR", help="reference-run cache (default: $VDIT_SPARSE_CACHE or ~/.cache/vdit-sparse/runs)")
    p.add_argument("--overwrite", action="store_true", help="replace a report DIR that holds a different comparison")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (reported as null)")
    p.add_argument("--fps", type=float, help="frame rate of the side-by-side video (default: the model's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each side, reference and accelerated alternated (default 3); the speed-up is the "
                        "ratio of their medians")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each side before its timed runs")
    p.add_argument("--no-timing", action="store_true",
                   help="make each run once, untimed, and reuse cached reference videos: faster, but the speed-up is not "
                        "measured (null)")
    add_generation_args(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = parse_generation_args(build_parser(), argv)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be a positive integer (3 or more gives a spread to judge)")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    """PROMPT or the lines of --prompts FILE, exactly one of them."""
    if args.prompts is not None and args.prompt is not None and OVERRIDE.match(args.prompt):
        args.overrides.insert(0, args.prompt)  # with --prompts, a KEY=VALUE positional is an override
        args.prompt = None
    if (args.prompt is None) == (args.prompts is None):
        raise UserError("prompt: give exactly one of PROMPT or --prompts FILE" + (" (got both)" if args.prompt else ""))
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("PROMPT='': must be non-empty text")
        return [args.prompt]
    return read_prompt_file(args.prompts, "--prompts")


def _split_top_level(text: str) -> list[str] | None:
    """``text`` cut at its commas outside brackets (``[1,2,2],[3,0,0]`` -> two values), each stripped;
    None when its brackets do not pair up."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            return None
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return None if depth else parts + [text[start:].strip()]


def _parse_value(text: str):
    """A number, true/false/none, a list in brackets (a tuple: settings are hashable), else the text."""
    if text.startswith("[") and text.endswith("]"):
        items = _split_top_level(text[1:-1])
        if items is None or not all(items) and items != [""]:
            raise ValueError(text)
        return tuple(_parse_value(v) for v in items if v)
    if "[" in text or "]" in text:
        raise ValueError(text)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_sweep(specs: list[str]) -> list[tuple]:
    """``["density=0.1,0.2", "attention=svg,svg2"]`` -> every combination, as ``((key, value), ...)``.

    Without a sweep there is one empty setting. Keys are request fields in :data:`SWEEP_FIELDS`,
    canonical parameter names, or a step cache's namespaced settings (``magcache.threshold``); values are
    checked here, before any run.
    """
    from .caches import STEP_CACHES

    allowed = list(SWEEP_FIELDS) + all_setting_names() + [f"{c}.{n}" for c, cls in STEP_CACHES.items() for n in cls.names()]
    axes: dict[str, list] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        parts = _split_top_level(values)  # a list value keeps its commas: window=[1,2,2],[3,0,0]
        if not eq or not key or not parts or not all(parts):
            raise UserError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. density=0.1,0.2,0.4; lists in brackets: "
                            f"window=[1,2,2],[3,0,0])")
        if key not in allowed:
            raise UserError(f"--sweep {spec!r}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        if key in axes:
            raise UserError(f"--sweep {spec!r}: key {key!r} is swept twice; give all its values in one --sweep")
        try:
            axes[key] = [_parse_value(v) for v in parts]
        except ValueError as e:
            raise UserError(f"--sweep {spec!r}: value {e} is not a list in brackets like [1,2,2]") from None
    return [tuple(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def point_label(setting: tuple) -> str:
    """``window=[1,2,2],density=0.2``: a sweep point as it is written on the command line."""
    shown = lambda v: "[" + ",".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)  # noqa: E731
    return ",".join(f"{k}={shown(v)}" for k, v in setting)


def all_setting_names() -> list[str]:
    """Every setting of every method, shared ones first, then the tile-skip cache's."""
    from .caches import TILESKIP, TILESKIP_KEYS, TileSkip
    from .methods import METHODS

    methods = [name for m in METHODS.values() for name in m.Settings.names()]
    return list(dict.fromkeys([*methods, *TILESKIP_KEYS, *(f"{TILESKIP}.{n}" for n in TileSkip.names())]))


def reference_request(base: GenerateRequest, against: str) -> GenerateRequest:
    """The same prompt, model, sizes and seed as ``base``, with the reference attention and no cache.

    Hydra overrides of the attention or cache groups belong to the accelerated run only.
    """
    from .caches import STEP_CACHES, TILESKIP

    own = ("attention", "cache", "tuned", TILESKIP, *STEP_CACHES)  # what belongs to the accelerated run only
    keep = tuple(o for o in base.overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] not in own)
    return replace(base, attention=against, cache="none", settings={}, tuned=None, overrides=keep)


def accelerated_request(base: GenerateRequest, setting: tuple) -> GenerateRequest:
    """The base request with one sweep point's fields and settings; the settings are checked against its method."""
    from .methods import settings_for

    from .caches import split_step_cache_settings

    fields = {k: v for k, v in setting if k in SWEEP_FIELDS}
    settings = {**base.settings, **{k: v for k, v in setting if k not in SWEEP_FIELDS}}
    req = replace(base, settings=settings, **fields)
    try:
        # a step cache's own settings are checked with the tuned table's (MagCache's ratios) by check_requests
        settings_for(req.attention, split_step_cache_settings(req.settings)[0], req.cache)
    except ValueError as e:
        raise UserError(f"--sweep point {point_label(setting) or '(none)'}: {e}") from None
    return req


def command_step_caches(pairs: list[Pair]) -> set:
    """The step caches the comparison runs: what a tuned table holding only step-cache settings may serve."""
    from .caches import parse_cache

    return {parse_cache(p.accelerated.cache)[1] for p in pairs}


def check_requests(pairs: list[Pair], degree: int = 1) -> dict:
    """Every run resolved and checked (settings, model keys, tuned table, dense backend, an embedded model's size
    and Ulysses degree) before the first run starts and before the report folder is touched: ``{request key:
    (config, RunSpec)}``, which the runs then use as they are."""
    from .generate import prepare

    step_caches = command_step_caches(pairs)
    requests = {r.key(): r for p in pairs for r in (p.reference, p.accelerated)}
    return {key: prepare(req, degree, step_caches) for key, req in requests.items()}


def plan_pairs(args: argparse.Namespace) -> list[Pair]:
    return plan(args)[0]


def plan(args: argparse.Namespace) -> tuple[list[Pair], dict]:
    """The comparison's pairs, and every run resolved and checked once (:func:`check_requests`)."""
    prompts = read_prompts(args)
    settings = parse_sweep(args.sweep) if args.sweep else [()]
    pairs = []
    for prompt in prompts:
        base = request_from_args(args, prompt)
        reference = reference_request(base, args.against)
        for setting in settings:
            tag = point_label(setting)
            label = f"{prompt} [{tag}]" if tag else prompt
            pairs.append(Pair(prompt, reference, accelerated_request(base, setting), setting, label))
    return pairs, check_requests(pairs, args.ulysses_degree)


def pipeline_generate_fn(step_caches: set | None = None, prepared: dict | None = None):
    """``generate(req) -> GenerationResult`` that loads each pipeline once and reuses it (the untimed warm-up
    runs of the timer take the one-off costs: CUDA init, kernel compilation and autotuning); ``step_caches``: those
    the whole comparison runs (a caches-only tuned table serves one of them, not necessarily this run's);
    ``prepared``: each request's (config, RunSpec) by its key, resolved once by :func:`check_requests`."""
    from .generate import prepare, run_generation
    from .loading import load_pipeline, resolve_device, resolve_dtype

    pipes: dict = {}
    prepared = {} if prepared is None else prepared

    def generate(req: GenerateRequest):
        if req.key() not in prepared:
            prepared[req.key()] = prepare(req, parallel.degree(), step_caches)
        cfg, spec = prepared[req.key()]
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        where = (cfg.model.name, str(device), str(dtype))
        if where not in pipes:
            pipes[where] = load_pipeline(cfg.model.name, device=device, dtype=dtype, random_weights=req.random_weights)
        return run_generation(req, pipe=pipes[where], cfg=cfg, step_caches=step_caches, spec=spec)

    return generate


# --- the report directory ----------------------------------------------------------------------------


def identity(pairs: list[Pair], against: str) -> dict:
    """What makes two comparisons the same: the runs they pair, in order."""
    return {
        "against": against,
        "pairs": [
            {"prompt": p.prompt, "reference": p.ref_key, "accelerated": p.acc_key,
             "setting": [[k, v] for k, v in p.setting]}
            for p in pairs
        ],
    }


def claim_report_dir(report: Path, ident: dict, overwrite: bool) -> None:
    """Make ``report`` hold this comparison: new, resumed, or (with ``overwrite``) replaced."""
    from .atomicfile import atomic_write_json

    marker = report / "comparison.json"
    if report.exists() and not report.is_dir():
        raise UserError(f"--report {str(report)!r}: is a file; expected a directory (new, or one this comparison wrote)")
    if marker.is_file():
        same = json.loads(marker.read_text(encoding="utf-8")) == json.loads(json.dumps(ident))
        if same:
            return  # resume: every stored run and measurement is reused
        if not overwrite:
            raise UserError(
                f"--report {str(report)!r}: holds a different comparison (other prompts, seeds or settings); "
                "pass --overwrite to replace it, or choose another directory"
            )
    elif report.is_dir() and any(p.name != ".lock" for p in report.iterdir()) and not overwrite:
        raise UserError(
            f"--report {str(report)!r}: is not empty and holds no comparison; "
            "choose a new or empty directory, or pass --overwrite"
        )
    for name in OWN_ENTRIES:  # only what a comparison writes, never other files
        path = report / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    atomic_write_json(marker, ident)


# --- measuring ---------------------------------------------------------------------------------------


def _ratio(num, den):
    return float(num) / float(den) if num is not None and den else None


def _run_label(req: GenerateRequest) -> str:
    """Attention and cache as run: "svg2", "dense + magcache"."""
    return req.attention if req.cache in ("none", None) else f"{req.attention} + {req.cache}"


def measure(pair: Pair, ref: GenerationResult, acc: GenerationResult, lpips: bool) -> dict:
    """One metrics.json entry: the contract's headline keys first, then everything else."""
    from .quality import compare_videos
    from .stats import computed_share

    q = compare_videos(
        ref.frames, acc.frames, a_float=ref.frames_float, b_float=acc.frames_float, prompt=pair.prompt, lpips=lpips
    )
    timed = getattr(acc, "timing_reference", None) or {}  # the reference, timed alternately with acc in this process
    share = computed_share(getattr(acc, "computed", None) or [])
    timing = timing_fields(pair, acc, timed, share)
    entry = {
        "prompt": pair.prompt, "label": pair.label, "setting": dict(pair.setting), "seed": pair.accelerated.seed,
        "attention": pair.accelerated.attention, "cache": pair.accelerated.cache,
        "run_label": f"{_run_label(pair.accelerated)} against {_run_label(pair.reference)}",
        "speedup": timing.pop("speedup"), "psnr": q.pop("psnr"), "ssim": q.pop("ssim"),
        "lpips": q.pop("lpips"), "density": acc.density, "identical": q.pop("identical"), **timing,
        "device": (acc.config or {}).get("device"), "threads": (acc.config or {}).get("threads"),
        "requested_density": _requested_density(pair.accelerated, acc), "computed_share": share,
    }
    entry.update(q)
    entry.update({"run": pair.acc_key, "reference_run": pair.ref_key})
    return entry


def timing_fields(pair: Pair, acc: GenerationResult, timed: dict, share: float | None) -> dict:
    """speedup (ratio of medians), speedup_spread, timing_reliable and its reasons, the work bound, the timings.

    ``timed`` is what the run store kept beside ``acc``: alternated timings, a single reference timing (a run
    stored by an older version: one run per side), or nothing (--no-timing: not measured)."""
    from .timing import Series, Timings, speedup_bound, verdict

    if timed.get("wall_s") is None:
        return {"speedup": None, "speedup_spread": None, "timing_reliable": None, "timing_reasons": [],
                "speedup_bound": None, "attention_speedup": None, "wall_s": acc.wall_s, "reference_wall_s": None,
                "attention_ms": acc.attention_ms, "reference_attention_ms": None, "repeats": 0, "load_max": None}
    if "timings" in timed:
        t = Timings.from_json(timed["timings"])
    else:
        t = Timings(Series((timed["wall_s"],)), Series((acc.wall_s,)))
    wall, attention = timed.get("accelerated_wall_s", acc.wall_s), timed.get("accelerated_attention_ms", acc.attention_ms)
    cheaper = pair.accelerated.attention != "dense" or "tileskip" in pair.accelerated.cache
    bound = speedup_bound(share, _ratio(timed.get("attention_ms"), 1e3 * t.baseline.median), cheaper)
    return {
        **verdict(t, bound), "speedup_bound": bound,
        "attention_speedup": _ratio(timed.get("attention_ms"), attention),
        "wall_s": wall, "reference_wall_s": t.baseline.median, "attention_ms": attention,
        "reference_attention_ms": timed.get("attention_ms"), "repeats": len(t.candidate.seconds),
        "load_max": max(t.loads, default=None), "timings": t.to_json(),
    }


def _requested_density(req: GenerateRequest, acc: GenerationResult):
    """The density the run asked for (its settings, defaults included), or None when it asks for none."""
    settings = (acc.config or {}).get("settings") or {}
    return req.settings.get("density", settings.get("density"))


def _mean(values: list):
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present and len(present) == len(values) else None


def _is_score(v) -> bool:
    """A value worth averaging: a float, or a bool (its mean is a pass rate); not labels or counts."""
    return isinstance(v, (bool, float))


def _mean_psnr(entries: list[dict], key: str):
    """Mean PSNR over the entries whose videos differ; None when every video is identical to its reference."""
    values = [e.get(key) for e in entries if not e.get("identical")]
    return _mean(values) if values else None


def mean_entry(entries: list[dict]) -> dict:
    """Mean over entries of every scalar (None if any entry lacks it) and of every dict value.

    Dict values (VBench-style, prompt following) average the entries that have a score
    there, ignoring None; a bool averages to the share of True; strings and integer
    labels (a detected colour, a detected count) are not averaged.
    """
    from .timing import mean_speedups

    out = {**mean_speedups(entries), **{key: _mean([e.get(key) for e in entries]) for key in MEAN_SCALARS}}
    out["psnr"], out["psnr_float"] = _mean_psnr(entries, "psnr"), _mean_psnr(entries, "psnr_float")
    out["identical"] = all(e.get("identical") for e in entries) if entries else None
    out["run_label"] = ", ".join(dict.fromkeys(e["run_label"] for e in entries if e.get("run_label"))) or None
    for key in MEAN_DICTS:
        dicts = [e[key] for e in entries if e.get(key)]
        names = dict.fromkeys(n for d in dicts for n in d if _is_score(d[n]))
        if names:
            out[key] = {n: _mean([float(d[n]) for d in dicts if _is_score(d.get(n))]) for n in names}
    reasons = sorted({e["lpips_unavailable"] for e in entries if e.get("lpips_unavailable")})
    out["lpips_unavailable"] = "; ".join(reasons) or None
    return out


def summarize(pairs: list[Pair], entries: list[dict], swept: bool) -> dict:
    """metrics.json: {"mean", "prompts"} (DESIGN.md), and per setting means with a sweep."""
    metrics = {"mean": mean_entry(entries), "prompts": entries}
    if swept:
        groups: dict = {}
        for pair, entry in zip(pairs, entries):
            groups.setdefault(pair.setting, []).append(entry)
        metrics["sweep"] = [
            {"setting": dict(s), "label": ",".join(f"{k}={v}" for k, v in s), "mean": mean_entry(group)}
            for s, group in groups.items()
        ]
    return metrics


# --- the command -------------------------------------------------------------------------------------


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=total == 0)


def run_all(pairs: list[Pair], cache: RunStore, runs: RunStore, generate_fn, timing: bool = True, repeats: int = 3,
            warmup: bool = True, load=None) -> None:
    """Make every run not stored yet, storing each as it finishes.

    With ``timing``, each accelerated run made here is timed against its reference by :func:`time_pair`; a reference
    not cached yet is stored from its first (warm-up) run. Without, each missing run is made once, untimed.
    """
    todo = plan_runs(pairs, cache, runs)
    sizes = [(2 * (repeats + warmup) if timing else 1 + fill) if acc else 1 for p, fill, acc in todo]
    with _progress(sum(sizes), "runs") as bar:
        for p, fill, acc in todo:
            def made(kind: str, request: GenerateRequest):
                bar.set_postfix_str(f"{kind} {_run_label(request)} {p.prompt[:30]}")
                result = generate_fn(request)
                bar.update()
                return result

            if acc and timing:
                time_pair(p, fill, cache, runs, made, repeats, warmup, load)
                continue
            if fill:
                cache.save(p.ref_key, p.reference, made("reference", p.reference))
            if acc:
                runs.save(p.acc_key, p.accelerated, made("accelerated", p.accelerated))


def time_pair(p: Pair, fill: bool, cache: RunStore, runs: RunStore, made, repeats: int, warmup: bool, load=None) -> None:
    """Alternate p's reference and accelerated runs (vdit_sparse/timing.py) and store the accelerated run with the
    timings of both sides; ``fill``: the reference is not cached yet, so its first run is stored there."""
    from .timing import alternate, paired

    def reference():
        result = made("reference", p.reference)
        if fill and not cache.has(p.ref_key):
            cache.save(p.ref_key, p.reference, result)
        return result

    series, results, loads = alternate(
        {"reference": reference, "accelerated": lambda: made("accelerated", p.accelerated)}, repeats, warmup=warmup,
        seconds=lambda r: r.wall_s, load=load,  # the pipeline call alone, not the set-up around it
    )
    attention = {k: float(np.median([r.attention_ms for r in v])) for k, v in results.items()}
    timed = {"wall_s": series["reference"].median, "attention_ms": attention["reference"],
             "accelerated_wall_s": series["accelerated"].median, "accelerated_attention_ms": attention["accelerated"],
             "timings": paired(series, "reference", "accelerated", loads).to_json()}
    runs.save(p.acc_key, p.accelerated, results["accelerated"][-1], timing_reference=timed)


def plan_runs(pairs: list[Pair], cache: RunStore, runs: RunStore) -> list[tuple[Pair, bool, bool]]:
    """(pair, fill, acc) in order: ``acc``, its accelerated run is not stored yet (once per setting); ``fill``, its
    reference is not cached yet and this is its first pair (a reference is made even when every accelerated run
    is stored: the report shows it)."""
    todo, made, seen = [], set(), set()
    for p in pairs:
        fill = p.ref_key not in made and not cache.has(p.ref_key)
        acc = p.acc_key not in seen and not runs.has(p.acc_key)
        made.add(p.ref_key)
        seen.add(p.acc_key)
        if fill or acc:
            todo.append((p, fill, acc))
    return todo


def measure_all(pairs: list[Pair], report: Path, cache: RunStore, runs: RunStore, lpips: bool) -> list[dict]:
    """Every pair's entry, measured once and kept under DIR/pairs for a resumed comparison."""
    from .atomicfile import atomic_write_json

    entries = []
    with _progress(len(pairs), "measuring") as bar:
        for p in pairs:
            path = report / "pairs" / f"{p.ref_key}-{p.acc_key}-{'lpips' if lpips else 'nolpips'}.json"
            if path.is_file():
                entry = json.loads(path.read_text(encoding="utf-8"))
            else:
                entry = measure(p, cache.load(p.ref_key), runs.load(p.acc_key), lpips)
                atomic_write_json(path, entry)
            entries.append(entry)
            bar.update()
    return entries


def main(argv: list[str], generate_fn=None, load=None) -> int:
    """Run ``vdit-sparse compare``; ``generate_fn(req) -> GenerationResult`` replaces the pipeline and ``load()``
    the load average (tests)."""
    from .timing import set_threads

    args = parse_args(argv)
    pairs, prepared = plan(args)
    args.threads = set_threads(args.threads)
    report = Path(args.report)
    parallel.start(args.ulysses_degree, "compare")
    if not parallel.is_main():  # under torchrun: the other ranks make the same runs and write nothing
        refusal = parallel.from_main(None)  # rank 0's verdict on the report folder, or they would wait forever
        if refusal:
            raise UserError(refusal)
        return _compare(args, pairs, report, generate_fn or pipeline_generate_fn(command_step_caches(pairs), prepared), load)
    claimed = False
    try:
        with report_lock(report):
            claim_report_dir(report, identity(pairs, args.against), args.overwrite)
            claimed = True
            parallel.from_main(None)
            return _compare(args, pairs, report, generate_fn or pipeline_generate_fn(command_step_caches(pairs), prepared),
                            load)
    except UserError as e:
        if not claimed:
            parallel.from_main(str(e))
        raise


def _compare(args, pairs: list[Pair], report: Path, generate_fn, load=None) -> int:
    from .quality.report import ReportEntry, write_report
    from .timing import cores, load_average

    load = load or load_average
    cache = parallel.main_store(RunStore(args.dense_cache or default_cache_dir()))
    runs = parallel.main_store(RunStore(report / "runs"))
    load_before = load()
    run_all(pairs, cache, runs, generate_fn, timing=not args.no_timing, repeats=args.repeats,
            warmup=not args.no_warmup, load=load)
    if not parallel.is_main():
        return 0
    entries = measure_all(pairs, report, cache, runs, lpips=not args.no_lpips)
    metrics = summarize(pairs, entries, swept=bool(args.sweep))
    metrics["machine"] = {"load_before": load_before, "load_after": load(), "cpus": cores(),
                          "threads": args.threads, "repeats": args.repeats,
                          "device": entries[0].get("device") if entries else None}
    metrics["warnings"] = density_warnings(entries, metrics.get("sweep"))
    shown = []
    for p, e in zip(pairs, entries):
        ref, acc = cache.load(p.ref_key), runs.load(p.acc_key)
        fps = args.fps or _model_fps(acc.config)
        shown.append(ReportEntry(e, ref.frames, acc.frames, acc.stats, fps=fps, computed=acc.computed))
    paths = write_report(report, metrics, shown, title=report_title(pairs, args.against))
    print_summary(metrics, paths["html"])
    return 0


def report_title(pairs: list[Pair], against: str) -> str:
    """Attention and cache as run on both sides: "vdit-sparse: dense + magcache against dense"."""
    runs = ", ".join(dict.fromkeys(_run_label(p.accelerated) for p in pairs))
    references = ", ".join(dict.fromkeys(_run_label(p.reference) for p in pairs)) or against
    return f"vdit-sparse: {runs} against {references}"


def print_summary(metrics: dict, html: Path) -> None:
    """The mean (its speed-up over reliable timings only), one line per unreliable speed-up, the warnings."""
    m, entries = metrics["mean"], metrics["prompts"]
    psnr = "identical" if m.get("identical") else f"{_fmt(m['psnr'])} dB"
    spread = m.get("speedup_spread")
    speed = "speedup " + ("n/a" if m["speedup"] is None else f"{_fmt(m['speedup'])}x")
    speed += f" ({_fmt(spread[0])}-{_fmt(spread[1])})" if spread else ""
    if m.get("timed_entries"):
        speed += f" from {m['reliable_entries']} of {m['timed_entries']} timing(s) reliable"
    print(f"mean over {len(entries)} run(s): {speed}, PSNR {psnr}, SSIM {_fmt(m['ssim'])}, LPIPS {_fmt(m['lpips'])}, "
          f"density {_fmt(m['density'])}\nreport: {html}")
    for e in entries:
        if e.get("timing_reliable") is False:
            print(f"unreliable speed-up {_fmt(e['speedup'])}x, {e['label']}: {'; '.join(e['timing_reasons'])}")
    for warning in metrics["warnings"]:
        print(f"warning: {warning}")


def density_warnings(entries: list[dict], sweep: list[dict] | None) -> list[str]:
    """What a reader of the numbers should know: densities that did not come out as asked, sweep points that
    realised the same density (too small a token grid for the blocks), and what a CPU speed-up means."""
    from .stats import DENSITY_GAP, same_density

    out = []
    for e in entries:
        want, got = e.get("requested_density"), e.get("density")
        if want is not None and got is not None and abs(want - got) > DENSITY_GAP:
            out.append(f"{e['label']}: density {want} requested, {got:.3f} realised (the token grid is too small for "
                       "that budget at this block size, or warm-up and dense layers add to it)")
    out += same_density([(p["label"], p["mean"]["density"], p["mean"].get("computed_share"))
                         for p in sweep or [] if p["mean"].get("density") is not None], "sweep points")
    if any(e.get("device") == "cpu" and e.get("speedup") is not None and e["speedup"] < 1 and _sparse(e) for e in entries):
        out.append("sparse attention slower than dense on a CPU here: each sparse call pays its planning and a fixed "
                   "cost that the skipped blocks repay only at thousands of tokens per call (BENCHMARKS.md, CPU kernel)")
    return out


def _sparse(entry: dict) -> bool:
    """Whether a run used sparse attention or tile-skip (entries measured before these keys existed: yes)."""
    return (entry.get("attention", "?") != "dense" or "tileskip" in str(entry.get("cache", "tileskip"))
            or (entry.get("density") or 1.0) < 1.0)


@contextlib.contextmanager
def report_lock(report: Path):
    """Hold ``report``/.lock while this comparison writes the directory; a second writer is refused at once."""
    if report.exists() and not report.is_dir():
        raise UserError(f"--report {str(report)!r}: is a file; expected a directory (new, or one this comparison wrote)")
    try:
        report.mkdir(parents=True, exist_ok=True)
        handle = open(report / ".lock", "a+")
    except OSError as e:
        raise UserError(f"--report {str(report)!r}: cannot be written ({e.strerror}); choose a directory you can write") from None
    try:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock, as before
            pass
        except OSError:
            raise UserError(f"--report {str(report)!r}: another comparison is writing it now; wait for it, "
                            "or choose another directory") from None
        yield
    finally:
        handle.close()


def _model_fps(config: dict) -> float:
    try:
        return float(config["model"]["fps"])
    except (KeyError, TypeError, ValueError):
        return 8.0  # a fake or older run without it


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
