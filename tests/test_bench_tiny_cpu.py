"""scripts/bench_tiny_cpu.py: every command it would run parses with the real CLI, and its summary tables read
what compare and tune write."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tiny_cpu", ROOT / "scripts" / "bench_tiny_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_is_accepted_by_the_cli(bench, tmp_path, monkeypatch):
    # what the commands check before any model work: flags, sweeps, settings, the tuned table's ratios
    from vdit_sparse import compare
    from vdit_sparse.tune import command as tune

    monkeypatch.setenv("VDIT_SPARSE_HOME", str(tmp_path / "home"))
    prompts, magcache = tmp_path / "prompts.txt", tmp_path / "magcache-10.yaml"
    prompts.write_text("a red square moving right on a plain background\n")
    magcache.write_text("caches:\n  magcache: {mag_ratios: [1.0, 0.95, 0.96, 0.97, 0.97, 0.97, 0.98, 0.98, 1.0, 1.05]}\n")
    plans = bench.experiments(prompts, magcache, 10, ("--repeats", "5", "--threads", "1"))
    assert set(plans) == {"defaults", "density", "tune", "caches"}
    for commands in plans.values():
        for argv in commands:
            argv = [a.replace("{out}", str(tmp_path)) for a in argv]
            if argv[0] == "compare":
                args = compare.parse_args(argv[1:])
                pairs = compare.plan_pairs(args)
                assert pairs and all(p.accelerated.steps == 10 for p in pairs) and (args.repeats, args.threads) == (5, 1)
            else:
                args = tune.parse_args(argv[1:])
                tune.check_args(args)
                assert tune.knob_values(args) and args.steps == 10


def test_summary_tables(bench, tmp_path):
    row = {"speedup": 1.5, "psnr": 30.25, "ssim": 0.95, "density": 0.6, "computed_share": 0.5,
           "prompt_following": {"colour_ok": 1.0, "motion_ok": 0.5, "count_ok": 0.25},
           "prompt_following_reference": {"colour_ok": 1.0, "motion_ok": 0.75, "count_ok": 0.25}}
    (tmp_path / "caches-10").mkdir()
    (tmp_path / "caches-10" / "metrics.json").write_text(json.dumps(
        {"machine": {"load_before": 1.0, "load_after": 1.2}, "mean": row, "sweep": [{"label": "cache=magcache", "mean": row}]}))
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "svg-22.report.json").write_text(json.dumps({
        "metadata": {"target": {"psnr": 22.0}}, "chosen": {"0": {"density": 0.3}, "1": {"density": 0.05}},
        "validation": {"mean": {"tuned": {"psnr": 23.5, "density": 0.41}, "uniform": {"psnr": 21.5, "density": 0.41}},
                       "uniform_setting": {"density": 0.26}}}))
    text = bench.summary(tmp_path)
    assert "| cache=magcache | 1.5x | 30.2 | 0.95 | 0.6 | 0.5 | 1 / 0.5 / 0.25 | 1 / 0.75 / 0.25 |" in text
    timed = dict(row, speedup_spread=[1.25, 1.75], timed_entries=4, reliable_entries=3)
    (tmp_path / "caches-20").mkdir()
    (tmp_path / "caches-20" / "metrics.json").write_text(json.dumps(
        {"machine": {"load_before": 1.0, "load_after": 1.2, "threads": 1, "repeats": 5}, "mean": timed}))
    text = bench.summary(tmp_path)
    assert "### caches-20 (load 1.0 -> 1.2, 1 thread(s), --repeats 5)" in text
    assert "| (one setting) | 1.5x (1.25-1.75), 3 of 4 reliable | 30.2 |" in text
    assert "| svg-22 | 22 | 0: density=0.3, 1: density=0.05 | {'density': 0.26} | 23.5 | 21.5 | 2 | 0.41 |" in text
