"""The gathered CPU path (the default on CPU): exact against the reference on every plan shape the
methods build, statistics included, and work in proportion to the kept pairs."""

import pytest
import torch

from vdit_sparse.kernels import block_sparse_attention, cpu_compiled, cpu_gathered
from vdit_sparse.kernels.reference import reference_attention, reference_tile_stats
from vdit_sparse.layout import VideoLayout
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods.svg import SVG
from vdit_sparse.methods.svg2 import SVG2
from vdit_sparse.plan import attach_text, from_block_mask, full_plan

from test_block_sparse_attention import method_settings, planted_clusters, planted_heads
from test_cpu_path import _flops

KINDS = ["blocks", "ragged_n", "perm", "segments"]


def gathered(q, k, v, plan, **kw):
    return cpu_gathered.gathered_attention(q, k, v, plan, q.shape[3] ** -0.5, **kw)


@pytest.fixture(params=["compiled", "pytorch"])
def path(request):
    """Both ways of running the tiles: the C++ loop (skipped where it cannot build) and the PyTorch chunks."""
    if request.param == "compiled" and cpu_compiled.extension() is None:
        pytest.skip("no C++ compiler: the compiled loop cannot build here")
    return request.param == "compiled"


def check(kit, gen, q, k, v, plan, *, skip=None, reverse=False, stats_tol=1e-4, compiled=None):
    """The gathered path (into a NaN buffer) against the reference: output and tile statistics."""
    out = kit.poisoned(torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype))
    got, stats = gathered(q, k, v, plan, out=out, skip=skip, tile_stats=True, reverse=reverse, compiled=compiled)
    assert got is out
    ref = reference_attention(q.float(), k.float(), v.float(), plan if skip is None else plan.drop(skip))
    assert kit.rel_l2(got, ref) < kit.TOL[q.dtype]
    ref_stats = reference_tile_stats(q, k, plan, skip=skip, reverse=reverse)
    assert torch.equal(stats.isinf(), ref_stats.isinf())
    finite = ref_stats.isfinite()
    torch.testing.assert_close(stats[finite], ref_stats[finite], atol=stats_tol, rtol=0)
    no_stats = gathered(q, k, v, plan, skip=skip, reverse=reverse, compiled=compiled)
    assert torch.equal(no_stats, got)  # statistics change nothing in the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_matches_reference_with_skip_and_stats(kit, gen, dtype, kind, reverse, path):
    N = 150
    plan = kit.make_plan(kind, 1, 3, N, gen)
    q, k, v = kit.make_qkv(1, 3, N, 16, dtype, gen)
    skip = torch.rand(plan.kv_index.shape, generator=gen) < 0.3
    check(kit, gen, q, k, v, plan, skip=skip, reverse=reverse, stats_tol=1e-4 if dtype == torch.float32 else 1e-3, compiled=path)


def test_compiled_loop_crosses_pieces_and_threads(kit, gen, monkeypatch):
    """Segments longer than a piece, pieces ending inside a segment, tiles split over threads."""
    if cpu_compiled.extension() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setattr(cpu_compiled, "PIECE", 24)
    plan = kit.make_plan("segments", 2, 2, 300, gen, density=0.7)
    q, k, v = kit.make_qkv(2, 2, 300, 8, torch.float32, gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check(kit, gen, q, k, v, plan, skip=torch.rand(plan.kv_index.shape, generator=gen) < 0.2, reverse=True, compiled=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_loop_reads_runs_of_keys_in_place(kit, gen, monkeypatch, dtype):
    """Key lists that are runs of adjacent rows (read in place, not copied), pieces that mix a run with a
    far block (copied), and pieces ending inside a run: exact, statistics included, forward and reverse."""
    if cpu_compiled.extension() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setattr(cpu_compiled, "PIECE", 40)
    N, block = 190, 16
    nb = -(-N // block)
    i = torch.arange(nb)
    band = (i[:, None] - i[None, :]).abs() <= 2  # adjacent key blocks: one run of rows per list
    band[:, -1] = True  # and a far block: a piece that holds both is copied
    q, k, v = kit.make_qkv(1, 2, N, 16, dtype, gen)
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    for plan in (full_plan(1, 2, N, block), from_block_mask(band.expand(1, 2, nb, nb), (block, block), N)):
        for reverse in (False, True):
            check(kit, gen, q, k, v, plan, reverse=reverse, stats_tol=tol, compiled=True)


def test_without_a_compiler_one_line_then_the_pytorch_path(kit, gen, monkeypatch, capfd):
    monkeypatch.setattr(cpu_compiled, "_STATE", {})
    monkeypatch.setenv("CXX", "no-such-compiler-vdit")
    plan = kit.make_plan("perm", 1, 2, 120, gen)
    q, k, v = kit.make_qkv(1, 2, 120, 16, torch.float32, gen)
    out = block_sparse_attention(q, k, v, plan)
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["vdit_sparse: CPU block-sparse extension not used: no C++ compiler ('no-such-compiler-vdit' not on PATH); "
                   "running the slower pure-PyTorch path"]
    assert kit.rel_l2(out, reference_attention(q, k, v, plan)) < 1e-5
    block_sparse_attention(q, k, v, plan)
    assert capfd.readouterr().err == ""  # once per process, not per call


def test_chunks_with_padding_are_exact(kit, gen, monkeypatch):
    """Tiny score budgets and generous padding: chunks mix tiles of unequal key and row counts."""
    monkeypatch.setattr(cpu_gathered, "SCORE_ELEMENTS", 1 << 11)
    monkeypatch.setattr(cpu_gathered, "MAX_PADDING", 0.9)
    plan = kit.make_plan("segments", 2, 2, 200, gen, density=0.6)
    q, k, v = kit.make_qkv(2, 2, 200, 8, torch.float32, gen)
    check(kit, gen, q, k, v, plan, reverse=True, compiled=False)


def test_chunking_bounds_scores_and_padding():
    widths = [0, 0, 10, 10, 11, 40, 40, 40, 1000]
    rows = [5, 5, 4, 4, 4, 4, 2, 4, 64]
    cpu_gathered.SCORE_ELEMENTS, saved = 200, cpu_gathered.SCORE_ELEMENTS
    try:
        runs = list(cpu_gathered.chunks(widths, rows, [0] * len(widths)))
    finally:
        cpu_gathered.SCORE_ELEMENTS = saved
    assert runs[0][0] == 2 and runs[-1] == (8, 9)  # keyless tiles get no chunk; an oversized tile runs alone
    assert [i for a, b in runs for i in range(a, b)] == list(range(2, 9))  # every other tile exactly once
    for a, b in runs[:-1]:
        padded = (b - a) * max(rows[a:b]) * max(widths[a:b])
        assert padded <= 200
        assert sum(w * r for w, r in zip(widths[a:b], rows[a:b])) >= (1 - cpu_gathered.MAX_PADDING) * padded


def test_text_rows_and_columns_and_head_subsets(kit, gen):
    """A block plan over the video with dense text attached (padded prompt), on a Ulysses-like head subset."""
    layout = VideoLayout(frames=3, height=4, width=8, text_tokens=20, text_position="before")
    V, N = layout.video_tokens, layout.num_tokens
    mask = torch.rand(2, 2, V // 16, V // 16, generator=gen) < 0.4
    plan = attach_text(from_block_mask(mask, (16, 16), V), layout, text_block=16, text_lengths=[20, 13])
    q, k, v = kit.make_qkv(2, 2, N, 16, torch.float32, gen)
    check(kit, gen, q, k, v, plan)
    # one rank's share of heads: the plan and the inputs cover heads 1.. only
    sub = from_block_mask(mask[:, 1:], (16, 16), V)
    sub = attach_text(sub, layout, text_block=16, text_lengths=[20, 13])
    check(kit, gen, q[:, 1:].contiguous(), k[:, 1:].contiguous(), v[:, 1:].contiguous(), sub)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_a_real_svg_plan(kit, gen, dtype):
    """Bands, temporal heads permuted to spatial-major order, the sink, dense text after the video."""
    layout = VideoLayout(frames=4, height=4, width=8, text_tokens=24, text_position="after")
    q, k = planted_heads(layout, ["spatial", "temporal", "temporal", "spatial"], 32, gen)
    plan, info = SVG().plan(q, k, AttentionContext(layout=layout), method_settings(SVG, density=0.4, block_size=16))
    assert set(info["head_pattern"][0]) == {"spatial", "temporal"}
    v = torch.randn(q.shape, generator=gen)
    skip = torch.rand(plan.kv_index.shape, generator=gen) < 0.2
    check(kit, gen, q.to(dtype), k.to(dtype), v.to(dtype), plan, skip=skip, stats_tol=1e-4 if dtype == torch.float32 else 1e-2)


def test_on_a_real_svg2_plan(kit, gen):
    """Clusters as unequal segments, some possibly empty, dense text before the video."""
    layout = VideoLayout(frames=2, height=8, width=8, text_tokens=20, text_position="before")
    q, k = planted_clusters(layout, 2, 6, 32, gen)
    settings = method_settings(SVG2, num_q_clusters=8, num_k_clusters=12, kmeans_iters_first=10)
    plan, _ = SVG2().plan(q, k, AttentionContext(layout=layout), settings)
    assert plan.q_offsets.diff(dim=1)[:, 1:].unique().numel() > 2
    v = torch.randn(q.shape, generator=gen)
    check(kit, gen, q, k, v, plan, skip=torch.rand(plan.kv_index.shape, generator=gen) < 0.2, reverse=True)


def test_strided_inputs(kit, gen):
    """diffusers' (B, N, H, D).transpose(1, 2) layout needs no copy by the caller."""
    plan = kit.make_plan("perm", 1, 2, 120, gen)
    q, k, v = (torch.randn(1, 120, 2, 16, generator=gen).transpose(1, 2) for _ in range(3))
    assert kit.rel_l2(gathered(q, k, v, plan), reference_attention(q, k, v, plan)) < 1e-5


def test_work_follows_density(kit, gen):
    """Matmul FLOPs are exactly the kept pairs' (QK^T and PV: 2·2·pairs·D), not N²."""
    B, H, N, D, blk = 1, 2, 512, 32, 64
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    nb = N // blk
    quarter = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    quarter.scatter_(3, torch.rand(B, H, nb, nb, generator=gen).argsort(-1)[..., : nb // 4], True)
    plan = from_block_mask(quarter, (blk, blk), N)
    sparse = _flops(lambda: gathered(q, k, v, plan, compiled=False))  # the C++ loop's sgemm calls are not counted
    assert sparse == 4 * B * H * N * N * D // 4


def test_full_plan_without_stats_is_dense_sdpa(kit, gen):
    """Density 1.0 with nothing skipped runs torch's fused attention itself: no gather, no padding."""
    q, k, v = kit.make_qkv(1, 2, 128, 16, torch.float32, gen)
    out = block_sparse_attention(q, k, v, full_plan(1, 2, 128, 32))
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
