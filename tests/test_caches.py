"""Step-level caches (diffusers' hooks) composed with our attention, on the tiny pipelines of all three families.

With a cache's skipping turned off the output is the plain dense one, bit for bit; with skipping on, the
layers that did not run made no call (our counters, tile-skip marks and stats see only real calls), and
``remove()`` takes the cache out with everything else.
"""

import numpy as np
import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.caches import calibrate_mag_ratios, parse_cache
from vdit_sparse.pipelines import adapter_for

from .conftest import run_tiny
from .pipelines import test_cogvideox as cog
from .pipelines import test_hunyuan as hun

STEPS = 4


def _family(name, tiny_pipe):
    """(pipeline, generate() -> output) of a family's tiny pipeline at STEPS steps."""
    if name == "wan":
        return tiny_pipe, lambda: torch.from_numpy(run_tiny(tiny_pipe, steps=STEPS))
    if name == "hunyuan":
        pipe = hun.build_pipeline(hun.build_transformer(num_layers=2, num_single_layers=2))
        return pipe, hun.pipeline_generate(pipe, steps=STEPS)
    pipe = cog.build_pipeline("1.0")
    return pipe, cog.pipeline_generate(pipe, steps=STEPS)


def _mag_ratios(pipe, generate) -> list[float]:
    def run():
        acc = vs.accelerate(pipe, cache="magcache", **{"magcache.calibrate": True, "magcache.num_inference_steps": STEPS})
        try:
            generate()
        finally:
            acc.remove()

    found = calibrate_mag_ratios(run)
    assert found and all(len(r) == STEPS for r in found)
    return [float(x) for x in np.mean(found, axis=0)]


NO_SKIP = {  # each cache with its skipping turned off
    "fbcache": {"fbcache.threshold": 0.0},
    "magcache": {"magcache.threshold": 0.0, "magcache.num_inference_steps": STEPS},
    "taylorseer": {"taylorseer.disable_cache_before_step": 99},
    "pab": {"pab.block_skip_range": 1},
    "seacache": {"seacache.threshold": 0.0},
}


@pytest.mark.parametrize("family", ["wan", "hunyuan", "cogvideox"])
def test_every_step_cache_without_skipping_is_bit_identical_to_plain_dense(family, tiny_pipe):
    pipe, generate = _family(family, tiny_pipe)
    ref = generate()
    ratios = _mag_ratios(pipe, generate)
    for cache, settings in NO_SKIP.items():
        if cache in adapter_for(pipe.transformer).unsupported_caches:
            continue
        if cache == "magcache":
            settings = {**settings, "magcache.mag_ratios": ratios}
        for attention in ("svg", "dense"):  # svg at density 1 computes every block: a plan of everything
            extra = {"density": 1.0, "warmup_steps": 0} if attention == "svg" else {}
            acc = vs.accelerate(pipe, attention=attention, cache=cache, **settings, **extra)
            try:
                out = generate()
                computed = acc.computed()
            finally:
                acc.remove()
            assert torch.equal(out, ref), (family, cache, attention)
            assert computed and all(c["computed"] == 1.0 for c in computed), (family, cache)
    assert torch.equal(generate(), ref)


@pytest.mark.parametrize("cache, settings", [
    ("tileskip+fbcache", {"fbcache.threshold": 10.0}),
    ("tileskip+pab", {"pab.block_skip_range": 2, "pab.timestep_skip_range": [-1, 1001]}),
])
def test_skipped_layers_make_no_calls_and_remove_restores_everything(tiny_pipe, cache, settings):
    ref = run_tiny(tiny_pipe, steps=STEPS)
    acc = vs.accelerate(tiny_pipe, attention="dense", cache=cache, threshold=-1.0, block_size=16, **settings)
    marks = {}

    def capture(pipe, i, t, kwargs):  # per-run state is gone once the pipeline returns: look mid-run
        marks.update({key: state["tileskip"].calls for key, state in acc.states.items() if "tileskip" in state})
        return kwargs

    try:
        out = run_tiny(tiny_pipe, steps=STEPS, callback_on_step_end=capture)
        rows, computed = acc.stats(), acc.computed()
    finally:
        acc.remove()
    layers = len(tiny_pipe.transformer.blocks)
    assert len(computed) == 2 * STEPS  # every transformer call of the run (cond and uncond per step)
    assert sum(len(c["layers"]) for c in computed) == len(rows) < 2 * STEPS * layers  # some layers were skipped
    for (branch, _, layer), calls in marks.items():  # a layer's call counter counts only the calls that ran
        assert calls == sum(1 for r in rows if r["branch"] == branch and r["layer"] == layer), (branch, layer)
    assert np.abs(out - ref).max() > 0
    assert not tiny_pipe.transformer.is_cache_enabled
    assert np.array_equal(run_tiny(tiny_pipe, steps=STEPS), ref)


def test_magcache_uses_a_tuned_tables_ratios_and_skips(tiny_pipe, tmp_path):
    from vdit_sparse.tune.magcache import write

    table = tmp_path / "mag.yaml"
    write(table, [1.001] * STEPS, {"steps": STEPS})  # ratios near 1: the error stays small, skip
    acc = vs.accelerate(tiny_pipe, cache="magcache", tuned=str(table),
                        **{"magcache.num_inference_steps": STEPS, "magcache.retention_ratio": 0.25})
    try:
        out = run_tiny(tiny_pipe, steps=STEPS)
        computed = acc.computed()
        with pytest.raises(ValueError, match=f"magcache.num_inference_steps={STEPS}, but this run has 1 steps"):
            run_tiny(tiny_pipe, steps=1)
        with acc.step_cache_paused():  # a run of another step count (a compile warm-up) without the cache
            run_tiny(tiny_pipe, steps=1)
        assert np.array_equal(run_tiny(tiny_pipe, steps=STEPS), out)  # enabled again, with fresh state
    finally:
        acc.remove()
    assert acc.step_cache.mag_ratios == tuple([1.001] * STEPS)
    assert min(c["computed"] for c in computed) < 1.0  # blocks were skipped at some steps


@pytest.mark.parametrize("cache, settings, match", [
    ("lru", {}, "cache='lru': unknown cache; known caches are none, tileskip, fbcache"),
    ("fbcache+magcache", {}, "tileskip\\+<one of the step caches>"),
    ("fbcache", {"magcache.threshold": 0.1}, "magcache.\\*: settings of a step cache that is not in use"),
    ("fbcache", {"fbcache.treshold": 0.1}, "fbcache.treshold: not a setting of cache 'fbcache'; its settings are fbcache.threshold"),
    ("fbcache", {"fbcache.threshold": -1}, "fbcache.threshold=-1: must be a number >= 0"),
    ("fbcache", {"fbcache.threshold": float("inf")}, "fbcache.threshold=inf: must be a number >= 0"),
    ("magcache", {"magcache.mag_ratios": [1.0, float("nan")]}, "must be a list of positive numbers"),
    ("magcache", {"magcache.num_inference_steps": 4}, "magcache.mag_ratios: MagCache needs the model's ratios"),
    ("fastercache", {}, "cache='fastercache': not for wan: its pipeline runs the guidance branches apart"),
    ("none", {"threshold": -5.0}, "threshold: a tile-skip setting"),
])
def test_bad_cache_requests_are_named(tiny_pipe, cache, settings, match):
    with pytest.raises(ValueError, match=match):
        vs.accelerate(tiny_pipe, cache=cache, **settings)
    assert not tiny_pipe.transformer.is_cache_enabled
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tiny_pipe.transformer.blocks)


def test_cache_names_parse():
    assert parse_cache("none") == (False, None) and parse_cache("tileskip") == (True, None)
    assert parse_cache("magcache") == (False, "magcache") and parse_cache("tileskip+pab") == (True, "pab")


SKIP = {  # each cache with skipping on, as hard as it goes
    "fbcache": {"fbcache.threshold": 10.0},
    "magcache": {"magcache.threshold": 10.0, "magcache.num_inference_steps": STEPS, "magcache.retention_ratio": 0.25,
                 "magcache.mag_ratios": [1.0] * STEPS},
    "taylorseer": {"taylorseer.disable_cache_before_step": 1, "taylorseer.cache_interval": 2},
    "pab": {"pab.block_skip_range": 2, "pab.timestep_skip_range": [-1, 1001]},
    "seacache": {"seacache.threshold": 1e6},
    "fastercache": {"fastercache.block_skip_range": 2, "fastercache.timestep_skip_range": [-1, 1001]},
}


@pytest.mark.parametrize("family", ["wan", "hunyuan", "cogvideox"])
def test_every_step_cache_skips_work_on_every_family_it_supports(family, tiny_pipe):
    pipe, generate = _family(family, tiny_pipe)
    ref = generate()
    skipped = {}
    adapter = adapter_for(pipe.transformer)
    for cache, settings in SKIP.items():
        if cache in adapter.unsupported_caches:  # refused in one line, before anything is installed
            with pytest.raises(ValueError, match=f"cache={cache!r}: not for {adapter.family}"):
                vs.accelerate(pipe, cache=cache, **settings)
            assert not pipe.transformer.is_cache_enabled
            continue
        acc = vs.accelerate(pipe, cache=cache, **settings)
        try:
            out = generate()
            skipped[cache] = 1.0 - min(c["computed"] for c in acc.computed())
        finally:
            acc.remove()
        assert not torch.equal(out, ref), (family, cache)  # the cache changed something
    print(family, skipped)
    assert torch.equal(generate(), ref)


def test_cli_tune_magcache_then_generate_and_compare_with_it(tmp_path, monkeypatch, tiny_pipe):
    """tune --cache magcache writes measured ratios; generate and compare use them, and say which layers ran."""
    import json

    from vdit_sparse.cli import main
    from vdit_sparse.config import load_tuned_caches
    from vdit_sparse.tune import command as tune

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIT_SPARSE_HOME", str(tmp_path / "home"))
    small = ["--steps", str(STEPS), "--frames", "9", "--height", "64", "--width", "64"]
    assert tune.main(["--cache", "magcache", "--out", "mag", "--no-validate", *small], pipe=tiny_pipe) == 0
    ratios = load_tuned_caches("mag")["magcache"]["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    skip = ["magcache.threshold=10", "magcache.retention_ratio=0.25"]  # as hard as it goes: skips for sure
    assert main(["generate", "a red square moving right", "--cache", "magcache", "--tuned", "mag", *small,
                 "--out", "m.mp4", *skip]) == 0
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["computed_share"] < 1 and len(side["computed"]) == 2 * STEPS
    assert main(["compare", "a red square moving right", "--attention", "dense", "--cache", "magcache", "--tuned", "mag",
                 *small, *skip, "--report", "r", "--no-lpips", "--dense-cache", "cache"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["mean"]["computed_share"] == side["computed_share"]
    assert "computed (layer × step" in (tmp_path / "r" / "report.html").read_text()
    # a step cache's own setting swept: no skipping at threshold 0, skipping at 10
    assert main(["compare", "a red square moving right", "--attention", "dense", "--cache", "magcache", "--tuned", "mag",
                 *small, "--sweep", "magcache.threshold=0,10", "magcache.retention_ratio=0.25", "--report", "s",
                 "--no-lpips", "--no-timing", "--dense-cache", "cache"]) == 0
    sweep = json.loads((tmp_path / "s" / "metrics.json").read_text())["sweep"]
    assert [p["setting"] for p in sweep] == [{"magcache.threshold": 0}, {"magcache.threshold": 10}]
    # a sweep over caches: the ratios serve the MagCache runs, and the other caches' runs are not refused for them
    assert main(["compare", "a red square moving right", "--attention", "dense", "--sweep", "cache=fbcache,magcache",
                 "--tuned", "mag", *small, "--report", "c", "--no-lpips", "--no-timing", "--dense-cache", "cache"]) == 0
    assert sweep[0]["mean"]["computed_share"] == 1.0 and sweep[1]["mean"]["computed_share"] < 1.0
    assert main(["compare", "x", "--cache", "fbcache", "--sweep", "fbcache.treshold=1", "--report", "bad"]) == 2


def test_caches_that_decide_from_activations_are_refused_under_ulysses(tiny_pipe, monkeypatch):
    """Each Ulysses rank sees a shard: First-Block Cache and SeaCache could decide differently per rank."""
    monkeypatch.setattr("vdit_sparse.integration.ulysses_group", lambda models: object())
    for cache in ("fbcache", "tileskip+seacache"):
        with pytest.raises(ValueError, match="decides from the activations, which each Ulysses rank sees only a shard"):
            vs.accelerate(tiny_pipe, cache=cache)
    acc = vs.accelerate(tiny_pipe, cache="pab")  # decided by the timestep alone: the same on every rank
    acc.remove()
    assert not tiny_pipe.transformer.is_cache_enabled
