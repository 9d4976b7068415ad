"""Speed-ups a user can stand behind: alternated, repeated timings, their spread, and when not to trust them.

One timing of a baseline and one of a candidate, taken one after the other, is a ratio of two samples of a
noisy quantity; on a shared machine it can be off several fold. So every side of a comparison gets one untimed
warm-up run, then the sides run in turn (baseline, candidate, baseline, candidate, ...) ``repeats`` times, so a
slow spell of the machine falls on both; the speed-up is the ratio of the medians, and its spread the ratio of
the extremes. A comparison is *unreliable* when either side's runs spread by more than :data:`SPREAD_LIMIT` of
their median, when the load average exceeded the core count while they ran, or when the ratio is more than the
computed work allows (:func:`speedup_bound`).

The clock is injectable (tests script it); a run may instead report its own duration (``seconds``), e.g. the
pipeline call alone, without the setting up around it.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

SPREAD_LIMIT = 0.10  # a side whose runs differ by more than this share of their median is noise, not a timing
BOUND_SLACK = 0.10  # a ratio this far above the work bound is flagged; below it, timing noise can explain it


@dataclass(frozen=True)
class Series:
    """The seconds of one side's timed runs, in the order they ran."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: 0 for identical runs."""
        return (max(self.seconds) - min(self.seconds)) / self.median


@dataclass(frozen=True)
class Timings:
    """Alternated runs of a baseline and one candidate, with the load average sampled around every run."""

    baseline: Series
    candidate: Series
    loads: tuple[float, ...] = ()  # 1-minute load averages; empty where the platform has none
    cpus: int | None = None

    @property
    def speedup(self) -> float:
        return self.baseline.median / self.candidate.median

    @property
    def speedup_spread(self) -> list[float]:
        """[low, high]: the fastest baseline over the slowest candidate run, the slowest baseline over the fastest."""
        base, cand = self.baseline.seconds, self.candidate.seconds
        return [min(base) / max(cand), max(base) / min(cand)]

    def reasons(self, limit: float = SPREAD_LIMIT) -> list[str]:
        """Why this speed-up should not be trusted, one phrase each; empty when it can be."""
        out = []
        if min(len(self.baseline.seconds), len(self.candidate.seconds)) < 2:
            out.append("one timed run per side: no spread to judge it by (use --repeats 3 or more)")
        for name, series in (("reference", self.baseline), ("accelerated", self.candidate)):
            if series.spread > limit:
                out.append(f"{name} runs spread by {100 * series.spread:.0f} % "
                           f"({min(series.seconds):.3g}-{max(series.seconds):.3g} s), over the {100 * limit:.0f} % allowed")
        busiest = max(self.loads, default=None)
        if busiest is not None and self.cpus and busiest > self.cpus:
            out.append(f"load average {busiest:.1f} exceeded the {self.cpus} cores during the runs")
        return out

    def to_json(self) -> dict:
        return {"baseline_s": list(self.baseline.seconds), "candidate_s": list(self.candidate.seconds),
                "loads": list(self.loads), "cpus": self.cpus}

    @classmethod
    def from_json(cls, d: dict) -> "Timings":
        return cls(Series(tuple(d["baseline_s"])), Series(tuple(d["candidate_s"])), tuple(d.get("loads") or ()),
                   d.get("cpus"))


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def alternate(runs: dict, repeats: int, warmup: bool = True, clock=time.perf_counter, seconds=None,
              load=None) -> tuple[dict[str, Series], dict[str, list], tuple[float, ...]]:
    """Run each of ``runs`` (name -> fn()) once untimed, then all of them in turn ``repeats`` times.

    Returns (name -> Series, name -> what each timed run returned, load averages sampled before the first
    and after every timed run). A run's duration is ``seconds(result)`` when given (a run that times its own
    core, e.g. the pipeline call), else the ``clock`` difference around the call; ``load()`` gives the load
    average (default: the platform's).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}: must be a positive integer")
    load = load or load_average
    if warmup:  # one-off costs (allocations, caches, compilation) on neither side
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, list] = {name: [] for name in runs}
    loads = [load()]
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = clock()
            result = fn()
            elapsed = clock() - t0
            times[name].append(float(seconds(result)) if seconds is not None else elapsed)
            results[name].append(result)
            loads.append(load())
    return ({name: Series(tuple(t)) for name, t in times.items()}, results,
            tuple(x for x in loads if x is not None))


def cores() -> int | None:
    """The cores this process may run on (its affinity, where the platform tells), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def paired(series: dict[str, Series], baseline: str, candidate: str, loads: tuple = ()) -> Timings:
    """The Timings of ``candidate`` against ``baseline`` from one :func:`alternate` call."""
    return Timings(series[baseline], series[candidate], tuple(loads), cores())


def verdict(t: Timings, bound: float | None = None) -> dict:
    """The timing fields of every timed entry: speedup, speedup_spread, timing_reliable and timing_reasons
    (``bound``: the work bound of :func:`speedup_bound`, None when there is none)."""
    reasons = t.reasons() + [r for r in [impossible(t.speedup, bound)] if r]
    return {"speedup": t.speedup, "speedup_spread": t.speedup_spread, "timing_reliable": not reasons,
            "timing_reasons": reasons}


def mean_speedups(entries: list[dict], keys=("speedup", "attention_speedup")) -> dict:
    """``keys`` averaged over the entries whose timing is reliable only (None when there is none, or when one of
    them lacks the key), their mean spread, and how many of the timed entries were reliable."""
    reliable = [e for e in entries if e.get("timing_reliable")]
    out = {}
    for key in keys:
        values = [e.get(key) for e in reliable]
        out[key] = float(statistics.fmean(values)) if values and None not in values else None
    spreads = [e.get("speedup_spread") for e in reliable]
    out["speedup_spread"] = ([statistics.fmean(s[i] for s in spreads) for i in (0, 1)]
                             if spreads and None not in spreads else None)
    out["timing_reliable"] = bool(reliable)
    out["timed_entries"] = sum(e.get("speedup") is not None for e in entries)
    out["reliable_entries"] = len(reliable)
    return out


# --- what the work allows --------------------------------------------------------------------------------


def speedup_bound(computed_share: float | None, attention_share: float | None, attention_cheaper: bool) -> float | None:
    """The largest speed-up the work that was skipped can explain, or None when it cannot be bounded.

    The reference's wall time W is O + A + F: O outside the transformer blocks (text encoder, VAE, scheduler),
    A its self-attention (share a = A / W) and F the rest of the blocks. A step cache that runs a share c of the
    self-attention layers runs at most that share of the blocks; O is always paid. So the accelerated run takes
    at least O + c·F + A', where A' is its attention time. With A' >= 0 (sparse attention or tile-skip, however
    good): time >= O + c·F >= c·(O + F) = c·(1 - a)·W, so speed-up <= 1 / (c·(1 - a)). When its attention is the
    same dense attention, A' = c·A and time >= c·W: speed-up <= 1 / c. E.g. c = 0.9 with dense attention: 1.11x.
    """
    c = 1.0 if computed_share is None else float(computed_share)
    if c <= 0:
        return None
    if not attention_cheaper:
        return 1.0 / c
    if attention_share is None or not 0 <= attention_share < 1:
        return None  # the reference's attention time is unknown: nothing bounds a sparse run
    return 1.0 / (c * (1.0 - attention_share))


def impossible(speedup: float | None, bound: float | None, slack: float = BOUND_SLACK) -> str | None:
    """A phrase when ``speedup`` is more than the work allows (beyond timing noise), else None."""
    if speedup is None or bound is None or speedup <= bound * (1 + slack):
        return None
    return f"{speedup:.2f}x is more than the {bound:.2f}x the computed work allows"


# --- threads ---------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None``: leave torch's default); returns the count in use."""
    import torch

    from .errors import UserError

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserError(f"--threads {threads!r}: must be a positive integer (e.g. 1 on a busy machine)")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
