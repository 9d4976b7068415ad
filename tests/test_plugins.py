"""A method and a step cache from another installed package, declared through entry points only
(tests/plugins/window: its module and its pyproject.toml, no file of ours), work everywhere the built-in ones do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--steps", "2", "--frames", "9", "--height", "64", "--width", "64", "attention.block_size=16"]

# Run in a fresh interpreter whose sys.path holds the installed plugin: each line below is one use of it.
CHECKS = f"""
import contextlib, io, json, sys
import vdit_sparse as vs
from vdit_sparse.cli import main

SMOKE = {SMOKE!r}
PROMPT = "a red square moving right"
out = {{}}

def cli(*argv):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, std.getvalue(), err.getvalue()

out["help"] = cli("generate", "--help")[1]
out["generate"] = cli("generate", PROMPT, "--attention", "window", "attention.band=0", *SMOKE, "--out", "w.mp4")[0]
out["sidecar"] = json.load(open("w.json"))
out["refusal"] = cli("generate", PROMPT, "--attention", "window", "--top-p", "0.5", "--out", "x.mp4")
out["cache"] = cli("generate", PROMPT, "--cache", "loosefb", "loosefb.threshold=10", *SMOKE[:-1], "--out", "c.mp4")[0]
out["cache_sidecar"] = json.load(open("c.json"))
out["compare"] = cli("compare", PROMPT, "--attention", "window", "--sweep", "band=0,1", "--report", "rep", "--no-lpips",
                     *SMOKE)[0]
out["metrics"] = json.load(open("rep/metrics.json"))
out["tune"] = cli("tune", "--attention", "window", "--target-error", "0.9", "--out", "t.yaml", "--no-validate",
                  "--prompts", "prompts.txt", *SMOKE)
out["bench"] = cli("bench", "--e2e", "--smoke", "--device", "cpu", "--methods", "window", "--repeats", "1")

pipe = vs.load_pipeline("tiny")
pipe.set_progress_bar_config(disable=True)
acc = vs.accelerate(pipe, attention="window", band=0, block_size=16, warmup_steps=0)
pipe(prompt=PROMPT, num_frames=9, height=64, width=64, num_inference_steps=2, max_sequence_length=16)
out["python_density"] = acc.summary()["density"]
acc.remove()
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target",
                        str(site), str(ROOT / "tests" / "plugins" / "window")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return site


@pytest.fixture(scope="module")
def results(plugin_site, tmp_path_factory) -> dict:
    import json

    work = tmp_path_factory.mktemp("work")
    (work / "prompts.txt").write_text("a red square moving right\n")
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "VDIT_SPARSE_HOME": str(work / "home"),
           "VDIT_SPARSE_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CHECKS], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_the_plugin_package_touches_no_file_of_ours():
    files = sorted(p.name for p in (ROOT / "tests" / "plugins" / "window").iterdir() if p.is_file())
    assert files == ["pyproject.toml", "vdit_sparse_window.py"]
    assert not list((ROOT / "configs").rglob("window*")) and not list((ROOT / "configs").rglob("loosefb*"))


def test_the_cli_lists_and_runs_the_plugged_in_method(results):
    helptext = " ".join(results["help"].split())  # argparse wraps lines
    assert "window: a static band of key blocks" in helptext and "loosefb" in helptext
    assert results["generate"] == 0
    assert results["sidecar"]["config"]["settings"]["band"] == 0
    assert results["sidecar"]["density"] < 0.9  # the band skipped blocks (warm-up steps count as dense)


def test_a_setting_the_plugin_method_lacks_is_one_line(results):
    code, _, err = results["refusal"]
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "top_p: not a setting of attention='window'" in err and "band" in err


def test_the_plugged_in_step_cache_runs_with_its_own_settings(results):
    assert results["cache"] == 0
    assert results["cache_sidecar"]["config"]["cache"]["name"] == "loosefb"
    assert results["cache_sidecar"]["computed_share"] < 1.0  # threshold 10: it skipped blocks at the second step


def test_compare_sweeps_tune_tunes_and_bench_times_the_plugged_in_method(results):
    assert results["compare"] == 0 and len(results["metrics"]["prompts"]) == 2
    assert results["tune"][0] == 0, results["tune"][2]
    assert results["bench"][0] == 0 and "window" in results["bench"][1], results["bench"][2]


def test_accelerate_takes_the_plugged_in_method_and_its_settings(results):
    assert results["python_density"] < 0.9
