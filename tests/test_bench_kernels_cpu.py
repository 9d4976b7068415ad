"""vdit-sparse bench --kernels --device cpu: one row per point, ratios against dense from the same run;
bad values refused in one line before any work."""

import pytest

from vdit_sparse.bench import kernels_cpu
from vdit_sparse.cli import main as cli


def test_a_small_run_prints_a_row_per_point_and_the_planning_table(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VDIT_SPARSE_CACHE_DIR", str(tmp_path))
    argv = ["bench", "--kernels", "--device", "cpu", "--sizes", "4096", "--head-dims", "8", "--threads", "1",
            "--densities", "1.0", "0.25", "--repeats", "1", "--heads", "1", "--keep-cache"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 | 4,096 | 8 |")]
    assert len(rows) == 4  # two densities, then svg profiling and tile-skip bookkeeping
    assert rows[1].split(" | ")[3] == "0.250"  # realised density: 16 of 64 key blocks per query block
    assert "compiled loop:" in out


def test_random_plans_keep_the_asked_share_of_blocks():
    import torch

    plan = kernels_cpu.random_plan(3, 1000, 0.1, torch.Generator().manual_seed(0))  # 16 blocks, the last one short
    assert plan.kv_count.unique().tolist() == [2]  # round(0.1 · 16) key blocks for every query block


@pytest.mark.parametrize("bad", [["--densities", "1.5"], ["--sizes", "0"], ["--repeats", "0"]])
def test_bad_values_are_refused_in_one_line(bad, capsys):
    assert cli(["bench", "--kernels", "--device", "cpu", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error: bench --kernels --device cpu: --" in err and bad[1] in err
