"""The search of ``vdit-sparse tune``: one setting per layer, least predicted cost, error within the target.

Every layer has a few options (a setting, its predicted relative attention error, its predicted
cost), from the calibration curves and the cost model. Choosing one per layer so that the summed
cost is least while the mean error stays ≤ E is a multiple-choice knapsack; it is solved exactly
(up to rounding each error *up* to 1/``BINS`` of the error budget, so the answer never exceeds it)
by dynamic programming over the spent error budget: O(layers × options × BINS).

A PSNR target is reached through a fitted relation between the mean attention error and the
end-to-end PSNR against dense: PSNR ≈ a − b·log10(error), fitted on real runs (PSNR = −10·log10 MSE
and the video's error grows with the attention error, so b is 20 when they are proportional).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BINS = 2000
DEFAULT_SLOPE = 20.0  # dB per decade of error when the video's error is proportional to attention error
PSNR_CAP = 100.0  # dB: an identical video's PSNR (infinite) counts as this, so means stay finite; printed "identical"


@dataclass(frozen=True)
class Option:
    """One candidate setting of one layer, with what calibration predicts for it."""

    setting: dict  # what the tuned table holds for the layer, e.g. {"density": 0.2} or {"attention": "dense"}
    error: float  # mean relative L2 error of the attention output against dense
    density: float  # mean realised density
    cost: float  # predicted attention time of the layer over a run (cost model units)


class InfeasibleTarget(ValueError):
    """Even the most accurate option of every layer misses the target."""


def choose(options: dict[int, list[Option]], target_error: float) -> dict[int, Option]:
    """{layer: option} of least summed cost with mean error ≤ ``target_error``."""
    layers = sorted(options)
    budget = target_error * len(layers)  # mean ≤ E  ⇔  sum ≤ L·E
    best_error = sum(min(o.error for o in options[layer]) for layer in layers) / len(layers)
    if best_error > target_error:
        raise InfeasibleTarget(
            f"target error {target_error:g}: unreachable; the most accurate setting of every layer gives {best_error:.4g}"
        )
    unit = budget / BINS
    # weight of an option: its error in budget units, rounded up so the sum never passes the budget
    weights = {layer: [math.ceil(o.error / unit - 1e-9) if unit > 0 else (0 if o.error == 0 else BINS + 1)
                       for o in options[layer]] for layer in layers}
    INF = math.inf
    cost = [0.0] * (BINS + 1)  # least cost of the layers so far with at most b units spent
    picks: list[list[int]] = []
    for layer in layers:
        new = [INF] * (BINS + 1)
        pick = [-1] * (BINS + 1)
        for i, (o, w) in enumerate(zip(options[layer], weights[layer])):
            for b in range(w, BINS + 1):
                c = cost[b - w] + o.cost
                if c < new[b]:
                    new[b], pick[b] = c, i
        cost = new
        picks.append(pick)
    if math.isinf(cost[BINS]):  # rounding up made the exact-feasible answer miss: take the safest options
        return {layer: min(options[layer], key=lambda o: (o.error, o.cost)) for layer in layers}
    return _trace(options, layers, weights, picks)


def _trace(options, layers, weights, picks) -> dict[int, Option]:
    out, b = {}, BINS
    for n in range(len(layers) - 1, -1, -1):
        layer = layers[n]
        i = picks[n][b]
        out[layer] = options[layer][i]
        b -= weights[layer][i]
    return dict(sorted(out.items()))


def totals(chosen: dict[int, Option]) -> dict:
    """Summed cost and mean error and density of a choice."""
    n = max(1, len(chosen))
    return {
        "cost": sum(o.cost for o in chosen.values()),
        "error": sum(o.error for o in chosen.values()) / n,
        "density": sum(o.density for o in chosen.values()) / n,
    }


def fit_psnr(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of PSNR ≈ a − b·log10(error) through (mean error, PSNR dB) points; b = 20 with < 2 usable points."""
    usable = [(math.log10(e), p) for e, p in points if e > 0 and math.isfinite(p)]
    if not usable:
        raise ValueError("PSNR fit: no run with a finite PSNR and a positive predicted error")
    if len(usable) >= 2:
        mx = sum(x for x, _ in usable) / len(usable)
        my = sum(y for _, y in usable) / len(usable)
        sxx = sum((x - mx) ** 2 for x, _ in usable)
        if sxx > 1e-12:
            b = -sum((x - mx) * (y - my) for x, y in usable) / sxx
            if b > 0:  # more error, less PSNR; anything else is noise of too few runs
                return my + b * mx, b
    b = DEFAULT_SLOPE
    return sum(y + b * x for x, y in usable) / len(usable), b


def error_for_psnr(a: float, b: float, target_psnr: float) -> float:
    """The mean attention error at which the fitted relation gives ``target_psnr``."""
    return 10 ** ((a - target_psnr) / b)
