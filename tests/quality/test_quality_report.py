"""The report: atomic files, contract keys, well-formed plots, and a video that plays in Chromium."""

import json
import math
import os
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from vdit_sparse import atomicfile
from vdit_sparse.quality import compare_videos, plots
from vdit_sparse.atomicfile import atomic_write
from vdit_sparse.quality.report import ReportEntry, density_matrix, render_html, write_report
from vdit_sparse.quality.video import encode_mp4, side_by_side

CHROMIUM = "/usr/bin/chromium"


def _videos(t=8, size=32):
    dense = np.zeros((t, size, size, 3), np.uint8)
    dense[:] = (30, 60, 200)
    for i in range(t):
        dense[i, 10:18, 2 + 2 * i : 10 + 2 * i] = (250, 40, 40)
    fast = np.clip(dense.astype(int) + np.random.default_rng(0).normal(0, 6, dense.shape), 0, 255).astype(np.uint8)
    return dense, fast


def _stats(steps=4, layers=3):
    return [
        {"step": s, "layer": l, "branch": b, "model": "transformer", "method": "svg2", "density": 1.0 if s == 0 else 0.1 * (l + 1), "ms": 1.0}
        for s in range(steps) for l in range(layers) for b in ("cond", "uncond")
    ]


def _metrics_and_entry():
    dense, fast = _videos()
    entry = compare_videos(dense, fast, lpips=False)
    entry.update(prompt="a red square", label="a red square", speedup=1.7, density=0.25)
    mean = {k: entry[k] for k in ("speedup", "psnr", "ssim", "lpips", "density")}
    return {"mean": mean, "prompts": [entry]}, ReportEntry(entry, dense, fast, _stats())


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomicfile.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new content")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left behind


def test_atomic_write_replaces_through_a_temp_file_in_the_same_directory(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).parent, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomicfile.os, "replace", spy)
    atomic_write(tmp_path / "report.md", "# hi")
    assert seen == [(tmp_path, tmp_path / "report.md")]
    assert (tmp_path / "report.md").read_text() == "# hi"


def test_a_report_that_fails_to_render_touches_no_file(tmp_path, monkeypatch):
    metrics, entry = _metrics_and_entry()
    paths = write_report(tmp_path, metrics, [entry])
    before = {p: p.read_bytes() for p in paths.values()}

    def broken(*a, **k):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr("vdit_sparse.quality.report.encode_mp4", broken)
    metrics["mean"]["speedup"] = 99.0
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_report(tmp_path, metrics, [entry])
    assert {p: p.read_bytes() for p in paths.values()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.html", "report.md"]


def test_metrics_json_keeps_the_contract_and_is_strict_json(tmp_path):
    metrics, entry = _metrics_and_entry()
    metrics["prompts"][0].update(psnr=None, identical=True)
    metrics["prompts"][0]["ssim_float"] = math.nan  # anything non-finite that slips through is written as null
    write_report(tmp_path, metrics, [entry])

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    loaded = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert set(loaded) >= {"mean", "prompts"}
    for e in [loaded["mean"], *loaded["prompts"]]:
        assert {"speedup", "psnr", "ssim", "lpips", "density"} <= set(e)
    assert loaded["prompts"][0]["psnr"] is None and loaded["prompts"][0]["ssim_float"] is None
    assert loaded["mean"]["lpips"] is None
    md = (tmp_path / "report.md").read_text()
    assert "| identical |" in md and "| mean |" in md


def test_missing_contract_keys_are_refused(tmp_path):
    metrics, entry = _metrics_and_entry()
    del metrics["mean"]["density"]
    with pytest.raises(ValueError, match="density"):
        write_report(tmp_path, metrics, [entry])
    assert not any(tmp_path.iterdir())


def test_density_matrix_averages_branches_per_layer_and_step():
    stats = _stats(steps=3, layers=2)
    stats.append({"step": 1, "layer": 0, "branch": "cond", "model": "transformer", "density": 0.4, "ms": 1})
    labels, m = density_matrix(stats)
    assert labels == ["0", "1"] and m.shape == (2, 3)
    np.testing.assert_allclose(m[:, 0], 1.0)
    assert m[0, 1] == pytest.approx((0.1 + 0.1 + 0.4) / 3) and m[1, 2] == pytest.approx(0.2)


def test_the_html_is_self_contained_with_svg_plots_that_parse():
    metrics, entry = _metrics_and_entry()
    metrics["sweep"] = [{"label": f"density={d}", "mean": {"speedup": 1 / d, "psnr": 20 + 10 * d}} for d in (0.1, 0.3)]
    html = render_html(metrics, [entry], "t")
    assert "data:video/mp4;base64," in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from elsewhere
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 3  # Pareto, per-frame PSNR, density heat map
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML


def test_pareto_front_drops_dominated_settings():
    points = [(1.0, 30.0), (2.0, 25.0), (1.5, 24.0), (3.0, 20.0), (2.0, 25.0)]
    assert plots.pareto_front(points) == [0, 1, 4, 3]  # (1.5, 24) is beaten by (2, 25) on both


def test_side_by_side_is_even_and_its_mp4_decodes_to_the_same_frames(tmp_path):
    dense, fast = _videos(t=6, size=31)  # odd sizes must be padded for yuv420p
    row = side_by_side(dense, fast)
    assert row.shape[1] % 2 == 0 and row.shape[2] % 2 == 0
    np.testing.assert_array_equal(row[:, :31, :31], dense)
    np.testing.assert_array_equal(row[:, :31, 33:64], fast)
    path = tmp_path / "v.mp4"
    path.write_bytes(encode_mp4(row))
    decoded = iio.imread(path)  # (T, H, W, 3) through imageio-ffmpeg
    assert decoded.shape == row.shape
    assert np.abs(decoded.astype(int) - row.astype(int)).mean() < 12  # lossy, but the same picture


def _chromium_dom(html_path: Path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                "--virtual-time-budget=5000", "--dump-dom", html_path.as_uri(),
            ],
            capture_output=True, text=True, timeout=90,
        )
    return out.stdout


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_report_html_opens_in_headless_chromium_and_its_video_loads(tmp_path):
    metrics, entry = _metrics_and_entry()
    paths = write_report(tmp_path, metrics, [entry])
    broken = tmp_path / "broken.html"  # control: the same page with a corrupt video must report an error
    broken.write_text(paths["html"].read_text().replace("base64,", "base64,ZZZZ", 1))
    dom = _chromium_dom(paths["html"])
    assert "<video" in dom and 'data-state="loaded"' in dom, dom[-2000:]
    assert 'data-state="error"' in _chromium_dom(broken)


def test_two_model_runs_name_the_rows_of_the_density_map_with_or_without_a_step_cache():
    metrics, entry = _metrics_and_entry()
    entry.stats = entry.stats + [dict(r, model="transformer_2") for r in entry.stats]
    html = render_html(metrics, [entry], "t")
    assert "<p>layers: transformer.0, transformer.1, transformer.2, transformer_2.0," in html
    assert "computed (layer × step" not in html  # no step cache: no computed map
    metrics, entry = _metrics_and_entry()
    assert "<p>layers:" not in render_html(metrics, [entry], "t")  # one model: rows are layer indices
