"""vdit-sparse tune: calibration curves, the search, the cost model, the table's round trip, the command."""

import itertools
import json
import math

import pytest
import torch

from tests.conftest import run_tiny
from vdit_sparse import VideoLayout
from vdit_sparse.errors import UserError
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods import settings_for
from vdit_sparse.tune.calibrate import Recorder, candidates, sampled_steps
from vdit_sparse.tune.cost import FALLBACK, FORMAT, CallShape, load_cost_model, proportional
from vdit_sparse.tune.search import BINS, InfeasibleTarget, Option, choose, error_for_psnr, fit_psnr, totals


# --- calibration ---------------------------------------------------------------------------------------


def _clustered_qkv(layout, heads=2, dim=16, seed=0):
    """(B, N, H, D) q, k, v with planted clusters: attention has structure a sparse method can find."""
    gen = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    centres = torch.randn(heads, 4, dim, generator=gen) * 3
    which = torch.randint(0, 4, (heads, n), generator=gen)
    base = torch.stack([centres[h, which[h]] for h in range(heads)])  # (H, N, D)
    q = base + 0.3 * torch.randn(heads, n, dim, generator=gen)
    k = base + 0.3 * torch.randn(heads, n, dim, generator=gen)
    v = torch.randn(heads, n, dim, generator=gen)
    return tuple(t.transpose(0, 1)[None].contiguous() for t in (q, k, v))  # (1, N, H, D)


@pytest.mark.parametrize("method", ["svg", "svg2"])
def test_calibration_curve_falls_with_density_and_is_zero_when_dense(method):
    layout = VideoLayout(frames=4, height=4, width=4)
    base = settings_for(method, {"block_size": 8})
    cands = candidates(method, "none", "density", [0.15, 0.3, 0.6, 1.0], base)
    rec = Recorder(cands, sample_steps={0}, share_state=True)
    q, k, v = _clustered_qkv(layout)
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    q, k, v, exact = (t.transpose(1, 2) for t in (q, k, v, exact))  # (B, H, N, D), as the handle's observers get them
    rec(AttentionContext(layout, layer=0, step=0, num_steps=4, branch="cond"), q, k, v, exact, False)
    curve = rec.curve(0)  # (error, density) per candidate: 0.15, 0.3, 0.6, 1.0, dense
    errors = [e for e, _ in curve]
    assert errors[3] < 1e-5 and errors[4] < 1e-6  # density 1.0 and the dense option are exact
    assert errors[0] > 0.01  # a low budget does lose something on this input
    assert all(a >= b - 1e-3 for a, b in zip(errors, errors[1:]))  # more density, no more error
    assert [round(d, 2) for _, d in curve][-1] == 1.0
    assert rec.shapes[0] == CallShape(2, 64, 16)


def test_sampled_steps_skip_warmup_and_spread():
    assert sampled_steps(10, 3, 3) == {3, 6, 9}
    assert sampled_steps(4, 1, 10) == {1, 2, 3}
    assert sampled_steps(4, 4, 3) == set()


def test_svg2_candidates_share_one_kmeans_advance():
    cands = candidates("svg2", "none", "density", [0.1, 0.2], settings_for("svg2"))
    # the default advance, then none: the other candidates share the first one's clustering
    assert [c.params.kmeans_iters_step for c in cands[:2]] == [1, 0]
    assert cands[-1].method == "dense" and cands[-1].params.warmup_steps == 0.25  # dense keeps the run's shared settings
    assert cands[-1].setting == {"attention": "dense"}


# --- search --------------------------------------------------------------------------------------------


def _curve(errors, densities=(0.1, 0.2, 0.4, 1.0)):
    return [Option({"density": d}, e, d, d) for d, e in zip(densities, errors)]


def test_search_meets_target_and_gives_flat_layers_less_density():
    options = {0: _curve([0.05, 0.03, 0.01, 0.0]), 1: _curve([0.6, 0.3, 0.1, 0.0])}  # layer 0 is flat
    chosen = choose(options, target_error=0.08)
    assert totals(chosen)["error"] <= 0.08
    assert chosen[0].density < chosen[1].density
    assert chosen == {0: options[0][0], 1: options[1][2]}  # the known optimum: cost 0.5


def test_search_is_optimal_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    options = {}
    for layer in range(4):
        errs = sorted(torch.rand(4, generator=gen).tolist(), reverse=True)[:3] + [0.0]
        options[layer] = _curve(errs)
    for target in (0.05, 0.15, 0.3):
        chosen = choose(options, target)
        got = totals(chosen)
        assert got["error"] <= target + 1e-12
        # every combination within a slightly tighter target (the search rounds errors up) costs at least as much
        tight = target * (1 - len(options) / BINS)
        feasible = [c for c in itertools.product(*options.values()) if sum(o.error for o in c) / len(c) <= tight]
        assert got["cost"] <= min(sum(o.cost for o in c) for c in feasible) + 1e-12


def test_search_refuses_an_unreachable_target():
    with pytest.raises(InfeasibleTarget, match="unreachable"):
        choose({0: [Option({"threshold": -10.0}, 0.2, 0.9, 0.9)]}, target_error=0.1)


def test_psnr_fit_recovers_the_relation_and_inverts():
    a, b = 12.0, 18.0
    points = [(e, a - b * math.log10(e)) for e in (0.02, 0.1, 0.3)]
    fa, fb = fit_psnr(points)
    assert fa == pytest.approx(a) and fb == pytest.approx(b)
    assert error_for_psnr(fa, fb, a - b * math.log10(0.05)) == pytest.approx(0.05)
    assert fit_psnr([(0.1, 30.0)])[1] == 20.0  # one point: the default slope


# --- cost model ----------------------------------------------------------------------------------------


def test_proportional_fallback_says_so():
    cm = load_cost_model(None) if not _default_cost_model_exists() else proportional()
    shape = CallShape(8, 1000, 64)
    assert cm.source == FALLBACK and not cm.measured
    assert cm.ms("svg2", 0.25, shape) == 0.25 and cm.ms("dense", 1.0, shape) == 1.0


def _default_cost_model_exists():
    from vdit_sparse.config import config_dir

    return (config_dir() / "cost_model.json").is_file()


def test_measured_cost_model_interpolates_per_block_and_scales_with_work(tmp_path):
    ref = {"name": "s", "groups": 2, "tokens": 256, "head_dim": 64, "block_size": 64, "dense_ms": 1.0,
           "planning_ms": {"svg2": 0.1},
           "kernel": [{"density": 0.25, "ms_per_block": 0.02}, {"density": 1.0, "ms_per_block": 0.01}]}
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"format": FORMAT, "device": "test GPU", "dtype": "bfloat16", "shapes": [ref]}))
    cm = load_cost_model(path)
    shape = CallShape(2, 256, 64)  # 2 groups × 4 × 4 blocks = 32 blocks
    assert cm.measured and "test GPU" in cm.source
    assert cm.ms("svg", 0.25, shape) == pytest.approx(0.25 * 32 * 0.02)
    assert cm.ms("svg", 0.625, shape) == pytest.approx(0.625 * 32 * 0.015)  # halfway between the bands
    assert cm.ms("svg2", 1.0, shape) == pytest.approx(32 * 0.01 + 0.1)
    assert cm.ms("dense", 1.0, CallShape(2, 512, 64)) == pytest.approx(4.0)  # twice the tokens, four times the work
    path.write_text("{}")
    with pytest.raises(UserError, match="cost-model"):
        load_cost_model(path)


# --- the table -----------------------------------------------------------------------------------------


def test_table_round_trips_and_applies_per_layer(tmp_path, tiny_pipe):
    from vdit_sparse import accelerate
    from vdit_sparse.config import load_tuned_table
    from vdit_sparse.tune.command import write_table

    chosen = {0: Option({"attention": "dense"}, 0.0, 1.0, 1.0), 1: Option({"density": 0.3}, 0.1, 0.3, 0.3)}
    path = tmp_path / "t.yaml"
    write_table(path, chosen, {"model": "tiny", "versions": {"torch": torch.__version__}})
    assert load_tuned_table(str(path)) == {0: {"attention": "dense"}, 1: {"density": 0.3}}
    handle = accelerate(tiny_pipe, attention="svg", tuned=str(path), density=0.9, block_size=16)  # 48 tokens: 3 blocks
    try:
        run_tiny(tiny_pipe, steps=1)
        rows = handle.stats()
    finally:
        handle.remove()
    by_layer = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    assert all(r["method"] == "dense" and r["density"] == 1.0 for r in by_layer[0])
    assert all(r["method"] == "svg" and r["density"] < 0.5 for r in by_layer[1])  # the table's 0.3, not 0.9
    assert all(r["density"] > 0.7 for layer in by_layer if layer > 1 for r in by_layer[layer])  # untouched: 0.9


# --- the command ---------------------------------------------------------------------------------------


def _prompt_files(tmp_path):
    cal, held = tmp_path / "cal.txt", tmp_path / "held.txt"
    cal.write_text("a red square moving right\n")
    held.write_text("# held out\na green triangle moving left\n")
    return ["--prompts", str(cal), "--holdout", str(held)]


SMALL = ["--frames", "9", "--height", "64", "--width", "64"]


def test_tune_command_writes_table_and_report(tmp_path, tiny_pipe, capsys):
    from vdit_sparse.tune import command as tune
    from vdit_sparse.config import load_tuned_table

    out = tmp_path / "tuned" / "svg-small.yaml"
    argv = ["--attention", "svg", "--target-error", "0.5", "--values", "0.3,0.6", "--out", str(out),
            "--steps", "1", *SMALL, *_prompt_files(tmp_path), "attention.block_size=16"]
    assert tune.main(argv, pipe=tiny_pipe) == 0
    table = load_tuned_table(str(out))
    assert sorted(table) == list(range(len(tiny_pipe.transformer.blocks)))
    assert all(s in ({"attention": "dense"}, {"density": 0.3}, {"density": 0.6}) for s in table.values())
    report = json.loads((tmp_path / "tuned" / "svg-small.report.json").read_text())
    meta = report["metadata"]
    assert meta["predicted"]["mean_error"] <= 0.5 and meta["cost_model"] == FALLBACK
    tuned_run = report["validation"]["mean"]["tuned"]
    assert tuned_run["psnr"] > 0
    assert tuned_run["density"] == pytest.approx(meta["predicted"]["mean_density"], abs=0.05)  # the table was applied
    html = (tmp_path / "tuned" / "svg-small.report.html").read_text()
    assert html.count("<svg") >= 2 and "proportional fallback" in html
    printed = capsys.readouterr().out
    assert "held-out (1 prompts)" in printed and "proportional fallback" in printed


def test_tune_tileskip_thresholds_meet_the_error_target(tmp_path, tiny_pipe):
    from vdit_sparse.tune import command as tune
    from vdit_sparse.config import load_tuned_table

    out = tmp_path / "ts.yaml"
    argv = ["--attention", "dense", "--cache", "tileskip", "--target-error", "0.05", "--values=-12,-4,-1",
            "--out", str(out), "--no-validate", "--steps", "2", *SMALL, *_prompt_files(tmp_path),
            "attention.block_size=16"]  # marks need 2 steps, and more than the one tile of 64 tokens
    assert tune.main(argv, pipe=tiny_pipe) == 0
    table = load_tuned_table(str(out))
    assert table and all(set(s) == {"threshold"} and s["threshold"] in (-12.0, -4.0, -1.0) for s in table.values())
    meta = json.loads((tmp_path / "ts.report.json").read_text())["metadata"]
    assert meta["knob"] == "threshold" and meta["predicted"]["mean_error"] <= 0.05


@pytest.mark.parametrize("argv, match", [
    (["--attention", "svg2", "--out", "x.yaml"], "exactly one target"),
    (["--attention", "svg2", "--target-error", "0.1", "--target-psnr", "30", "--out", "x.yaml"], "exactly one target"),
    (["--attention", "svg2", "--target-error", "1.5", "--out", "x.yaml"], "--target-error 1.5"),
    (["--attention", "svg2", "--target-psnr", "-3", "--out", "x.yaml"], "--target-psnr -3"),
    (["--attention", "nope", "--target-error", "0.1", "--out", "x.yaml"], "--attention 'nope'"),
    (["--attention", "dense", "--target-error", "0.1", "--out", "x.yaml"], "nothing to tune"),
    (["--attention", "svg", "--knob", "threshold", "--target-error", "0.1", "--out", "x.yaml"], "--cache tileskip"),
    (["--attention", "svg", "--values", "0.2,abc", "--target-error", "0.1", "--out", "x.yaml"], "--values"),
    (["--attention", "sta", "--values", "[1,0,0],[1,1]", "--target-error", "0.1", "--out", "x.yaml"],
     r"--values '\[1,0,0\],\[1,1\]': window=\[1, 1\]: must be three integers"),
    (["--attention", "sta", "--values", "[1,0,0", "--target-error", "0.1", "--out", "x.yaml"], "expected numbers"),
    (["--attention", "svg", "--target-error", "0.1"], "--out"),
    (["--attention", "svg", "--target-error", "0.1", "--out", "EXISTS"], "exists; pass --overwrite"),
])
def test_bad_input_is_one_line(tmp_path, argv, match):
    from vdit_sparse.tune import command as tune

    existing = tmp_path / "t.yaml"
    existing.write_text("layers: {}\n")
    argv = [str(existing) if a == "EXISTS" else str(tmp_path / a) if a == "x.yaml" else a for a in argv]
    with pytest.raises(UserError, match=match) as e:
        tune.main(argv)
    assert "\n" not in str(e.value)


def _job(out, **fields):
    """A TuneJob as ``tune`` makes one, for the helpers that read it (one calibration prompt, no held-out ones)."""
    from vdit_sparse.generate import GenerateRequest
    from vdit_sparse.runspec import resolve
    from vdit_sparse.tune.job import TuneJob

    base = dict(values=(), target_psnr=None, target_error=None, out=out, cal_prompts=("p",), holdout=(), cost=None,
                base=GenerateRequest(prompt="p", attention="svg"), cfg=None, spec=resolve("svg"))
    return TuneJob(**{**base, **fields})


def _calibration(options, cands=()):
    """What a calibration found, as far as the search helpers read it."""
    from vdit_sparse.tune.job import Calibration

    return Calibration(list(cands), None, [None], set(), set(), 1.0, options, 1.0)


def test_psnr_target_fits_searches_and_tightens_until_met(tmp_path, monkeypatch):
    """The --target-psnr loop on synthetic curves, with runs replaced by a known error -> PSNR law."""
    from vdit_sparse.tune import command as tune
    from vdit_sparse.config import load_tuned_table
    from vdit_sparse.tune.calibrate import Candidate

    densities = (0.1, 0.2, 0.4)
    cands = [Candidate({"density": d}, "svg", settings_for("svg", {"density": d}), False) for d in densities]
    cands.append(Candidate({"attention": "dense"}, "dense", settings_for("dense"), False))
    options = {layer: _curve([0.4 * s, 0.2 * s, 0.08 * s, 0.0], densities + (1.0,)) for layer, s in ((0, 0.3), (1, 1.0), (2, 2.0))}

    def law(error):  # PSNR of a run whose mean attention error is ``error``
        return 100.0 if error == 0 else 10.0 - 20.0 * math.log10(error)

    def fake_psnr_of(pipe, requests, references, desc, tuned=None):
        if tuned is None:  # a uniform run
            i = densities.index(requests[0].settings["density"])
            return law(sum(o[i].error for o in options.values()) / len(options))
        table = load_tuned_table(str(tuned))
        err = sum(next(o.error for o in options[layer] if o.setting == s) for layer, s in table.items()) / len(table)
        return law(err) - 2.0  # the real video loses more than the fit says: the loop must tighten

    monkeypatch.setattr(tune, "psnr_of", fake_psnr_of)
    out = tmp_path / "p.yaml"
    job = _job(out, knob="density", values=densities, target_psnr=30.0, rounds=4)
    chosen, fit = tune.tune_to_psnr(job, None, _calibration(options, cands), {"model": "tiny"})
    assert fit["rounds"][0]["fit"] == pytest.approx([10.0, 20.0])  # the uniform runs follow the law exactly
    assert fit["met"] and len(fit["rounds"]) >= 2  # the first table missed by 2 dB
    assert fit["rounds"][-1]["psnr"] >= 30.0
    assert load_tuned_table(str(out)) == {layer: o.setting for layer, o in chosen.items()}


def test_layer_sensitivity_weighs_each_layer_by_the_video_error_it_causes(tmp_path, monkeypatch):
    import yaml

    from vdit_sparse.tune import command as tune
    from vdit_sparse.tune.search import Option

    def opts(errors):
        return [Option({"attention": "dense"}, 0.0, 1.0, 1.0)] + [Option({"density": e}, e, e, e) for e in errors]

    options = {0: opts([0.1, 0.2, 0.3]), 1: opts([0.1, 0.2, 0.3]), 2: [Option({"attention": "dense"}, 0.0, 1.0, 1.0)]}
    out = tmp_path / "t.yaml"
    seen = []

    def fake_psnr_of(pipe, requests, references, desc, tuned=None):
        table = yaml.safe_load(tuned.read_text())["layers"]
        seen.append(table)
        sparse = [layer for layer, s in table.items() if s != {"attention": "dense"}]
        assert sparse in ([0], [1]) and table[sparse[0]] == {"density": 0.2}  # one layer alone, at its middle option
        return {0: 40.0, 1: 20.0}[sparse[0]]  # layer 1's error reaches the video 100x more

    monkeypatch.setattr(tune, "psnr_of", fake_psnr_of)
    weights = tune.layer_sensitivity(_job(out, knob="density"), None, _calibration(options))
    assert len(seen) == 2 and not (tmp_path / "t.probe.yaml").exists()
    assert weights[1] / weights[0] == pytest.approx(100.0) and weights[2] == pytest.approx(1.0)
    assert (weights[0] + weights[1]) / 2 == pytest.approx(1.0)


def test_tune_with_layer_sensitivity_records_the_weights(tmp_path, tiny_pipe, capsys):
    from vdit_sparse.errors import UserError
    from vdit_sparse.tune import command as tune

    out = tmp_path / "sens.yaml"
    argv = ["--attention", "svg", "--target-error", "0.5", "--values", "0.3,0.6", "--out", str(out), "--steps", "1",
            *SMALL, *_prompt_files(tmp_path), "attention.block_size=16", "--layer-sensitivity", "--no-validate"]
    assert tune.main(argv, pipe=tiny_pipe) == 0
    weights = json.loads((tmp_path / "sens.report.json").read_text())["metadata"]["layer_sensitivity"]
    assert len(weights) == len(tiny_pipe.transformer.blocks) and all(w >= 0 for w in weights.values())
    import yaml

    assert yaml.safe_load(out.read_text())["metadata"]["layer_sensitivity"] == {int(k): w for k, w in weights.items()}
    with pytest.raises(UserError, match="--layer-sensitivity: not with --cache tileskip"):
        tune.main(["--attention", "dense", "--cache", "tileskip", "--target-error", "0.5", "--out", str(tmp_path / "x"),
                   "--layer-sensitivity"], pipe=tiny_pipe)


def test_magcache_validation_times_alternately_and_flags_a_speedup_the_skipped_blocks_cannot_explain(monkeypatch):
    """The issue's case: MagCache ran 90 % of the layers and reported 6x; dense attention on both sides bounds it."""
    from types import SimpleNamespace

    from pathlib import Path

    import numpy as np

    from vdit_sparse import generate as gen_module, timing
    from vdit_sparse.generate import GenerateRequest
    from vdit_sparse.tune import magcache

    walls = {"none": iter([9.0, 3.0, 3.05, 2.98]), "magcache": iter([9.0, 0.5, 0.51, 0.5])}  # warm-up first
    order = []

    def fake_run(req, pipe=None, progress=True, cfg=None, spec=None):
        order.append(req.cache)
        frames = np.full((2, 8, 8, 3), 100 if req.cache == "none" else 101, np.uint8)
        computed = [{"step": 0, "computed": 0.9}] if req.cache == "magcache" else []
        return SimpleNamespace(frames=frames, wall_s=next(walls[req.cache]), computed=computed)

    monkeypatch.setattr(gen_module, "run_generation", fake_run)
    monkeypatch.setattr(gen_module, "prepare", lambda req: (None, None))  # no table on disk to resolve
    monkeypatch.setattr(timing, "load_average", lambda: 0.0)  # an idle machine
    result = magcache.validate(None, [GenerateRequest(prompt="a red square")], Path("mag.yaml"), repeats=3)
    assert order == ["none", "magcache"] * 4
    (row,) = result["prompts"]
    assert row["speedup"] == pytest.approx(6.0) and row["speedup_spread"] == pytest.approx([2.98 / 0.51, 3.05 / 0.5])
    assert row["timing_reliable"] is False
    assert row["timing_reasons"] == ["6.00x is more than the 1.11x the computed work allows"]
    assert result["mean_speedup"] is None  # the only timing is not to be trusted
