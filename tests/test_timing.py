"""vdit_sparse/timing.py with a scripted clock: alternation, medians, spread, reliability and the work bound."""

import json
import random

import pytest

from vdit_sparse.errors import UserError
from vdit_sparse.timing import (
    SPREAD_LIMIT, Series, Timings, alternate, impossible, paired, set_threads, speedup_bound,
)


class Clock:
    """A clock that only moves when a fake run says how long it took."""

    def __init__(self):
        self.now = 100.0
        self.log = []

    def __call__(self) -> float:
        return self.now

    def run(self, name: str, durations: list[float]):
        it = iter(durations)

        def fn():
            self.log.append(name)
            self.now += next(it)
            return name
        return fn


def _alternate(base: list[float], cand: list[float], loads=(0.5,), **kw):
    clock, load = Clock(), iter(list(loads) * 100)
    runs = {"dense": clock.run("dense", base), "fast": clock.run("fast", cand)}
    series, results, sampled = alternate(runs, len(base) - 1, clock=clock, load=lambda: next(load), **kw)
    return clock, series, results, paired(series, "dense", "fast", sampled)


def test_warm_up_of_each_side_then_the_sides_alternate_and_only_timed_runs_count():
    clock, series, results, _ = _alternate([50.0, 2.0, 2.2, 2.1], [40.0, 1.0, 1.1, 1.05])  # first: warm-up
    assert clock.log == ["dense", "fast"] + ["dense", "fast"] * 3
    assert series["dense"].seconds == pytest.approx((2.0, 2.2, 2.1)) and series["fast"].seconds == pytest.approx((1.0, 1.1, 1.05))
    assert results == {"dense": ["dense"] * 3, "fast": ["fast"] * 3}


def test_speedup_is_the_ratio_of_medians_and_its_spread_comes_from_the_extreme_runs():
    _, _, _, t = _alternate([9.0, 2.0, 2.4, 2.1, 2.2, 2.05], [9.0, 1.0, 1.05, 1.2, 1.1, 1.02])
    assert t.speedup == pytest.approx(2.1 / 1.05)
    assert t.speedup_spread == pytest.approx([2.0 / 1.2, 2.4 / 1.0])
    assert t.baseline.spread == pytest.approx((2.4 - 2.0) / 2.1)


def test_a_steady_series_is_reliable_and_a_noisy_one_is_flagged_with_its_reason():
    _, _, _, steady = _alternate([5.0, 2.0, 2.05, 1.98], [5.0, 1.0, 1.03, 0.99])
    assert steady.reasons() == []
    # the case: one slow spell of the machine makes the reference 5x slower once
    _, _, _, noisy = _alternate([5.0, 2.0, 10.0, 2.1], [5.0, 1.0, 1.03, 0.99])
    (reason,) = noisy.reasons()
    assert reason.startswith("reference runs spread by 381 %") and "(2-10 s)" in reason
    _, _, _, edge = _alternate([5.0, 2.0, 2.0 * (1 + SPREAD_LIMIT) - 1e-9, 2.0], [5.0, 1.0, 1.0, 1.0])
    assert edge.reasons() == []  # just inside the limit


def test_a_load_above_the_core_count_during_the_runs_is_flagged():
    _, _, _, t = _alternate([5.0, 2.0, 2.0], [5.0, 1.0, 1.0], loads=(0.3, 0.4, 99.0, 0.2))
    assert t.loads and max(t.loads) == 99.0
    assert any(r.startswith("load average 99.0 exceeded the") for r in t.reasons())
    assert Timings(t.baseline, t.candidate, (1.0,), cpus=2).reasons() == []


def test_a_single_run_per_side_has_no_spread_to_trust():
    _, _, _, t = _alternate([5.0, 2.0], [5.0, 1.0])
    assert t.speedup == 2.0 and t.speedup_spread == [2.0, 2.0]
    assert t.reasons() == ["one timed run per side: no spread to judge it by (use --repeats 3 or more)"]


def test_runs_that_time_themselves_are_taken_at_their_word_and_repeats_must_be_positive():
    clock = Clock()
    runs = {"a": lambda: {"wall_s": 3.0}, "b": lambda: {"wall_s": 1.5}}
    series, _, _ = alternate(runs, 2, clock=clock, seconds=lambda r: r["wall_s"], load=lambda: None)
    assert series["a"].seconds == (3.0, 3.0) and series["b"].median == 1.5
    with pytest.raises(ValueError, match="repeats=0: must be a positive integer"):
        alternate(runs, 0)


def test_timings_round_trip_through_strict_json():
    t = Timings(Series((2.0, 2.1)), Series((1.0, 1.1)), (0.5, 1.25), 2)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    again = Timings.from_json(json.loads(json.dumps(t.to_json(), allow_nan=False), parse_constant=refuse))
    assert again == t


def test_the_work_bound_matches_the_examples_and_flags_the_impossible():
    assert speedup_bound(0.9, 0.3, attention_cheaper=False) == pytest.approx(1 / 0.9)  # a step cache, dense attention
    assert speedup_bound(1.0, 0.25, attention_cheaper=True) == pytest.approx(4 / 3)  # sparse attention alone
    assert speedup_bound(0.5, 0.5, attention_cheaper=True) == pytest.approx(4.0)
    assert speedup_bound(None, None, attention_cheaper=True) is None  # unknown attention share: no bound
    assert impossible(6.0, speedup_bound(0.9, 0.3, False)) == "6.00x is more than the 1.11x the computed work allows"
    assert impossible(1.03, 1.0) is None  # within timing noise of the bound
    assert impossible(1.2, 1.0).startswith("1.20x")


def test_no_mix_of_skipped_blocks_and_cheaper_attention_beats_the_bound():
    rng = random.Random(0)
    for _ in range(2000):
        outside, attention, rest = (rng.uniform(0, 1) for _ in range(3))  # O, A, F of the reference's wall time
        wall = outside + attention + rest
        blocks = rng.randint(1, 40)
        ran = rng.randint(1, blocks)  # a step cache runs `ran` of the blocks
        c = ran / blocks
        sparse = rng.random() < 0.5
        attention_after = rng.uniform(0, 1) * attention * c if sparse else attention * c
        fastest = outside + c * rest + attention_after
        bound = speedup_bound(c, attention / wall, sparse)
        assert wall / fastest <= bound * (1 + 1e-12)


def test_threads_are_set_and_bad_counts_refused():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1  # None keeps what is set
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(UserError, match=f"--threads {bad!r}: must be a positive integer"):
            set_threads(bad)
