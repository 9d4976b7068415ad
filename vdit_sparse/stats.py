"""Per-call statistics: method, realised density and attention time, per step × layer × branch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class Timer:
    """Times a region: CUDA events on GPU (read lazily, no sync on the hot path), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> "Timer":
        if self.cuda:
            self.end.record()
        else:
            self.ms_value = (time.perf_counter() - self.t0) * 1e3
        return self

    def ms(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return self.ms_value


@dataclass
class Stats:
    rows: list[dict] = field(default_factory=list)

    def record(self, timer: Timer, **row) -> None:
        row["_timer"] = timer
        self.rows.append(row)

    def table(self) -> list[dict]:
        """One dict per attention call: step, layer, branch, model, method, density, ms and method extras."""
        out = []
        for row in self.rows:  # tensors were kept as they were on the hot path; read them once, here
            row = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
            row["ms"] = row.pop("_timer").ms()
            out.append(row)
        return out

    def clear(self) -> None:
        self.rows.clear()


def gather_ranks(table: list[dict], group) -> list[dict]:
    """Every Ulysses rank's table merged into each (ranks make the same calls on their own heads):
    per call, the density averaged over the heads of all ranks and the slowest rank's ms. A collective:
    every rank of ``group`` calls it; plain numbers travel, once per read, never on the hot path."""
    import torch.distributed as dist

    mine = [(r["density"], r.get("heads", 1), r["ms"]) for r in table]
    ranks: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, mine, group=group)
    if any(len(other) != len(mine) for other in ranks):
        counts = [len(other) for other in ranks]
        raise RuntimeError(f"stats: the Ulysses ranks recorded {counts} calls; they must make the same calls")
    merged = []
    for i, row in enumerate(table):
        calls = [other[i] for other in ranks]  # (density, heads, ms) of this call on each rank
        heads = sum(h for _, h, _ in calls)
        density = sum(d * h for d, h, _ in calls) / heads
        merged.append({**row, "density": density, "heads": heads, "ms": max(ms for _, _, ms in calls)})
    return merged


def summarize(table: list[dict]) -> dict:
    """Mean realised density and total attention time over a run's calls."""
    if not table:
        return {"calls": 0, "density": None, "attention_ms": 0.0}
    return {
        "calls": len(table),
        "density": sum(r["density"] for r in table) / len(table),
        "attention_ms": sum(r["ms"] for r in table),
    }


def density_by_layer(table: list[dict]) -> dict[str, float]:
    """Mean realised density per layer (keys "model.layer" as strings, JSON-friendly)."""
    acc: dict[str, list[float]] = {}
    for r in table:
        acc.setdefault(f"{r['model']}.{r['layer']}", []).append(r["density"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def computed_share(computed: list[dict]) -> float | None:
    """Mean share of self-attention layers that ran per transformer call (``AccelerateHandle.computed()``
    rows; the rest were served by a step-level cache), or None without calls."""
    return sum(c["computed"] for c in computed) / len(computed) if computed else None


DENSITY_GAP = 0.1  # a realised density this far from the requested one deserves a word


def same_density(points: list[tuple], what: str) -> list[str]:
    """A warning per group of ``points`` (label, realised density[, computed share]) that realise the same
    density (to 3 places) and, where given, the same share of layers computed (a step cache that skips
    makes a different setting at equal density): too small a token grid for the blocks makes them one."""
    groups: dict[tuple, list[str]] = {}
    for label, density, *computed in points:
        share = computed[0] if computed and computed[0] is not None else None
        groups.setdefault((round(density, 3), None if share is None else round(share, 3)), []).append(str(label))
    return [f"{what} {', '.join(labels)} realise the same density {d}: they are one setting here"
            for (d, _), labels in groups.items() if len(labels) > 1]
