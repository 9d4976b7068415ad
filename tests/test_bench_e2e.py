"""vdit-sparse bench: the e2e benchmark runs end to end (tiny shapes, CPU), and GPU modes refuse a CPU in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdit_sparse.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def test_rows_are_ratios_against_dense_compiled_from_the_same_run(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["bench", "--e2e", "--shape", "tiny-hunyuan", "--device", "cpu", "--smoke", "--repeats", "2",
            "--methods", "svg2", "--densities", "0.5", "--json", str(out)]
    assert cli(argv) == 0
    rows = json.loads(out.read_text())
    assert {(r["compiled"], r["method"]) for r in rows} == {(c, m) for c in (False, True) for m in ("dense", "svg2")}
    base = next(r for r in rows if r["compiled"] and r["method"] == "dense")
    assert base["speedup_vs_dense_compiled"] == 1.0
    for r in rows:  # the timer's: the ratio of medians, the spread from the extreme forwards of each side
        assert len(r["runs_s"]) == 2 and r["ms"] == pytest.approx(1e3 * sum(r["runs_s"]) / 2)
        assert r["speedup_vs_dense_compiled"] == pytest.approx(sum(base["runs_s"]) / sum(r["runs_s"]))
        assert r["speedup_spread"] == pytest.approx([min(base["runs_s"]) / max(r["runs_s"]), max(base["runs_s"]) / min(r["runs_s"])])
        assert isinstance(r["timing_reliable"], bool) and r["timing_reliable"] == (not r["timing_reasons"])
    sparse = [r for r in rows if r["method"] == "svg2"]
    assert all(0.3 < r["density"] < 0.7 for r in sparse)  # fixed budget 0.5, text rows dense
    assert all(0 < r["attention_share"] <= 1.0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("argv", [["--kernels"], ["--e2e", "--shape", "tiny"], ["--cost-model", "--out", "x.json"]])
def test_gpu_modes_refuse_a_cpu_in_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"bench {argv[0]}: needs a CUDA GPU" in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_bench_needs_exactly_one_mode(capsys):
    assert cli(["bench", "--kernels", "--e2e"]) == 2
    assert "give exactly one of --kernels, --e2e, --cost-model" in capsys.readouterr().err
    assert cli(["bench", "--help"]) == 0
    assert "--cost-model" in capsys.readouterr().out


def test_scripts_run_the_same_code():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "vdit-sparse bench --kernels" in run.stdout
