"""The report of ``vdit-sparse tune``: one HTML page with inline SVG beside the YAML, and its data as JSON.

Per-layer settings (bars: realised density of the chosen setting), error curves (per layer, error
against realised density for every candidate), predicted against measured speed-up and PSNR on
held-out prompts, and the PSNR fit when the target was a PSNR.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from ..quality.plots import LINE_COLOURS, nice_ticks

W, H = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 30, 45


def report_paths(table: Path) -> tuple[Path, Path]:
    stem = table.with_suffix("")
    return stem.with_name(stem.name + ".report.html"), stem.with_name(stem.name + ".report.json")


def _svg(title: str, xlabel: str, ylabel: str, body: list[str]) -> str:
    cy = TOP + (H - TOP - BOTTOM) / 2
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">{escape(ylabel)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#888"/>',
        *body, "</svg>",
    ])


def _span(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened when empty, so a flat series still gets a scale and ticks."""
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def _scale(lo: float, hi: float, a: float, b: float):
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def _y_ticks(lo: float, hi: float, py) -> list[str]:
    return [f'<text x="{LEFT - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>' for v in nice_ticks(lo, hi)]


def xy_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> str:
    """One polyline with markers per named series of (x, y) points."""
    pts = [p for s in series.values() for p in s if all(map(math.isfinite, p))]
    xs, ys = [x for x, _ in pts] or [0.0, 1.0], [y for _, y in pts] or [0.0, 1.0]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(0.0, min(ys)), max(ys) * 1.05)
    px, py = _scale(x0, x1, LEFT, W - RIGHT), _scale(y0, y1, H - BOTTOM, TOP)
    body = _y_ticks(y0, y1, py)
    body += [f'<text x="{px(v):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{v:.3g}</text>' for v in nice_ticks(x0, x1)]
    for n, (name, points) in enumerate(series.items()):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        points = sorted(p for p in points if all(map(math.isfinite, p)))
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
        body.append(f'<text x="{W - RIGHT - 4}" y="{TOP + 14 + 13 * n}" text-anchor="end" fill="{colour}">{escape(name)}</text>')
    return _svg(title, xlabel, ylabel, body)


def bar_chart(labels: list[str], values: list[float], notes: list[str], title: str, ylabel: str) -> str:
    """One bar per label, its ``note`` written above it."""
    y1 = max(values + [1e-12]) * 1.15
    py = _scale(0.0, y1, H - BOTTOM, TOP)
    width = (W - LEFT - RIGHT) / max(1, len(values))
    body = _y_ticks(0.0, y1, py)
    for i, (label, v, note) in enumerate(zip(labels, values, notes)):
        x = LEFT + i * width
        body.append(f'<rect x="{x + width * 0.15:.1f}" y="{py(v):.1f}" width="{width * 0.7:.1f}" '
                    f'height="{py(0.0) - py(v):.1f}" fill="#1f77b4"><title>{escape(note)}</title></rect>')
        if len(values) <= 24:  # notes of many layers would overlap; the bar's tooltip still has them
            body.append(f'<text x="{x + width / 2:.1f}" y="{py(v) - 3:.1f}" text-anchor="middle" font-size="9">{escape(note)}</text>')
        body.append(f'<text x="{x + width / 2:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{escape(label)}</text>')
    return _svg(title, "layer", ylabel, body)


def _setting(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else escape(str(v))

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table border='1' cellspacing='0' cellpadding='4'><tr>{head}</tr>{body}</table>"


def _measured(mean: dict, key: str) -> str:
    """A validation mean's speed-up over its reliable timings, or why there is none."""
    value = mean.get(key)
    if value is None:
        return f"no reliable timing (0 of {mean.get('timed_entries', 0)})"
    return f"{value:.3g}x ({mean['reliable_entries']} of {mean['timed_entries']} timings reliable)"


def _speed_rows(meta: dict, validation: dict | None, uniform: dict) -> list[list]:
    p = meta["predicted"]
    runs = [("tuned", "per layer")] + ([(f"uniform {_setting(uniform)}", "")] if validation else [])
    rows = []
    for (name, note), key in zip(runs, ("tuned", "uniform")):
        m = validation["mean"][key] if validation else None
        rows.append([name, note, p["attention_speedup"], _measured(m, "attention_speedup") if m else "not run",
                     _measured(m, "speedup") if m else "not run", m["psnr"] if m else "not run"])
    return rows


def _held_out_speedup(run: dict) -> str:
    text = f"{run['speedup']:.3g}x ({run['speedup_spread'][0]:.3g}-{run['speedup_spread'][1]:.3g})"
    return text if run["timing_reliable"] else f"{text} unreliable: {'; '.join(run['timing_reasons'])}"


def render(meta, cands, options, chosen, validation, fit, uniform) -> str:
    layers = sorted(chosen)
    bars = bar_chart([str(l) for l in layers], [chosen[l].density for l in layers],
                     [_setting(chosen[l].setting) for l in layers], "chosen setting per layer", "realised density")
    curves = xy_plot({f"layer {l}": [(o.density, o.error) for o in options[l]] for l in layers},
                     "calibrated error per candidate", "realised density", "relative attention error")
    warning = "" if "measured" in meta["cost_model"] else (
        "<p><b>Cost model: proportional fallback, no GPU measurement.</b> Predicted speed-ups count computed "
        "attention only; run vdit-sparse bench --cost-model on the target GPU and pass --cost-model.</p>")
    warning += "".join(f"<p><b>warning:</b> {escape(w)}</p>" for w in meta.get("warnings", []))
    parts = [f"<h1>vdit-sparse tune: {escape(meta['attention'])} ({escape(meta['knob'])})</h1>", warning,
             f"<p>target {escape(str(meta['target']))}; cost model: {escape(meta['cost_model'])}; "
             f"model {escape(meta['model'])}; {escape(meta['date'])}</p>", bars, curves,
             "<h2>Predicted against measured</h2>",
             _table(["table", "", "predicted attention speed-up", "measured attention speed-up (held-out)",
                     "measured speed-up (held-out)", "PSNR dB (held-out)"], _speed_rows(meta, validation, uniform)),
             "<p>Measured speed-ups are medians of dense and each table timed alternately after one warm-up each "
             "(tune --repeats), averaged over the prompts whose timing is reliable (runs within 10 % of each other, "
             "load average under the cores); on a CPU they do not predict a GPU's.</p>"]
    rows = [[l, _setting(chosen[l].setting), chosen[l].error, chosen[l].density, chosen[l].cost] for l in layers]
    parts += ["<h2>Per layer</h2>", _table(["layer", "setting", "predicted error", "realised density", "predicted cost"], rows)]
    if validation:
        vr = [[r["prompt"], r["tuned"]["psnr"], r["uniform"]["psnr"], r["tuned"]["density"], r["uniform"]["density"],
               _held_out_speedup(r["tuned"]), _held_out_speedup(r["uniform"])] for r in validation["prompts"]]
        parts += ["<h2>Held-out prompts</h2>", _table(["prompt", "tuned PSNR", "uniform PSNR", "tuned density",
                                                       "uniform density", "tuned speed-up", "uniform speed-up"], vr)]
    if fit:
        pts = [[str(p["setting"]), p["predicted_error"], p["psnr"]] for p in fit["uniform_points"]]
        pts += [[f"tuned, searched at error {r['searched_error']:.3g}", r["predicted_error"], r["psnr"]] for r in fit["rounds"]]
        parts += [f"<h2>PSNR fit: PSNR ≈ {fit['a']:.3g} − {fit['b']:.3g}·log10(error)</h2>",
                  _table(["run", "predicted mean error", "PSNR dB (calibration prompts)"], pts)]
    return "<!doctype html><html><head><meta charset='utf-8'><title>vdit-sparse tune</title></head><body>" + "\n".join(parts) + "</body></html>\n"


def write_report(table: Path, meta, cands, options, chosen, validation, fit, uniform) -> Path:
    """Write NAME.report.html and NAME.report.json beside the table; returns the HTML path."""
    from ..atomicfile import atomic_write, atomic_write_json

    html_path, json_path = report_paths(table)
    data = {
        "metadata": meta,
        "candidates": [c.setting for c in cands],
        "curves": {str(l): [{"setting": o.setting, "error": o.error, "density": o.density, "cost": o.cost} for o in opts]
                   for l, opts in options.items()},
        "chosen": {str(l): o.setting for l, o in chosen.items()},
        "validation": validation, "psnr_fit": fit, "uniform": uniform,
    }
    atomic_write_json(json_path, data)
    atomic_write(html_path, render(meta, cands, options, chosen, validation, fit, uniform))
    return html_path
