"""The comparison report: DIR/metrics.json, DIR/report.md and a self-contained DIR/report.html.

All three are rendered in memory first and then each written atomically, so a failure
while rendering leaves the previous report as it was.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from . import plots
from ..atomicfile import atomic_write, metrics_json
from .video import DIFF_FULL_SCALE, encode_mp4, side_by_side

MIN_VIDEO_WIDTH = 720  # pixels: narrower side-by-side videos are enlarged by a whole factor
MAX_ZOOM = 8
HEADLINE = ("speedup", "psnr", "ssim", "lpips", "density")  # DESIGN.md's contract for every entry and the mean


@dataclass
class ReportEntry:
    """One accelerated video against its dense reference: the metrics entry and what to show."""

    metrics: dict  # one element of metrics.json "prompts"
    dense: np.ndarray  # (T, H, W, 3) uint8
    accelerated: np.ndarray  # (T, H, W, 3) uint8
    stats: list[dict] = field(default_factory=list)  # the accelerated run's attention calls
    fps: float = 8.0
    computed: list[dict] = field(default_factory=list)  # per transformer call: the layers that ran


def density_matrix(stats: list[dict]) -> tuple[list[str], np.ndarray]:
    """Mean realised density per (layer, step) over branches and calls: labels, ``(layers, steps)``.

    Steps without a call for a layer are NaN. Layers are labelled ``model.layer`` when the
    run has more than one model (e.g. two transformers), else by the layer index.
    """
    if not stats:
        return [], np.zeros((0, 0))
    models = {r.get("model") for r in stats}
    rows = sorted({(str(r.get("model")), int(r["layer"])) for r in stats}, key=lambda k: (k[0], k[1]))
    steps = 1 + max(int(r["step"]) for r in stats)
    total, count = np.zeros((len(rows), steps)), np.zeros((len(rows), steps))
    index = {k: i for i, k in enumerate(rows)}
    for r in stats:
        i = index[(str(r.get("model")), int(r["layer"]))]
        total[i, int(r["step"])] += r["density"]
        count[i, int(r["step"])] += 1
    with np.errstate(invalid="ignore"):  # empty cells become NaN on purpose
        matrix = total / count
    labels = [f"{m}.{layer}" if len(models) > 1 else str(layer) for m, layer in rows]
    return labels, matrix


def computed_matrix(computed: list[dict], layers: list[str]) -> np.ndarray:
    """(layers, steps): the share of the run's transformer calls (branches) at each step in which each layer ran;
    1 everywhere without a step-level cache. ``layers`` are density_matrix's labels."""
    if not computed or not layers:
        return np.zeros((0, 0))
    steps = 1 + max(int(c["step"]) for c in computed)
    models = {c["model"] for c in computed}
    index = {label: i for i, label in enumerate(layers)}
    ran, calls = np.zeros((len(layers), steps)), np.zeros(steps)
    for c in computed:
        calls[int(c["step"])] += 1
        for layer in c["layers"]:
            label = f"{c['model']}.{layer}" if len(models) > 1 else str(layer)
            if label in index:
                ran[index[label], int(c["step"])] += 1
    with np.errstate(invalid="ignore"):
        return ran / calls


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and math.isinf(v):
        return "inf (identical)"
    return f"{v:.{digits}g}" if isinstance(v, (int, float)) else str(v)


def _cell(e: dict, key: str) -> str:
    """A table cell: a PSNR of identical videos reads "identical", a value not measured "—", a speed-up whose
    timing is not to be trusted "(unreliable)" after it, a spread "low–high"."""
    if key in ("psnr", "psnr_float") and e.get(key) is None and e.get("identical"):
        return "identical"
    if key == "speedup_spread":
        spread = e.get(key)
        return f"{_num(spread[0], 3)}–{_num(spread[1], 3)}" if spread else "—"
    if key == "speedup" and e.get(key) is not None and e.get("timing_reliable") is False:
        return f"{_num(e[key])} (unreliable)"
    return _num(e.get(key))


NOTES = (
    "— : not measured (a speed-up needs a reference timed in the same run: see compare --no-timing) or unavailable.",
    "Speedup: the median reference wall time over the median accelerated one, the two timed alternately after one "
    "untimed warm-up of each (compare --repeats); range: the fastest reference over the slowest accelerated run, and "
    "the slowest over the fastest. A speed-up is unreliable when either side's runs spread by more than 10 %, the "
    "load average exceeded the cores, or it is more than the work computed allows; the mean leaves those out. "
    "Density: realised share of the attention matrix computed (warm-up steps and dense layers included).",
)
KEYS = ["run_label", "speedup", "speedup_spread", "psnr", "ssim", "lpips", "density", "psnr_float", "ssim_float"]
HEADS = ["run", "speedup", "speed-up range", "PSNR dB", "SSIM", "LPIPS", "density", "PSNR float", "SSIM float"]


def _warnings(metrics: dict) -> list[str]:
    return list(metrics.get("warnings") or [])


def timing_lines(metrics: dict) -> list[str]:
    """One line per unreliable speed-up with its reasons, and which entries the mean speed-up averages."""
    out = [f"Unreliable speed-up, {e.get('label') or e.get('prompt', '')}: {'; '.join(e.get('timing_reasons') or [])}"
           for e in metrics.get("prompts", []) if e.get("timing_reliable") is False]
    mean = metrics["mean"]
    if mean.get("timed_entries"):
        out.append(f"Mean speed-up over the {mean['reliable_entries']} of {mean['timed_entries']} timed entries "
                   "whose timing is reliable.")
    return out


def _table_rows(metrics: dict) -> list[tuple[str, dict]]:
    rows = [(e.get("label") or e.get("prompt", ""), e) for e in metrics.get("prompts", [])]
    return rows + [("mean", metrics["mean"])]


def render_markdown(metrics: dict, title: str) -> str:
    """A summary table (one row per entry and the mean) and the VBench-style values."""
    head = ["entry", *HEADS]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in _table_rows(metrics):
        lines.append("| " + " | ".join([name.replace("|", "\\|")] + [_cell(e, k) for k in KEYS]) + " |")
    lines += ["", *timing_lines(metrics)] if timing_lines(metrics) else []
    reasons = sorted({e["lpips_unavailable"] for e in metrics.get("prompts", []) if e.get("lpips_unavailable")})
    if reasons:
        lines += ["", "LPIPS unavailable: " + "; ".join(reasons)]
    dims = sorted(metrics["mean"].get("vbench", {}))
    if dims:
        lines += ["", "VBench-style proxies (accelerated / dense):", ""]
        lines += ["| entry | " + " | ".join(dims) + " |", "|" + "---|" * (len(dims) + 1)]
        for name, e in _table_rows(metrics):
            acc, ref = e.get("vbench", {}), e.get("vbench_reference", {})
            cells = [f"{_num(acc.get(d), 3)} / {_num(ref.get(d), 3)}" for d in dims]
            lines.append("| " + " | ".join([name.replace("|", "\\|")] + cells) + " |")
    for name, e in _table_rows(metrics):
        if e.get("prompt_following"):
            scores = ", ".join(f"{k} {_num(v, 3)}" for k, v in e["prompt_following"].items())
            lines += ["", f"Prompt following, accelerated ({name}): {scores}"]
    lines += ["", *(f"Warning: {w}" for w in _warnings(metrics))] if _warnings(metrics) else []
    lines += [
        "",
        "PSNR and SSIM: per frame on decoded uint8 frames, averaged over frames; \"float\" uses the "
        "undecoded frames. " + " ".join(NOTES) + " The videos and plots are in report.html.",
        "",
    ]
    return "\n".join(lines)


# Marks each <video> with data-state="loaded" or "error" so a person (and a headless test) can tell.
_VIDEO_SCRIPT = """<script>
for (const v of document.querySelectorAll('video')) {
  const mark = (s) => { v.dataset.state = s; const m = v.parentElement.querySelector('.video-state');
                        if (m) m.textContent = s === 'error' ? 'this browser cannot play the video' : ''; };
  if (v.readyState >= 2) mark('loaded');
  v.addEventListener('loadeddata', () => mark('loaded'));
  v.addEventListener('error', () => mark('error'));
}
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } video { image-rendering: pixelated; max-width: 100%; }
section { border-top: 1px solid #ddd; margin-top: 2em; } .warning { color: #a40; } .note { color: #555; font-size: 90%; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
</style>"""


def _html_table(metrics: dict) -> str:
    head = "".join(f"<th>{k}</th>" for k in ["entry", *HEADS])
    body = []
    for name, e in _table_rows(metrics):
        cells = "".join(f"<td>{escape(_cell(e, k))}</td>" for k in KEYS)
        body.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _video_html(entry: ReportEntry) -> str:
    frames = side_by_side(np.asarray(entry.dense), np.asarray(entry.accelerated))  # (T, H, W, 3)
    zoom = min(MAX_ZOOM, max(1, MIN_VIDEO_WIDTH // frames.shape[2]))
    # enlarge small videos by whole pixels before encoding: H.264 would smear their colour (4:2:0)
    frames = frames.repeat(zoom, axis=1).repeat(zoom, axis=2)
    uri = "data:video/mp4;base64," + base64.b64encode(encode_mp4(frames, fps=entry.fps)).decode("ascii")
    return (
        f'<div><video controls autoplay loop muted playsinline src="{uri}"></video>'
        f'<div class="video-state"></div>'
        f"<p>dense | accelerated | difference |dense − accelerated| (brightest at ≥ {DIFF_FULL_SCALE}/255)</p></div>"
    )


def _entry_html(entry: ReportEntry) -> str:
    m = entry.metrics
    name = m.get("label") or m.get("prompt", "")
    parts = [f"<section><h2>{escape(name)}</h2>", _video_html(entry), '<div class="plots">']
    per_frame = {"PSNR (uint8)": [math.inf if v is None else v for v in m.get("psnr_per_frame", [])]}  # None: identical
    parts.append(plots.line_plot(per_frame, "per-frame PSNR", "frame", "dB"))
    labels, matrix = density_matrix(entry.stats)
    if matrix.size:
        parts.append(plots.heatmap(matrix, "realised density (layer × step)", "step", "layer"))
    computed = computed_matrix(entry.computed, labels)
    if computed.size and (computed < 1).any():  # a step-level cache skipped some layers
        parts.append(plots.heatmap(computed, "computed (layer × step; 0: served by the step cache)", "step", "layer"))
    if matrix.size and not labels[0].isdigit():  # several models: the maps' rows are model.layer
        parts.append(f"<p>layers: {escape(', '.join(labels))}</p>")
    parts.append("</div>")
    if m.get("lpips_unavailable"):
        parts.append(f"<p>LPIPS unavailable: {escape(m['lpips_unavailable'])}</p>")
    if m.get("prompt_following") is not None:
        pf = ", ".join(f"{k} {_num(v, 3)}" for k, v in m["prompt_following"].items())
        parts.append(f"<p>prompt following (accelerated): {escape(pf)}</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _pareto_html(metrics: dict) -> str:
    points = [
        (s["mean"]["speedup"], s["mean"]["psnr"], s["label"])
        for s in metrics.get("sweep", [])
        if s["mean"].get("speedup") is not None and s["mean"].get("psnr") is not None
    ]
    if len(points) < 2:
        return ""
    svg = plots.scatter(points, "speed / quality (red: Pareto front)", "speedup ×", "PSNR dB")
    return f"<section><h2>Sweep</h2>{svg}</section>"


def render_html(metrics: dict, entries: list[ReportEntry], title: str) -> str:
    """One self-contained page: summary table, Pareto plot (sweeps), and per entry the
    side-by-side video (an mp4 data: URI), per-frame PSNR and the density heat map."""
    notes = "".join(f"<p class=\"warning\">{escape(line)}</p>" for line in timing_lines(metrics))
    notes += "".join(f"<p class=\"warning\">warning: {escape(w)}</p>" for w in _warnings(metrics))
    notes += "".join(f"<p class=\"note\">{escape(n)}</p>" for n in NOTES)
    body = [f"<h1>{escape(title)}</h1>", _html_table(metrics), notes, _pareto_html(metrics)]
    body += [_entry_html(e) for e in entries]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title>{_STYLE}</head>\n<body>\n"
        + "\n".join(body)
        + f"\n{_VIDEO_SCRIPT}\n</body></html>\n"
    )


def write_report(report_dir: str | Path, metrics: dict, entries: list[ReportEntry], title: str = "vdit-sparse comparison") -> dict[str, Path]:
    """Write metrics.json, report.md and report.html into ``report_dir``; returns their paths.

    ``metrics`` is ``{"mean": {...}, "prompts": [...], ...}``, each with at least
    :data:`HEADLINE`. Everything is rendered before the first file is replaced.
    """
    missing = [k for e in [metrics["mean"], *metrics["prompts"]] for k in HEADLINE if k not in e]
    if missing:
        raise ValueError(f"metrics lack {sorted(set(missing))}; every entry needs {', '.join(HEADLINE)}")
    text = metrics_json(metrics)
    md = render_markdown(metrics, title)
    html = render_html(metrics, entries, title)
    report_dir = Path(report_dir)
    paths = {"metrics": report_dir / "metrics.json", "markdown": report_dir / "report.md", "html": report_dir / "report.html"}
    atomic_write(paths["metrics"], text)
    atomic_write(paths["markdown"], md)
    atomic_write(paths["html"], html)
    return paths
