"""tune --measure-candidates: every lossy candidate's error is the video MSE it causes alone."""

from __future__ import annotations

import json

import pytest

from vdit_sparse.tune.direct import measured_options, video_mse
from vdit_sparse.tune.search import Option, choose


def opts(values):
    return [Option({"attention": "dense"}, 0.0, 1.0, 1.0)] + [Option({"density": v}, v, v, v) for v in values]


def test_each_candidate_runs_alone_and_its_error_becomes_the_video_mse():
    options = {0: opts([0.1, 0.3]), 1: opts([0.1, 0.3]), 2: [Option({"attention": "dense"}, 0.0, 1.0, 1.0)]}
    psnr = {(0, 0.1): 35.0, (0, 0.3): 40.0, (1, 0.1): 10.0, (1, 0.3): 20.0}  # layer 1 reaches the video far more
    seen = []

    def run_table(table, desc):
        sparse = [layer for layer, s in table.items() if s != {"attention": "dense"}]
        assert len(sparse) == 1 and set(table) == {0, 1, 2}  # one layer at its candidate, every other dense
        seen.append(sparse[0])
        return psnr[(sparse[0], table[sparse[0]]["density"])]

    measured = measured_options(options, run_table)
    assert sorted(seen) == [0, 0, 1, 1]  # dense candidates are not run
    assert [o.error for o in measured[0]] == pytest.approx([0.0, 10 ** -3.5, 1e-4])
    assert [o.error for o in measured[1]] == pytest.approx([0.0, 1e-1, 1e-2])
    assert measured[2] == options[2] and [o.cost for o in measured[1]] == [o.cost for o in options[1]]
    # the same attention errors in both layers, but the search now spends the video budget on layer 0 alone
    chosen = choose(measured, target_error=4e-4 / 3)
    assert chosen[0].setting == {"density": 0.1} and chosen[1].setting == {"attention": "dense"}
    assert choose(options, target_error=0.2 / 3)[1].setting != {"attention": "dense"}  # as predicted, not measured
    assert video_mse(20.0) == pytest.approx(0.01)


def test_tune_measure_candidates_on_the_tiny_model(tmp_path, tiny_pipe):
    from tests.test_tune import SMALL, _prompt_files

    from vdit_sparse.errors import UserError
    from vdit_sparse.tune import command as tune

    out = tmp_path / "direct.yaml"
    argv = ["--attention", "svg", "--target-error", "0.01", "--values", "0.3,0.6", "--out", str(out), "--steps", "1",
            *SMALL, *_prompt_files(tmp_path), "attention.block_size=16", "--measure-candidates", "--no-validate"]
    assert tune.main(argv, pipe=tiny_pipe) == 0
    report = json.loads((tmp_path / "direct.report.json").read_text())
    assert report["metadata"]["error_unit"].startswith("video MSE")
    assert not (tmp_path / "direct.probe.yaml").exists()
    with pytest.raises(UserError, match="--measure-candidates: measures what --layer-sensitivity"):
        tune.main(argv + ["--layer-sensitivity"], pipe=tiny_pipe)
