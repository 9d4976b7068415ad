"""One request resolves once into one frozen RunSpec, whichever way it came (Python, flags, Hydra, a tuned table,
a model config's defaults), and the commands hand it down instead of resolving again."""

import dataclasses
import warnings

import pytest
import yaml

import vdit_sparse as vs
from vdit_sparse.caches import MagCache, TileSkip
from vdit_sparse.generate import GenerateRequest, prepare
from vdit_sparse.methods.svg import SVGSettings
from vdit_sparse.runspec import Shape, resolve

SMALL = ("--steps", "1", "--frames", "9", "--height", "64", "--width", "64", "--random-weights")


def test_the_layers_of_a_request_in_order():
    spec = resolve("svg", "tileskip", {"density": 0.3, "threshold": -3.0, "tileskip.refresh_every": 2},
                   model_defaults={"svg": {"density": 0.2, "num_sampled_rows": 16}, "tileskip": {"block_size": 32},
                                   "svg2": {"top_p": 0.5}})
    # the request's density over the model's; the model's other defaults kept; another method's section ignored
    assert spec.settings == SVGSettings(density=0.3, num_sampled_rows=16, block_size=32)
    assert spec.tileskip == TileSkip(threshold=-3.0, refresh_every=2)
    assert spec.tileskip.tile(spec.settings) == 32  # the dense plan's tiles follow the method's block size
    assert resolve("svg").tileskip is None and resolve("svg", "tileskip").tileskip == TileSkip()


def test_a_spec_is_frozen_and_equal_for_equal_requests():
    a = resolve("svg2", "tileskip+fbcache", {"top_p": 0.8, "fbcache.threshold": 0.1})
    b = resolve("svg2", "tileskip+fbcache", {"fbcache": {"threshold": 0.1}, "top_p": 0.8})
    assert a == b and a.step_cache.threshold == 0.1 and a.cache == "tileskip+fbcache"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.model = "other"
    assert a != resolve("svg2", "tileskip+fbcache", {"top_p": 0.9, "fbcache.threshold": 0.1})


def test_a_tuned_table_becomes_per_layer_rules_and_measured_cache_settings():
    table = {"layers": {1: {"density": 0.5}, 2: {"threshold": -2.0}}, "caches": {"magcache": {"mag_ratios": [1.0, 1.1]}}}
    spec = resolve("svg", "tileskip+magcache", {"warmup_steps": 0}, tuned=table, shape=Shape(steps=2))
    assert spec.policy.resolve(1, 0, 2)[1].density == 0.5 and spec.policy.resolve(0, 0, 2)[1].density == 0.25
    assert spec.policy.resolve(2, 0, 2)[2] == TileSkip(threshold=-2.0)
    assert spec.step_cache == MagCache(mag_ratios=(1.0, 1.1), num_inference_steps=2)  # the run's step count
    assert spec.tuned.layers == {1: {"density": 0.5}, 2: {"threshold": -2.0}}


@pytest.mark.parametrize("request_, match", [
    (dict(attention="svg", settings={"threshold": -3.0}), "threshold: a tile-skip setting, used only with cache='tileskip'"),
    (dict(attention="svg", cache="tileskip", settings={"tileskip.nope": 1}), "tileskip.nope: not a setting of the tile-skip"),
    (dict(attention="svg", settings={"top_p": 0.5}), "top_p: not a setting of attention='svg'"),
    (dict(attention="svg", tuned={1: {"threshold": -3.0}}), "layer 1: threshold: a tile-skip setting"),
])
def test_a_bad_request_is_one_named_error(request_, match):
    with pytest.raises(ValueError, match=match):
        resolve(**request_)


def test_hydra_writes_the_tileskip_knobs_under_tileskip_and_still_reads_the_old_key():
    req = GenerateRequest(prompt="p", cache="tileskip", overrides=("tileskip.threshold=-3", "tileskip.block_size=16"))
    assert prepare(req)[1].tileskip == TileSkip(threshold=-3, block_size=16)
    old = GenerateRequest(prompt="p", cache="tileskip", overrides=("attention.threshold=-3",))
    with pytest.warns(FutureWarning, match="attention.threshold: a setting of the tile-skip cache since 0.3"):
        assert prepare(old)[1].tileskip == TileSkip(threshold=-3)
    flag = GenerateRequest(prompt="p", cache="tileskip", settings={"threshold": -3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the canonical name warns nothing
        assert prepare(flag)[1].tileskip == TileSkip(threshold=-3.0)


def test_accelerate_takes_a_spec_and_nothing_beside_it(tiny_pipe):
    spec = resolve("svg", "tileskip", {"density": 0.4, "threshold": -5.0})
    acc = vs.accelerate(tiny_pipe, spec)
    acc.remove()
    assert acc.spec is spec and acc.policy is spec.policy and isinstance(spec, vs.RunSpec)
    assert isinstance(spec.tileskip, vs.TileSkip)
    keywords = vs.accelerate(tiny_pipe, attention="svg", cache="tileskip", density=0.4, threshold=-5.0)
    keywords.remove()
    assert keywords.spec == spec  # the old keyword form builds the same spec
    with pytest.raises(ValueError, match="the RunSpec holds the whole request"):
        vs.accelerate(tiny_pipe, spec, density=0.3)


def test_generate_reads_the_tuned_table_once(tmp_path, monkeypatch):
    """It was parsed four times per generate (the step cache's check, the policy's, the fit check, accelerate)."""
    import vdit_sparse.config as config
    from vdit_sparse.cli import main

    table = tmp_path / "t.yaml"
    table.write_text(yaml.safe_dump({"metadata": {"attention": "svg", "steps": 1}, "layers": {1: {"density": 0.5}}}))
    reads = []
    real = config._read_tuned
    monkeypatch.setattr(config, "_read_tuned", lambda name: reads.append(name) or real(name))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red square", "--attention", "svg", "--tuned", str(table), *SMALL, "--out", "v.mp4"]) == 0
    assert reads == [str(table)]


def test_compare_resolves_each_run_once(tmp_path, monkeypatch):
    import vdit_sparse.runspec as runspec
    from vdit_sparse.compare import main

    calls = []
    real = runspec.resolve
    monkeypatch.setattr(runspec, "resolve", lambda *a, **k: calls.append(a[:2]) or real(*a, **k))
    argv = ["a red square", "--attention", "svg", "--sweep", "density=0.3,0.5", "--report", str(tmp_path / "r"),
            "--dense-cache", str(tmp_path / "cache"), "--no-timing", "--no-lpips", *SMALL]
    assert main(argv) == 0
    assert sorted(calls) == [("dense", "none"), ("svg", "none"), ("svg", "none")]  # one reference, two points


def test_the_old_hydra_key_runs_with_one_warning_line_and_the_sidecar_records_the_cache(tmp_path, monkeypatch, capsys):
    import json

    from vdit_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red square", "--cache", "tileskip", "attention.threshold=-3", *SMALL, "--out", "v.mp4"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == ["vdit-sparse: warning: attention.threshold: a setting of the tile-skip cache since 0.3; write "
                      "tileskip.threshold (or --threshold)"]
    config = json.loads((tmp_path / "v.json").read_text())["config"]
    assert config["tileskip"] == {"threshold": -3, "refresh_every": 5, "block_size": None}
    assert "threshold" not in config["settings"]
