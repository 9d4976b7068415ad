"""sta: exact window membership with partial tiles, accuracy against dense on planted local attention, the default
window, tile-skip on top, and the settings from Python, Hydra and the CLI."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vdit_sparse import VideoLayout, sparse_attention
from vdit_sparse.attention import run_method
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods.sta import STA, build_plan, default_window, tile_counts, window_density
from vdit_sparse.methods import settings_for

from tests.conftest import run_tiny


def expected_mask(layout: VideoLayout, tile, window, slide=True) -> torch.Tensor:
    """(N, N) bool, token by token: key tile within the window of the query's tile on every axis, the window
    [lo, lo + 2w] of tiles with lo = i - w pushed back inside [0, n - 2w - 1] (``slide=False``: not pushed, cut
    at the edges); text rows and columns all True."""
    counts = tile_counts(layout, tile)
    coords = list(itertools.product(range(layout.frames), range(layout.height), range(layout.width)))  # frame-major
    tiles = torch.tensor([[c // t for c, t in zip(p, tile)] for p in coords])  # (V, 3)
    keep = torch.ones(layout.video_tokens, layout.video_tokens, dtype=torch.bool)
    for axis, (n, w) in enumerate(zip(counts, window)):
        i, j = tiles[:, axis][:, None], tiles[:, axis][None, :]
        lo = (i - w).clamp(min=0).clamp(max=max(n - 2 * w - 1, 0)) if slide else i - w
        keep &= (j >= lo) & (j <= lo + 2 * w)
    full = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    s = layout.video_start
    full[s : s + layout.video_tokens, s : s + layout.video_tokens] = keep
    return full


@pytest.mark.parametrize("layout, tile, window", [
    (VideoLayout(frames=5, height=6, width=7), (2, 4, 3), (1, 0, 1)),  # 3 x 2 x 3 tiles, every axis with a partial one
    (VideoLayout(frames=7, height=9, width=5), (3, 2, 2), (0, 1, 2)),  # slid windows at both edges of height
    (VideoLayout(frames=3, height=5, width=6, text_tokens=11, text_position="before"), (2, 2, 4), (0, 1, 0)),
    (VideoLayout(frames=3, height=5, width=6, text_tokens=11, text_position="after"), (1, 3, 5), (1, 0, 0)),
], ids=["plain", "slid", "text-before", "text-after"])
def test_window_membership_is_exact_with_partial_tiles(layout, tile, window):
    plan = build_plan(layout, tile, window, batch=2, heads=3, text_block=8)
    plan.validate(layout.num_tokens)
    want = expected_mask(layout, tile, window)
    assert torch.equal(plan.token_mask(), want.expand(2, 3, -1, -1))
    assert float(plan.density()[0, 0]) == pytest.approx(float(want.double().mean()), abs=1e-6)
    assert window_density(layout, tile, window) == pytest.approx(float(want.double().mean()), abs=1e-12)


def test_tiles_are_contiguous_segments_in_the_kernel_order():
    layout = VideoLayout(frames=5, height=6, width=7)
    plan = build_plan(layout, (2, 4, 3), (0, 0, 0), batch=1, heads=1)
    perm, offsets = plan.q_perm[0].long(), plan.q_offsets[0].long()
    f, y, x = perm // 42, perm % 42 // 7, perm % 7
    tile = (f // 2) * 6 + (y // 4) * 3 + x // 3  # tile-major id of each plan position
    for s in range(offsets.numel() - 1):
        assert (tile[offsets[s] : offsets[s + 1]] == s).all()  # segment s is exactly tile s
    assert offsets.diff().tolist() == [2 * 4 * 3, 2 * 4 * 3, 2 * 4 * 1, 2 * 2 * 3, 2 * 2 * 3, 2 * 2 * 1] * 2 + [
        1 * 4 * 3, 1 * 4 * 3, 1 * 4 * 1, 1 * 2 * 3, 1 * 2 * 3, 1 * 2 * 1]
    assert torch.equal(plan.token_mask()[0, 0], expected_mask(layout, (2, 4, 3), (0, 0, 0)))


def local_qkv(layout: VideoLayout, heads=2, dim=24, sharpness=1.5, seed=0):
    """q, k, v (1, heads, N, dim) whose logits are -sharpness * (squared grid distance) between tokens: attention
    falls off within a token or two; text tokens sit far from the video, so video rows give them no attention."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor(list(itertools.product(range(layout.frames), range(layout.height), range(layout.width))),
                        dtype=torch.float32)  # (V, 3)
    pos = torch.full((layout.num_tokens, 3), -50.0)  # (N, 3)
    s, V = layout.video_start, layout.video_tokens
    pos[s : s + V] = grid
    sq = (pos**2).sum(1, keepdim=True)
    c = sharpness * dim**0.5  # q·k / sqrt(dim) = -sharpness |p - p'|^2 + a per-row constant
    qv = torch.cat([2 * c * pos, -c * sq, torch.full_like(sq, c)], 1)  # (V, 5): 2c p.p' - c|p|^2 - c|p'|^2
    kv = torch.cat([pos, torch.ones_like(sq), -sq], 1)
    q = torch.randn(1, heads, layout.num_tokens, dim, generator=gen) * 0.1
    k = torch.randn(1, heads, layout.num_tokens, dim, generator=gen) * 0.1
    q[..., :5], k[..., :5] = qv, kv
    return q, k, torch.randn(1, heads, layout.num_tokens, dim, generator=gen)


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("text", [0, 16])
def test_output_matches_dense_on_planted_local_attention(text):
    layout = VideoLayout(frames=9, height=14, width=15, text_tokens=text, text_position="after" if text else "none")
    q, k, v = local_qkv(layout)
    dense = F.scaled_dot_product_attention(q, k, v)
    out, info = sparse_attention(q, k, v, layout=layout, method="sta", tile=(2, 4, 4), window=(1, 1, 1))
    assert info["window"] == [1, 1, 1] and info["density"] < 0.45  # 5 x 4 x 4 tiles, 3 kept per axis
    assert rel_l2(out, dense) < 1e-3
    narrow, _ = sparse_attention(q, k, v, layout=layout, method="sta", tile=(2, 4, 4), window=(0, 0, 0))
    assert rel_l2(narrow, dense) > 0.05  # the planted input does need the neighbouring tiles


def test_default_window_is_the_density_closest_to_a_quarter():
    tiny = VideoLayout(frames=7, height=8, width=8)  # the embedded model's 448 tokens: 2 x 2 x 2 tiles of (4, 4, 4)
    assert window_density(tiny, (4, 4, 4), default_window(tiny, (4, 4, 4))) == pytest.approx(0.25)
    assert default_window(tiny, (4, 4, 4)) == (1, 0, 0)  # three windows give 0.25 or 0.255: the exact one
    layout = VideoLayout(frames=21, height=30, width=52)  # Wan 1.3B at 480p
    best = default_window(layout, (4, 4, 4))
    every = [window_density(layout, (4, 4, 4), w) for w in itertools.product(*(range(n) for n in tile_counts(layout, (4, 4, 4))))]
    assert abs(window_density(layout, (4, 4, 4), best) - 0.25) == pytest.approx(min(abs(d - 0.25) for d in every))
    q, k, v = local_qkv(tiny, heads=1)
    _, info = sparse_attention(q, k, v, layout=tiny, method="sta")
    assert info["window"] == [1, 0, 0] and info["density"] == pytest.approx(0.25)


def test_density_chooses_the_closest_window_and_an_explicit_window_wins():
    long = VideoLayout(frames=25, height=8, width=8)  # tiny-long's 1,600 tokens: 7 x 2 x 2 tiles
    q, k, v = local_qkv(long, heads=1)
    every = {w: window_density(long, (4, 4, 4), w) for w in itertools.product(*(range(n) for n in tile_counts(long, (4, 4, 4))))}
    for target in (0.15, 0.5, 0.75):
        _, info = sparse_attention(q, k, v, layout=long, method="sta", density=target)
        assert abs(info["density"] - target) == pytest.approx(min(abs(d - target) for d in every.values()), abs=1e-6)
        assert info["density"] == pytest.approx(every[tuple(info["window"])], abs=1e-6)
    _, info = sparse_attention(q, k, v, layout=long, method="sta", density=0.75, window=(0, 0, 0))
    assert info["window"] == [0, 0, 0]
    with pytest.raises(ValueError, match=r"density=1\.5: must be a number in \(0, 1\]"):
        settings_for("sta", {"density": 1.5})


def test_the_plan_is_built_once_per_layer_and_shape():
    layout = VideoLayout(frames=5, height=6, width=7)
    q, k, v = local_qkv(layout, heads=1)
    ctx, method = AttentionContext(layout=layout), STA()
    params = settings_for("sta", {"window": (1, 0, 1), "tile": (2, 4, 3)})
    first, _ = method.plan(q, k, ctx, params)
    assert method.plan(q, k, ctx, params)[0] is first  # the next step: the same plan, nothing rebuilt
    other, info = method.plan(q, k, ctx, params.updated(window=(0, 0, 0)))
    assert other is not first and info["window"] == [0, 0, 0]


def test_tileskip_drops_only_negligible_tiles_inside_the_window():
    layout = VideoLayout(frames=9, height=14, width=15)
    q, k, v = local_qkv(layout, heads=1, sharpness=3.0)
    dense = F.scaled_dot_product_attention(q, k, v)
    params = settings_for("sta", {"tile": (2, 4, 4), "window": (2, 2, 2), "threshold": -14.4}, "tileskip")
    ctx, method = AttentionContext(layout=layout, num_steps=10), STA()
    window_plan = method.plan(q, k, ctx, params)[0]
    out0, info0 = run_method(q, k, v, ctx, method, params, tileskip=True)  # computes the window, marks tiles
    ctx.step = 1
    out1, info1 = run_method(q, k, v, ctx, method, params, tileskip=True)
    computed, window = info1["plan"].token_mask(), window_plan.token_mask()
    assert not (computed & ~window).any()  # never outside the window
    near = expected_mask(layout, (2, 4, 4), (1, 1, 1), slide=False)  # the query's tile and the tiles touching it
    assert not (near & ~computed).any()  # tiles holding the planted attention stay
    assert float(info1["density"]) < float(info0["density"]) - 0.05  # tiles two away got marked and skipped
    assert rel_l2(out1, dense) < 1e-3


@pytest.mark.parametrize("value, match", [
    ((1, 2), r"window=\[1, 2\]: must be three integers >= 0"),
    ((1, -1, 0), r"window=\[1, -1, 0\]"),
    ("big", "window='big'"),
    ((1.5, 1, 1), r"window=\[1.5, 1, 1\]"),
])
def test_bad_windows_are_named(value, match):
    with pytest.raises(ValueError, match=match):
        settings_for("sta", {"window": value})
    with pytest.raises(ValueError, match=r"tile=\[4, 0, 4\]: must be three positive integers"):
        settings_for("sta", {"tile": [4, 0, 4]})


def test_hydra_lists_and_cli_errors(tmp_path, monkeypatch, capsys):
    from vdit_sparse.cli import main
    from vdit_sparse.generate import GenerateRequest, check_run, resolve

    req = GenerateRequest(prompt="a red square", attention="sta", overrides=("attention.window=[1,2,2]", "attention.tile=[2,4,4]"))
    settings = check_run(resolve(req), req).settings
    assert settings.window == (1, 2, 2) and settings.tile == (2, 4, 4)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red circle", "--steps", "1", "--attention", "sta", "attention.window=[1,2]"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "window=[1, 2]: must be three integers >= 0" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_through_accelerate_on_the_tiny_pipeline(tiny_pipe):
    from vdit_sparse import accelerate

    dense = run_tiny(tiny_pipe, steps=2)
    handle = accelerate(tiny_pipe, attention="sta", tile=(1, 2, 2), window=(0, 1, 0), warmup_steps=1)
    try:
        sparse = run_tiny(tiny_pipe, steps=2)
        rows = handle.stats()
    finally:
        handle.remove()
    layout = VideoLayout(frames=3, height=4, width=4)  # 9 frames at 64 px
    want = window_density(layout, (1, 2, 2), (0, 1, 0))
    sparse_rows = [r for r in rows if r["method"] == "sta"]
    assert {r["step"] for r in sparse_rows} == {1} and all(r["method"] == "dense" for r in rows if r["step"] == 0)
    assert all(r["density"] == pytest.approx(want) for r in sparse_rows) and want == pytest.approx(1 / 3 * 1 / 2)
    assert 0 < abs(sparse - dense).max() < 0.5
    assert (run_tiny(tiny_pipe, steps=2) == dense).all()  # removed: dense again, bit for bit


def test_per_layer_windows_from_a_tuned_table(tiny_pipe):
    from vdit_sparse import accelerate

    table = {"layers": {0: {"window": [0, 0, 0]}, 1: {"window": [1, 1, 1]}}}  # as a tuned YAML holds them
    handle = accelerate(tiny_pipe, attention="sta", tuned=table, tile=(1, 2, 2), window=(0, 1, 0), warmup_steps=0)
    try:
        run_tiny(tiny_pipe, steps=1)
        rows = handle.stats()
    finally:
        handle.remove()
    layout = VideoLayout(frames=3, height=4, width=4)
    want = {0: (0, 0, 0), 1: (1, 1, 1)}
    for r in rows:
        window = want.get(r["layer"], (0, 1, 0))  # layers the table does not name keep the run's window
        assert r["density"] == pytest.approx(window_density(layout, (1, 2, 2), window))


def test_tune_chooses_a_window_per_layer(tmp_path, tiny_pipe):
    import json

    from vdit_sparse.config import load_tuned_table
    from vdit_sparse.tune import command as tune

    (tmp_path / "cal.txt").write_text("a red square moving right\n")
    out = tmp_path / "sta.yaml"
    argv = ["--attention", "sta", "--target-error", "0.5", "--values=[0,0,0],[1,0,0],[1,1,1]", "--out", str(out),
            "--no-validate", "--steps", "1", "--frames", "9", "--height", "64", "--width", "64",
            "--prompts", str(tmp_path / "cal.txt"), "attention.tile=[1,2,2]", "attention.warmup_steps=0"]
    assert tune.main(argv, pipe=tiny_pipe) == 0
    table = load_tuned_table(str(out))  # YAML lists, read back as the windows they were
    assert sorted(table) == list(range(len(tiny_pipe.transformer.blocks)))
    assert all(s in ({"window": [0, 0, 0]}, {"window": [1, 0, 0]}, {"window": [1, 1, 1]}, {"attention": "dense"})
               for s in table.values())
    report = json.loads((tmp_path / "sta.report.json").read_text())
    layout = VideoLayout(frames=3, height=4, width=4)
    for layer, curve in report["curves"].items():  # each window calibrated at its exact density
        by_window = {tuple(c["setting"]["window"]): c["density"] for c in curve if "window" in c["setting"]}
        assert by_window == pytest.approx({w: window_density(layout, (1, 2, 2), w) for w in by_window})
    assert report["metadata"]["predicted"]["mean_error"] <= 0.5


def test_with_a_step_cache_skipped_layers_make_no_sta_calls(tiny_pipe):
    from vdit_sparse import accelerate

    dense = run_tiny(tiny_pipe, steps=3)
    handle = accelerate(tiny_pipe, attention="sta", cache="fbcache", tile=(1, 2, 2), window=(0, 0, 1), warmup_steps=0,
                        **{"fbcache.threshold": 10.0})  # every block after the first reuses its residual
    try:
        run_tiny(tiny_pipe, steps=3)
        rows, computed = handle.stats(), handle.computed()
    finally:
        handle.remove()
    layers = len(tiny_pipe.transformer.blocks)
    assert sum(len(c["layers"]) for c in computed) == len(rows) < 2 * 3 * layers  # some layers were skipped
    want = window_density(VideoLayout(frames=3, height=4, width=4), (1, 2, 2), (0, 0, 1))
    assert rows and all(r["method"] == "sta" and r["density"] == pytest.approx(want) for r in rows)
    assert (run_tiny(tiny_pipe, steps=3) == dense).all()
