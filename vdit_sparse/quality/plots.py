"""Small inline-SVG plots (heat map, lines, scatter with its Pareto front), no plotting library.

Each function returns one ``<svg>`` string that an HTML page can embed as it is.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

from .video import heat_colours

WIDTH, HEIGHT = 560, 300
MARGIN = dict(left=60, right=20, top=30, bottom=45)
LINE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.3g}"


def _frame(title: str, xlabel: str, ylabel: str, body: list[str], width: int = WIDTH, height: int = HEIGHT) -> str:
    cx = MARGIN["left"] + (width - MARGIN["left"] - MARGIN["right"]) / 2
    cy = MARGIN["top"] + (height - MARGIN["top"] - MARGIN["bottom"]) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<text x="{cx}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<text x="{cx}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">{escape(ylabel)}</text>',
        *body,
        "</svg>",
    ]
    return "\n".join(parts)


class _Axes:
    """Linear map from data to pixels inside the margins, with a few ticks."""

    def __init__(self, xs: list[float], ys: list[float], width: int = WIDTH, height: int = HEIGHT):
        self.x0, self.x1 = _span(xs)
        self.y0, self.y1 = _span(ys)
        self.left, self.right = MARGIN["left"], width - MARGIN["right"]
        self.top, self.bottom = MARGIN["top"], height - MARGIN["bottom"]

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def draw(self) -> list[str]:
        out = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}" fill="none" stroke="#888"/>'
        ]
        for v in nice_ticks(self.x0, self.x1):
            out.append(f'<text x="{self.px(v):.1f}" y="{self.bottom + 14}" text-anchor="middle">{_fmt(v)}</text>')
        for v in nice_ticks(self.y0, self.y1):
            out.append(f'<text x="{self.left - 4}" y="{self.py(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
        return out


def nice_ticks(lo: float, hi: float, about: int = 5) -> list[float]:
    """Round tick values inside [lo, hi]: multiples of 1, 2 or 5 times a power of ten."""
    raw = (hi - lo) / about
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 0.5)  # a flat series still gets a visible range
    return lo - pad, hi + pad


def line_plot(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str) -> str:
    """One polyline per named series over x = 0, 1, ...; ``inf`` points sit on the top edge as ▲."""
    xs = [float(i) for values in series.values() for i in range(len(values))]
    ys = [v for values in series.values() for v in values]
    axes = _Axes(xs or [0.0], ys)
    body = axes.draw()
    for n, (name, values) in enumerate(series.items()):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        points = [(axes.px(i), axes.top if math.isinf(v) else axes.py(v)) for i, v in enumerate(values)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for (x, y), v in zip(points, values):
            marker = "▲" if math.isinf(v) else "●"
            body.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" fill="{colour}" font-size="8">{marker}</text>')
        body.append(
            f'<text x="{axes.right - 4}" y="{axes.top + 14 + 13 * n}" text-anchor="end" fill="{colour}">{escape(name)}</text>'
        )
    return _frame(title, xlabel, ylabel, body)


# viridis-like anchors: every value, 1 included, stays visible on a white page
DENSITY_ANCHORS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]


def heatmap(matrix: np.ndarray, title: str, xlabel: str, ylabel: str, vmin: float = 0.0, vmax: float = 1.0) -> str:
    """Cells of ``matrix`` (rows = y, from the top; columns = x) coloured on [vmin, vmax]; NaN is grey."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    left, top = MARGIN["left"], MARGIN["top"]
    plot_w, plot_h = WIDTH - left - MARGIN["right"] - 50, HEIGHT - top - MARGIN["bottom"]  # 50 px for the scale bar
    cw, ch = plot_w / max(cols, 1), plot_h / max(rows, 1)
    colours = heat_colours((matrix - vmin) / ((vmax - vmin) or 1.0), DENSITY_ANCHORS)
    body = []
    for r in range(rows):
        for c in range(cols):
            v = matrix[r, c]
            fill = "#bbb" if np.isnan(v) else "#%02x%02x%02x" % tuple(colours[r, c])
            body.append(
                f'<rect x="{left + c * cw:.1f}" y="{top + r * ch:.1f}" width="{cw + 0.3:.1f}" height="{ch + 0.3:.1f}" '
                f'fill="{fill}"><title>{escape(ylabel)} {r}, {escape(xlabel)} {c}: {_fmt(v)}</title></rect>'
            )
    for c in _ticks(cols):
        body.append(f'<text x="{left + (c + 0.5) * cw:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{c}</text>')
    for r in _ticks(rows):
        body.append(f'<text x="{left - 4}" y="{top + (r + 0.5) * ch + 4:.1f}" text-anchor="end">{r}</text>')
    bar_x = left + plot_w + 15
    for i in range(20):  # scale bar, vmax at the top
        colour = "#%02x%02x%02x" % tuple(heat_colours(np.array(1 - i / 19), DENSITY_ANCHORS))
        body.append(f'<rect x="{bar_x}" y="{top + i * plot_h / 20:.1f}" width="12" height="{plot_h / 20 + 0.3:.1f}" fill="{colour}"/>')
    body.append(f'<text x="{bar_x + 14}" y="{top + 8}">{_fmt(vmax)}</text>')
    body.append(f'<text x="{bar_x + 14}" y="{top + plot_h}">{_fmt(vmin)}</text>')
    return _frame(title, xlabel, ylabel, body)


def _ticks(n: int, most: int = 10) -> range:
    return range(0, n, max(1, math.ceil(n / most)))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points that no other point beats on both x and y (higher is better), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def scatter(points: list[tuple[float, float, str]], title: str, xlabel: str, ylabel: str) -> str:
    """Labelled points, with the Pareto front (higher x and higher y better) joined by a line."""
    axes = _Axes([p[0] for p in points], [p[1] for p in points])
    body = axes.draw()
    front = pareto_front([(x, y) for x, y, _ in points])
    if len(front) > 1:
        path = " ".join(f"{axes.px(points[i][0]):.1f},{_py(axes, points[i][1]):.1f}" for i in front)
        body.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-dasharray="4 3"/>')
    for i, (x, y, label) in enumerate(points):
        colour = "#d62728" if i in front else "#1f77b4"
        px, py = axes.px(x), _py(axes, y)
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colour}"/>')
        body.append(f'<text x="{px + 6:.1f}" y="{py - 6:.1f}">{escape(label)}</text>')
    return _frame(title, xlabel, ylabel, body)


def _py(axes: _Axes, y: float) -> float:
    return axes.top if math.isinf(y) else axes.py(y)
