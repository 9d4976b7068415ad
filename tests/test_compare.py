"""`vdit-sparse compare` with a fake generator: same seeds, cached dense runs, resume, sweeps, bad input."""

import json
import re

import numpy as np
import pytest

from vdit_sparse import compare
from vdit_sparse.errors import UserError
from vdit_sparse.generate import GenerationResult
from vdit_sparse.quality import psnr

T, SIZE, DENSE_WALL = 8, 32, 2.0


def _frames(seed: int) -> np.ndarray:
    """The 'dense' video of a seed: a square moving over a gradient, float (T, H, W, 3)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    v = np.empty((T, SIZE, SIZE, 3), np.float32)
    v[..., 0], v[..., 1], v[..., 2] = x * 0.5, y * 0.5, 0.6
    for t in range(T):
        v[t, 8:16, 2 + 2 * t + seed % 4 : 10 + 2 * t + seed % 4] = (0.9, 0.2, 0.2)
    return v


class FakeGenerator:
    """Stands in for the pipeline: sparse runs add noise that grows as density falls; attention is 75 % of a
    dense run's wall time, and the rest does not shrink, so every speed-up is one the work allows."""

    def __init__(self, fail_after: int | None = None):
        self.calls = []
        self.fail_after = fail_after
        self.dense_wall = None  # set: dense runs take this long
        self.walls = {}  # attention -> the wall times its runs take in turn (a machine with slow spells)

    def __call__(self, req):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(req)
        clean = _frames(req.seed)
        if req.attention == "dense":
            density, frames = 1.0, clean
            if self.dense_wall is not None:
                return GenerationResult(frames=(frames * 255 + 0.5).astype(np.uint8), frames_float=frames,
                                        wall_s=self.dense_wall, attention_ms=1.0, density=1.0, stats=[], config={"seed": req.seed})
        else:
            density = float(req.settings.get("density", 0.5))
            noise = np.random.default_rng(req.seed).normal(0, 0.1 * (1 - density), clean.shape)
            frames = np.clip(clean + noise, 0, 1).astype(np.float32)
        stats = [
            {"step": s, "layer": l, "branch": "cond", "model": "transformer", "method": req.attention,
             "density": 1.0 if s == 0 else density, "ms": 250.0 * (1.0 if s == 0 else density), "extra": object()}
            for s in range(3) for l in range(2)
        ]
        walls = self.walls.get(req.attention)
        return GenerationResult(
            frames=(frames * 255 + 0.5).astype(np.uint8), frames_float=frames,
            wall_s=walls.pop(0) if walls else DENSE_WALL * (0.25 + 0.75 * density), attention_ms=sum(r["ms"] for r in stats),
            density=density, stats=stats, config={"seed": req.seed},
        )


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "report", tmp_path / "cache"


def _run(argv, dirs, gen):
    report, cache = dirs
    argv = [*argv, "--report", str(report), "--dense-cache", str(cache), "--no-lpips"]
    return compare.main(argv, generate_fn=gen, load=lambda: 0.0)  # an idle machine: timings judged by spread alone


def _metrics(dirs):
    return json.loads((dirs[0] / "metrics.json").read_text())


def test_one_prompt_writes_the_contract_with_numbers_from_the_same_seed(dirs):
    gen = FakeGenerator()
    assert _run(["a red square", "--attention", "svg2", "--density", "0.2", "--seed", "3"], dirs, gen) == 0
    dense, fast = gen.calls[:2]
    assert gen.calls == [dense, fast] * 4  # one warm-up of each, then three alternated timed runs
    assert dense.attention == "dense" and dense.settings == {} and fast.attention == "svg2"
    assert dense.seed == fast.seed == 3 and dense.prompt == fast.prompt
    m = _metrics(dirs)
    (entry,) = m["prompts"]
    for e in (m["mean"], entry):
        assert {"speedup", "psnr", "ssim", "lpips", "density"} <= set(e)
    expected = psnr(gen(dense).frames, gen(fast).frames)
    assert entry["psnr"] == pytest.approx(expected, abs=1e-6) and m["mean"]["psnr"] == pytest.approx(expected, abs=1e-6)
    assert entry["speedup"] == pytest.approx(DENSE_WALL / (DENSE_WALL * (0.25 + 0.75 * 0.2)))
    assert entry["speedup_spread"] == pytest.approx([entry["speedup"]] * 2) and entry["timing_reliable"] is True
    assert m["mean"]["speedup"] == pytest.approx(entry["speedup"]) and m["mean"]["reliable_entries"] == 1
    assert entry["density"] == pytest.approx(0.2) and entry["lpips"] is None
    assert 0 < entry["ssim"] < 1 and set(entry["vbench"]) == set(entry["vbench_reference"])
    html = (dirs[0] / "report.html").read_text()
    assert html.count("data:video/mp4;base64,") == 1 and "realised density" in html
    assert (dirs[0] / "report.md").is_file()


def test_a_second_comparison_reuses_the_cached_dense_video_but_times_dense_again(dirs, tmp_path):
    first, second, third = FakeGenerator(), FakeGenerator(), FakeGenerator()
    _run(["a red square", "--attention", "svg2"], dirs, first)
    cached = {p: p.stat().st_mtime_ns for p in dirs[1].rglob("*") if p.is_file()}
    second.dense_wall = 10 * DENSE_WALL  # the machine got busy: only a fresh dense timing can say so
    _run(["a red square", "--attention", "svg", "--density", "0.3"], (tmp_path / "other", dirs[1]), second)
    assert [r.attention for r in first.calls] == ["dense", "svg2"] * 4
    assert [r.attention for r in second.calls] == ["dense", "svg"] * 4  # timed again, alternately with svg
    assert {p: p.stat().st_mtime_ns for p in dirs[1].rglob("*") if p.is_file()} == cached  # the video is reused
    m = json.loads((tmp_path / "other" / "metrics.json").read_text())
    entry = m["prompts"][0]
    assert entry["speedup"] == pytest.approx(10 * DENSE_WALL / (DENSE_WALL * (0.25 + 0.75 * 0.3)))
    # dense's attention took 1 ms of its 20 s: nothing svg skips explains 21x; flagged, and out of the mean
    assert entry["speedup_bound"] == pytest.approx(1 / (1 - 1e-3 / (10 * DENSE_WALL)))
    assert entry["timing_reliable"] is False and "more than the 1.00x the computed work allows" in entry["timing_reasons"][0]
    assert m["mean"]["speedup"] is None and m["mean"]["reliable_entries"] == 0 and m["mean"]["timed_entries"] == 1
    _run(["a red square", "--attention", "svg", "--density", "0.4", "--no-timing"], (tmp_path / "third", dirs[1]), third)
    assert [r.attention for r in third.calls] == ["svg"]
    m = json.loads((tmp_path / "third" / "metrics.json").read_text())
    assert m["prompts"][0]["speedup"] is None and m["mean"]["speedup"] is None  # not measured, never a guess
    html = (tmp_path / "third" / "report.html").read_text()
    assert "<tr><td>a red square</td><td>svg against dense</td><td>—</td>" in html and "not measured" in html


def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(dirs):
    argv = ["a red square", "--attention", "svg2", "--sweep", "density=0.1,0.2,0.4"]
    with pytest.raises(KeyboardInterrupt):
        _run(argv, dirs, FakeGenerator(fail_after=10))  # dense and density 0.1 finish (8 runs), 0.2 is timing
    leftovers = [p.name for p in (dirs[0] / "runs").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written run
    resumed = FakeGenerator()
    _run(argv, dirs, resumed)
    assert [r.settings.get("density") for r in resumed.calls] == [None, 0.2] * 4 + [None, 0.4] * 4  # alternated
    m = _metrics(dirs)
    assert len(m["prompts"]) == 3 and [s["setting"] for s in m["sweep"]] == [{"density": d} for d in (0.1, 0.2, 0.4)]
    psnrs = [s["mean"]["psnr"] for s in m["sweep"]]
    speedups = [s["mean"]["speedup"] for s in m["sweep"]]
    assert psnrs == sorted(psnrs) and speedups == sorted(speedups, reverse=True)  # the fake's trade-off
    assert "Pareto" in (dirs[0] / "report.html").read_text()
    again = FakeGenerator()
    _run(argv, dirs, again)
    assert again.calls == []  # a finished comparison only re-renders its report


def test_a_sweep_of_list_settings_keeps_each_list_whole_and_resumes(dirs):
    argv = ["a red square", "--attention", "sta", "--sweep", "window=[1,2,2], [3,0,0]", "--sweep", "warmup_steps=0,1"]
    gen = FakeGenerator()
    _run(argv, dirs, gen)
    windows = [r.settings["window"] for r in gen.calls if r.attention == "sta"]
    assert windows == [(1, 2, 2)] * 8 + [(3, 0, 0)] * 8  # two points each, a warm-up and three timed runs each
    assert [s["setting"] for s in _metrics(dirs)["sweep"]] == [
        {"window": [1, 2, 2], "warmup_steps": 0}, {"window": [1, 2, 2], "warmup_steps": 1},
        {"window": [3, 0, 0], "warmup_steps": 0}, {"window": [3, 0, 0], "warmup_steps": 1}]
    again = FakeGenerator()
    _run(argv, dirs, again)
    assert again.calls == []  # the stored comparison is recognised as this one


def test_prompts_file_gives_one_entry_per_prompt_and_their_mean(dirs, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# shapes\na red square\n\na blue circle\n")
    gen = FakeGenerator()
    _run(["--prompts", str(f), "--attention", "svg2", "--density", "0.3"], dirs, gen)
    m = _metrics(dirs)
    assert [e["prompt"] for e in m["prompts"]] == ["a red square", "a blue circle"]
    assert m["mean"]["ssim"] == pytest.approx(np.mean([e["ssim"] for e in m["prompts"]]))


def test_dense_against_dense_is_identical_in_strict_json(dirs):
    gen = FakeGenerator()
    _run(["a red square", "--attention", "dense"], dirs, gen)
    assert len(gen.calls) == 8  # a warm-up and three timed runs of each side
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    for path in [dirs[0] / "metrics.json", *(dirs[0] / "pairs").iterdir()]:
        json.loads(path.read_text(), parse_constant=refuse)
    m = _metrics(dirs)
    entry = m["prompts"][0]
    assert entry["psnr"] is None and entry["identical"] is True and entry["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["mean"]["psnr"] is None and m["mean"]["identical"] is True
    assert "identical" in (dirs[0] / "report.html").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attention", "svg2"], "exactly one of PROMPT or --prompts"),
        (["p", "--prompts", "x.txt", "--attention", "svg2"], "got both"),
        (["--prompts", "/nonexistent/prompts.txt"], "--prompts '/nonexistent/prompts.txt': no such file"),
        (["p", "--sweep", "density"], "--sweep 'density': expected KEY=V1,V2"),
        (["p", "--sweep", "density=0.1,"], "expected KEY=V1,V2"),
        (["p", "--sweep", "colour=1,2"], "unknown key 'colour'; allowed: attention, cache, warmup_steps"),
        (["p", "--attention", "svg", "--sweep", "density=0.2,2"], "density=2"),
        (["p", "--attention", "svg", "--sweep", "top_p=0.5"], "top_p: not a setting of attention='svg'"),
        (["p", "--sweep", "density=0.1", "--sweep", "density=0.2"], "swept twice"),
        (["p", "--attention", "sta", "--sweep", "window=[1,2,2],[3,0"], "lists in brackets: window=[1,2,2],[3,0,0]"),
        (["p", "--attention", "sta", "--sweep", "window=[1,,2]"], "value [1,,2] is not a list in brackets"),
        (["p", "--attention", "sta", "--sweep", "window=1,2]"], "expected KEY=V1,V2"),
        (["p", "--attention", "sta", "--sweep", "window=[1,2]"], "window=[1, 2]: must be three integers"),
    ],
)
def test_bad_input_is_a_one_line_user_error(dirs, argv, message):
    gen = FakeGenerator()
    with pytest.raises(UserError, match=re.escape(message)) as info:
        _run(argv, dirs, gen)
    assert "\n" not in str(info.value) and gen.calls == []


def test_a_report_dir_holding_another_comparison_needs_overwrite(dirs):
    _run(["a red square", "--attention", "svg2"], dirs, FakeGenerator())
    with pytest.raises(UserError, match="holds a different comparison.*--overwrite"):
        _run(["a blue circle", "--attention", "svg2"], dirs, FakeGenerator())
    _run(["a blue circle", "--attention", "svg2", "--overwrite"], dirs, FakeGenerator())
    assert [e["prompt"] for e in _metrics(dirs)["prompts"]] == ["a blue circle"]


def test_a_foreign_non_empty_dir_is_refused(dirs):
    dirs[0].mkdir()
    (dirs[0] / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no comparison"):
        _run(["p", "--attention", "svg2"], dirs, FakeGenerator())


def test_overrides_after_flags_reach_the_accelerated_run_only(dirs):
    gen = FakeGenerator()
    _run(["a red square", "--attention", "svg2", "attention.top_p=0.8", "model.guidance_scale=3"], dirs, gen)
    dense, fast = gen.calls[:2]
    assert fast.overrides == ("attention.top_p=0.8", "model.guidance_scale=3")
    assert dense.overrides == ("model.guidance_scale=3",)  # model settings are shared, attention ones are not


def test_with_prompts_a_key_value_positional_is_an_override(dirs, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red square\n")
    gen = FakeGenerator()
    _run(["--prompts", str(f), "attention.num_q_clusters=50", "--attention", "svg2"], dirs, gen)
    dense, fast = gen.calls[:2]
    assert fast.overrides == ("attention.num_q_clusters=50",) and dense.overrides == ()


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(dirs):
    """The real pipeline (loaded once, warmed up), a dense reference from the cache on the second run."""
    argv = ["a red square moving right", "--attention", "svg2", "--steps", "1", "--frames", "5", "--height", "64", "--width", "64"]
    assert _run(argv, dirs, None) == 0
    m = _metrics(dirs)
    (entry,) = m["prompts"]
    assert entry["speedup"] > 0 and 0 < entry["density"] <= 1 and 10 < entry["psnr"] and 0 < entry["ssim"] <= 1
    assert len(entry["psnr_per_frame"]) == 5
    cached = list(dirs[1].iterdir())
    assert len(cached) == 1 and (cached[0] / "result.json").is_file()


def test_prompt_following_is_reported_per_prompt_and_as_pass_rates(dirs, tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("vdit_sparse.quality.prompt_following")
    fake.prompt_following = lambda frames, prompt: {"colour_ok": "red" in prompt, "detected_colour": "red", "flicker": 0.25}
    monkeypatch.setitem(sys.modules, "vdit_sparse.quality.prompt_following", fake)
    f = tmp_path / "prompts.txt"
    f.write_text("a red square\na blue circle\n")
    _run(["--prompts", str(f), "--attention", "svg2"], dirs, FakeGenerator())
    m = _metrics(dirs)
    assert [e["prompt_following"]["colour_ok"] for e in m["prompts"]] == [True, False]
    assert m["mean"]["prompt_following"] == {"colour_ok": 0.5, "flicker": 0.25}  # labels are not averaged
    assert "Prompt following" in (dirs[0] / "report.md").read_text()


def test_density_warnings_name_sweep_points_that_are_one_setting_and_cpu_speedups_of_sparse_runs():
    def point(label, density, computed):
        return {"label": label, "mean": {"density": density, "computed_share": computed}}

    same = [point("a", 1.0, 1.0), point("b", 1.0, 1.0), point("c", 1.0, 0.6)]  # c: a step cache skipped layers
    warned = compare.density_warnings([], same)
    assert warned == ["sweep points a, b realise the same density 1.0: they are one setting here"]
    cpu = {"device": "cpu", "speedup": 0.8, "density": 1.0}
    assert compare.density_warnings([dict(cpu, attention="dense", cache="magcache")], None) == []
    for sparse in (dict(cpu, attention="svg", cache="none", density=0.4), dict(cpu, attention="dense", cache="tileskip"),
                   dict(cpu)):  # an entry stored before attention/cache were recorded: warned, to be safe
        (line,) = compare.density_warnings([sparse], None)
        assert line.startswith("sparse attention slower than dense on a CPU")
    # a sparse run that pays for itself on the CPU (the kernel computes only the kept blocks): nothing to explain
    assert compare.density_warnings([dict(cpu, attention="svg", cache="none", density=0.4, speedup=1.6)], None) == []


def test_a_noisy_timing_is_flagged_left_out_of_the_mean_and_said_in_one_line(dirs, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("a red square\na blue circle\n")
    gen = FakeGenerator()
    # each prompt: an untimed warm-up, then three timed references; the first prompt's meets a slow spell
    gen.walls = {"dense": [9.0, 2.0, 10.0, 2.1] + [9.0, 2.0, 2.04, 2.01]}
    _run(["--prompts", str(f), "--attention", "svg2", "--density", "0.2"], dirs, gen)
    m = _metrics(dirs)
    noisy, steady = m["prompts"]
    acc = DENSE_WALL * (0.25 + 0.75 * 0.2)
    assert noisy["speedup"] == pytest.approx(2.1 / acc) and noisy["speedup_spread"] == pytest.approx([2.0 / acc, 10.0 / acc])
    assert noisy["timing_reliable"] is False and noisy["timing_reasons"][0].startswith("reference runs spread by 381 %")
    assert steady["timing_reliable"] is True and steady["speedup_spread"] == pytest.approx([2.0 / acc, 2.04 / acc])
    mean = m["mean"]
    assert mean["speedup"] == pytest.approx(2.01 / acc) and (mean["reliable_entries"], mean["timed_entries"]) == (1, 2)
    out = capsys.readouterr().out.splitlines()
    (line,) = [x for x in out if x.startswith("unreliable speed-up")]
    assert line.startswith(f"unreliable speed-up {2.1 / acc:.4g}x, a red square: reference runs spread by 381 %")
    assert "from 1 of 2 timing(s) reliable" in out[0]
    md = (dirs[0] / "report.md").read_text()
    assert f"| {2.1 / acc:.4g} (unreliable) | {2.0 / acc:.3g}–{10.0 / acc:.3g} |" in md
    assert "Unreliable speed-up, a red square: reference runs spread by 381 %" in md
    assert "Mean speed-up over the 1 of 2 timed entries whose timing is reliable." in md

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    json.loads((dirs[0] / "metrics.json").read_text(), parse_constant=refuse)


def test_the_title_and_tables_name_attention_and_cache_as_run(dirs):
    _run(["a red square", "--cache", "fbcache"], dirs, FakeGenerator())
    md = (dirs[0] / "report.md").read_text()
    assert md.startswith("# vdit-sparse: dense + fbcache against dense\n")
    assert "| a red square | dense + fbcache against dense |" in md
    assert "<title>vdit-sparse: dense + fbcache against dense</title>" in (dirs[0] / "report.html").read_text()


def test_repeats_must_be_positive(dirs):
    with pytest.raises(UserError, match="--repeats 0: must be a positive integer"):
        _run(["a red square", "--attention", "svg2", "--repeats", "0"], dirs, FakeGenerator())
