"""scripts/capture_qkv.py: the calls it keeps, the heads it slices, the file it writes; and
scripts/svg2_vs_oracle.py reads that file."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--num-steps", "2", "--frames", "9", "--height", "64", "--width", "64"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def capture():
    return load_script("capture_qkv")


def test_capture_keeps_the_chosen_calls_and_heads(capture, tmp_path):
    everything = capture.capture(capture.parse_args([*SMALL, "--out", str(tmp_path / "a.pt")]))
    calls = everything["calls"]
    assert len(calls) == 2 * 6 * 2  # steps x layers x CFG branches
    assert everything["layout"] == dict(frames=3, height=4, width=4, text_tokens=0, text_position="none")
    assert calls[0]["q"].shape == (1, 6, 48, 32) and calls[0]["q"].dtype == torch.float32
    some = capture.capture(capture.parse_args([*SMALL, "--steps", "1", "--layers", "2,4", "--heads", "1,3",
                                               "--branch", "cond", "--dtype", "float16", "--out", str(tmp_path / "b.pt")]))
    assert [(c["step"], c["layer"], c["branch"]) for c in some["calls"]] == [(1, 2, "cond"), (1, 4, "cond")]
    for kept in some["calls"]:
        full = next(c for c in calls if (c["step"], c["layer"], c["branch"]) == (kept["step"], kept["layer"], "cond"))
        for name in "qkv":  # the same dense run: the kept heads are those heads of the full capture
            torch.testing.assert_close(kept[name], full[name][:, [1, 3]].half())


def test_capture_file_round_trips_and_bad_input_is_one_line(capture, tmp_path):
    out = tmp_path / "c.pt"
    assert capture.main([*SMALL, "--steps", "1", "--layers", "0", "--out", str(out)]) == 0
    record = capture.load(out)
    assert len(record["calls"]) == 2 and record["meta"]["num_steps"] == 2
    with pytest.raises(SystemExit, match="--steps='x'"):
        capture.parse_args([*SMALL, "--steps", "x", "--out", str(out)])
    with pytest.raises(SystemExit, match="frames=10"):
        capture.main([*SMALL[:-6], "--frames", "10", "--height", "64", "--width", "64", "--out", str(tmp_path / "d.pt")])
    assert not (tmp_path / "d.pt").exists()
    report = tmp_path / "report"
    assert load_script("svg2_vs_oracle").main([str(out), "--top-p", "0.9", "--num-k-clusters", "12",
                                               "--num-q-clusters", "4", "--warmup", "0", "--oracle-seeds", "1",
                                               "--report", str(report)]) == 0
    assert "| 0.9 |" in (report / "report.md").read_text()
