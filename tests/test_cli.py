"""The CLI as a user runs it: a real mp4 and sidecar, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

SMALL = ["--steps", "2", "--frames", "9", "--height", "64", "--width", "64"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vdit_sparse", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generate_writes_a_playable_mp4_and_sidecar(tmp_path):
    out = tmp_path / "clip.mp4"
    r = cli("generate", "a red circle", *SMALL, "--out", str(out), "seed=3", "--threads", "1")
    assert r.returncode == 0, r.stderr
    frames = _read_ffmpeg(out)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (64, 64)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["seed"] == 3 and side["config"]["model"]["steps"] == 2
    assert side["config"]["prompt"] == "a red circle"
    assert side["device"] == "cpu" and side["versions"]["diffusers"]
    assert side["density"] == 1.0 and set(side["density_per_layer"]) == {f"transformer.{i}" for i in range(6)}
    assert side["wall_s"] > 0 and side["attention_ms"] > 0
    assert side["threads"] == side["config"]["threads"] == 1  # --threads: torch's thread count for the run


def _read_ffmpeg(path):
    import imageio.v2 as imageio
    import numpy as np

    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])  # list(reader) asks len(), which is inf


def test_generate_gif_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "clip.gif"
    assert cli("generate", "a blue square", *SMALL, "--out", str(out)).returncode == 0
    before = out.read_bytes()
    r = cli("generate", "a blue square", *SMALL, "--out", str(out), "seed=1")
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert out.read_bytes() == before
    r = cli("generate", "a blue square", *SMALL, "--out", str(out), "--overwrite", "seed=1")
    assert r.returncode == 0 and out.read_bytes() != before


@pytest.mark.parametrize("args, message", [
    (["--attention", "fast"], "attention='fast': unknown method; known methods are dense"),
    (["--cache", "lru"], "cache='lru': unknown cache; known caches are none"),
    (["--attention", "svg", "--density", "0"], "density=0.0: must be a number in (0, 1]"),
    (["--attention", "svg2", "--density", "1.5"], "density=1.5"),
    (["--density", "0.5"], "density: not a setting of attention='dense'"),
    (["--frames", "10"], "frames=10: this model takes 4k + 1 frames"),
    (["--height", "100"], "height=100: this model takes multiples of 16"),
    (["--model", "/no/such/model"], "not a diffusers pipeline directory"),
    (["--out", "clip.avi"], "must end in .mp4 or .gif"),
    (["attention.sparsity=0.5"], "sparsity: not a setting of attention='dense'"),
    (["--attention", "svg", "--top-p", "0.5"], "top_p: not a setting of attention='svg'; its settings are"),
    (["--threshold", "-10"], "threshold: a tile-skip setting, used only with cache='tileskip'"),
    (["--dense-backend", "nope"], "dense_backend='nope': not a diffusers attention backend"),
    (["--dense-backend", "xformers"], "dense_backend='xformers'"),
    (["notakeyvalue"], "expected KEY=VALUE"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    from vdit_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", "--steps", "1", *args]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_bad_input_from_the_installed_command_exits_2(tmp_path):
    r = cli("generate", "a red circle", "--attention", "svg", "--density", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["vdit-sparse: error: density=0.0: must be a number in (0, 1]"]
    assert list(tmp_path.iterdir()) == []


def test_help_lists_generate():
    r = cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout


def test_compare_takes_leading_options(tmp_path, monkeypatch, capsys):
    from vdit_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["compare", "--prompts", "missing.txt", "--attention", "svg", "--report", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.txt" in err[0]
    assert not (tmp_path / "r").exists()


def test_compile_time_is_reported_apart_from_generation(tmp_path, monkeypatch):
    from vdit_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", *SMALL, "--out", "c.mp4", "compile=aot_eager"]) == 0
    side = json.loads((tmp_path / "c.json").read_text())
    assert side["config"]["compile"] == "aot_eager"
    assert side["compile_s"] > 0 and side["wall_s"] > 0


def test_compile_warm_up_runs_without_the_step_cache(tmp_path, monkeypatch):
    # the one-step compile warm-up must not meet MagCache, whose ratios are laid out for the run's 2 steps
    from vdit_sparse.cli import main

    (tmp_path / "mag.yaml").write_text("caches:\n  magcache: {mag_ratios: [1.0, 1.0]}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", *SMALL, "--out", "c.mp4", "--cache", "magcache", "--tuned", "mag.yaml",
                 "compile=aot_eager"]) == 0
    side = json.loads((tmp_path / "c.json").read_text())
    assert side["compile_s"] > 0 and len(side["computed"]) == 2 * 2  # 2 steps x 2 guidance branches, none from warm-up


def test_generate_takes_a_tuned_table(tmp_path, monkeypatch):
    from vdit_sparse.cli import main

    table = tmp_path / "t.yaml"
    table.write_text("layers:\n  1: {attention: svg, density: 0.5, block_size: 16}\n")  # 48 tokens: 3 blocks
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", *SMALL, "--out", "a.mp4", "--tuned", str(table)]) == 0
    assert main(["generate", "a red circle", *SMALL, "--out", "b.mp4", f"tuned={table}"]) == 0
    for name in ("a.json", "b.json"):
        side = json.loads((tmp_path / name).read_text())
        assert side["config"]["tuned"] == str(table)
        assert side["density_per_layer"]["transformer.1"] < 1.0 and side["density_per_layer"]["transformer.0"] == 1.0


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    """Start-up (importing diffusers) once ran outside the guard: a Ctrl-C there printed a traceback."""
    import vdit_sparse.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_quiet_libraries", interrupted)
    assert cli.main(["generate", "a red square"]) == 130
    assert capsys.readouterr().err.strip() == "vdit-sparse: interrupted"


def test_importing_the_package_loads_no_torch():
    """The console script imports vdit_sparse.cli before main() runs: torch loading there would put seconds (and
    any Ctrl-C in them) outside the guard."""
    import subprocess
    import sys

    code = "import sys, vdit_sparse.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() == "False"
