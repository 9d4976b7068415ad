"""Bad input as a new user gives it: one line on stderr, exit code 2, nothing written, no model loaded.

Each row is an input that once gave a traceback deep inside a library, or failed only after the
whole generation. ``load_pipeline`` is replaced by a function that fails the test: every refusal
below must come before any model work.
"""

import json

import pytest

from vdit_sparse.cli import main

BINARY = b"\xff\xfe\x00a red square\n"


@pytest.fixture
def no_model_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("vdit_sparse.loading.load_pipeline", refuse)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIT_SPARSE_HOME", str(tmp_path / "home"))
    (tmp_path / "bad.yaml").write_text("layers: {1: {density: 0.2\n")  # an unclosed mapping
    (tmp_path / "wrong-key.yaml").write_text("layers:\n  1: {top_p: 0.5}\n")  # svg has no top_p
    (tmp_path / "binary.txt").write_bytes(BINARY)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "adir.mp4").mkdir()
    meta = "metadata: {model: tiny, attention: svg, calibration: {steps: 10}}\n"
    (tmp_path / "svg-table.yaml").write_text(meta + "layers:\n  1: {density: 0.2}\n")
    (tmp_path / "other-model.yaml").write_text(meta.replace("tiny", "some/model") + "layers:\n  1: {density: 0.2}\n")
    (tmp_path / "mag.yaml").write_text("metadata: {model: tiny, cache: magcache, steps: 10}\nlayers: {}\n"
                                       "caches: {magcache: {mag_ratios: [1.0, 1.0]}}\n")
    return tmp_path


CASES = [  # (argv, what the one line must say)
    (["generate", "a red square", "--attention", "svg", "--tuned", "bad.yaml"], "tuned table bad.yaml: not valid YAML"),
    (["generate", "a red square", "--attention", "svg", "--tuned", "wrong-key.yaml"],
     "layer 1: top_p: not a setting of attention='svg'"),
    (["generate", "a red square", "--tuned", "no-such-table"], "tuned='no-such-table': no such table"),
    (["generate", "a red square", "model.guidance_scale=abc"], "model.guidance_scale='abc': must be int or float"),
    (["generate", "a red square", "model.steps=2.5"], "model.steps=2.5: must be int"),
    (["generate", "a red square", "--cache", "magcache"], "magcache.mag_ratios: MagCache needs the model's ratios"),
    (["compare", "a red square", "--cache", "magcache", "--report", "r"], "magcache.mag_ratios: MagCache needs"),
    (["generate", "a red square", "--cache", "fbcache", "fbcache.threshold=nan"], "fbcache.threshold=nan: must be a number >= 0"),
    (["generate", "a red square", "seed=x"], "seed='x': must be an integer"),
    (["generate", "a red square", "--out", "a-file/clip.mp4"], "is a file, not a folder"),
    (["generate", "a red square", "--out", "/proc/vdit-sparse/clip.mp4"], "cannot be written"),
    (["generate", ""], "PROMPT='': must be non-empty text"),
    (["generate", "   "], "must be non-empty text"),
    (["compare", "", "--attention", "svg", "--report", "r"], "PROMPT='': must be non-empty text"),
    (["compare", "--prompts", "binary.txt", "--attention", "svg", "--report", "r"], "--prompts 'binary.txt': not UTF-8 text"),
    (["compare", "a red square", "--attention", "svg", "--report", "a-file"], "is a file; expected a directory"),
    (["compare", "a red square", "--attention", "svg", "--report", "/proc/vdit-sparse-report"], "cannot be written"),
    (["compare", "a red square", "--attention", "svg", "--report", "r", "--sweep", "top_p=0.5"],
     "top_p: not a setting of attention='svg'"),
    (["tune", "--attention", "svg", "--target-error", "0.1", "--out", "a-file/t.yaml"], "is a file, not a folder"),
    (["tune", "--attention", "svg", "--target-error", "0.1", "--out", "t", "--prompts", "binary.txt"],
     "--prompts 'binary.txt': not UTF-8 text"),
    (["tune", "--attention", "svg", "--target-error", "0.1", "--out", "t", "model.guidance_scale=abc"],
     "model.guidance_scale='abc'"),
    # a newcomer's first tries (issue: a newcomer's first commands)
    (["generate", "a red square", "--height", "1000000"], "height=1000000: this model takes at most 1024"),
    (["generate", "a red square", "--frames", "1001"], "frames=1001: this model takes at most 253 frames"),
    (["generate", "a red square", "--out", "adir.mp4", "--overwrite"], "'adir.mp4' is a folder; give a file name"),
    (["generate", "a red square", "--density", "abc"], "argument --density: invalid float value: 'abc'"),
    (["generate", "a red square", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["compare", "a red square", "--attention", "svg", "--report", "r", "--steps", "abc"], "invalid int value: 'abc'"),
    (["tune", "--attention", "svg", "--target-psnr", "x", "--out", "t"], "argument --target-psnr: invalid float value"),
    (["generate", "a red square", "--attention", "svg2", "--tuned", "svg-table.yaml"],
     "tuned for attention='svg', this run is attention='svg2'"),
    (["generate", "a red square", "--attention", "svg", "--tuned", "svg-table.yaml", "--steps", "20"],
     "tuned at 10 steps, this run has 20"),
    (["generate", "a red square", "--attention", "svg", "--tuned", "other-model.yaml"],
     "tuned on model='some/model', this run is model='tiny'"),
    (["generate", "a red square", "--tuned", "mag.yaml"], "holds only step-cache settings (magcache); run it with --cache magcache"),
    (["generate", "a red square", "--model", "some/model", "--random-weights"], "--random-weights: only for the embedded"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_before_any_work(workdir, no_model_work, capsys, argv, message):
    before = sorted(p.name for p in workdir.iterdir())
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written, not even a folder


def test_a_second_comparison_into_the_same_report_is_refused(workdir, capsys):
    import fcntl

    report = workdir / "r"
    report.mkdir()
    with open(report / ".lock", "a+") as held:  # another comparison is writing r/
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["compare", "a red square", "--attention", "svg", "--report", str(report), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another comparison is writing it now" in err[0]
    assert [p.name for p in report.iterdir()] == [".lock"]


def test_tuned_tables_belong_to_the_user(workdir, tiny_pipe):
    """tune --out NAME writes into $VDIT_SPARSE_HOME/tuned, never into the package; --tuned NAME finds it there first."""
    from vdit_sparse.config import config_dir, find_tuned_table
    from vdit_sparse.tune import command as tune

    shipped_before = sorted(p.name for p in (config_dir() / "tuned").iterdir())
    argv = ["--attention", "svg", "--target-error", "0.5", "--values", "0.3,0.6", "--out", "mine", "--no-validate",
            "--steps", "1", "--frames", "9", "--height", "64", "--width", "64", "attention.block_size=16"]
    assert tune.main(argv, pipe=tiny_pipe) == 0
    written = workdir / "home" / "tuned" / "mine.yaml"
    assert written.is_file() and find_tuned_table("mine") == written
    assert sorted(p.name for p in (config_dir() / "tuned").iterdir()) == shipped_before
    assert main(["generate", "a red square", "--attention", "svg", "--tuned", "mine", "--steps", "1", "--frames", "9",
                 "--height", "64", "--width", "64", "--out", "clip.mp4"]) == 0
    side = json.loads((workdir / "clip.json").read_text())
    assert side["config"]["tuned"] == "mine" and side["config"]["out"] == "clip.mp4"  # the sidecar names its video


def test_a_tuned_dict_in_the_files_shape_means_what_the_file_means(tmp_path, tiny_pipe):
    import yaml

    import vdit_sparse as vs
    from vdit_sparse.config import load_tuned
    from vdit_sparse.errors import UserError

    data = {"layers": {1: {"density": 0.5}}, "caches": {"magcache": {"mag_ratios": [1.0, 1.0]}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_tuned(str(path)) == ({1: {"density": 0.5}}, {"magcache": {"mag_ratios": [1.0, 1.0]}})
    acc = vs.accelerate(tiny_pipe, attention="svg", cache="magcache", tuned=data, **{"magcache.num_inference_steps": 2})
    acc.remove()
    assert acc.policy.layers[1][1].density == 0.5 and acc.step_cache.mag_ratios == (1.0, 1.0)
    acc = vs.accelerate(tiny_pipe, attention="svg", tuned={0: {"density": 0.3}})  # a bare layers mapping
    acc.remove()
    assert acc.policy.layers[0][1].density == 0.3
    for bad, message in [({-1: {"density": 0.5}}, "LAYER a layer index >= 0"), ({"layers": [1]}, "LAYER a layer index"),
                         ({"caches": {"magcache": 3}}, "'caches' must map a cache name to its settings")]:
        with pytest.raises(UserError, match=message):
            vs.accelerate(tiny_pipe, attention="svg", tuned=bad)


def test_a_ulysses_degree_the_heads_cannot_take_is_refused_before_any_work(workdir, no_model_work, capsys, monkeypatch):
    """The README's old example (degree 4 for the embedded model's 6 heads) died in diffusers after the model
    loaded, and compare left report/.lock and comparison.json behind."""
    import vdit_sparse.parallel as parallel

    monkeypatch.setattr(parallel, "start", lambda degree, command="generate": None)  # as if torchrun had started 4
    monkeypatch.setattr(parallel, "degree", lambda: 4)
    for argv in (["generate", "a red square", "--ulysses-degree", "4"],
                 ["compare", "a red square", "--attention", "svg2", "--ulysses-degree", "4", "--report", "report"]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "6 attention heads cannot be shared among 4 ranks; use one of 1, 2, 3, 6" in lines[0]
    assert not (workdir / "report").exists()


def test_a_prompt_of_unknown_words_draws_a_one_line_notice(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a purple elephant dancing", "--steps", "1", "--frames", "5", "--height", "32",
                 "--width", "32", "--out", "e.mp4"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "notice" in line]
    assert len(notices) == 1 and "'elephant', 'dancing'" in notices[0] and "purple" not in notices[0].split(";")[0]
    assert "red green blue" in notices[0]  # it names the words the model knows
