"""svg: head classification (spatial / temporal / dense), its band masks, density and accuracy against dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vdit_sparse import VideoLayout, sparse_attention
from vdit_sparse.methods import settings_for
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods.svg import (
    SPATIAL,
    TEMPORAL,
    SVG,
    band_mask,
    build_plan,
    sample_rows,
    video_masks,
)

KINDS = ("spatial", "temporal")


def planted_qk(layout: VideoLayout, kinds, dim=64, logit=12.0, noise=1.0, seed=0):
    """q, k (B, H, N, dim) whose heads attend spatially (keys of the query's own frame) or temporally
    (keys at the query's spatial position in other frames), as ``kinds[b][h]`` says; "random" gives
    a head with no structure. Text tokens carry noise only."""
    gen = torch.Generator().manual_seed(seed)
    B, H = len(kinds), len(kinds[0])
    V, s = layout.video_tokens, layout.video_start
    frame = layout.frame_of_video_token()  # (V,)
    position = torch.arange(V) % layout.frame_tokens
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen)).Q  # orthonormal codes: groups do not overlap
    amp = (logit * dim**0.5) ** 0.5  # matched q·k / sqrt(dim) = logit
    q = torch.randn(B, H, layout.num_tokens, dim, generator=gen) * noise
    k = torch.randn(B, H, layout.num_tokens, dim, generator=gen) * noise
    for b in range(B):
        for h in range(H):
            if kinds[b][h] == "random":
                continue
            group = frame if kinds[b][h] == "spatial" else position
            code = basis[group % dim] * amp  # (V, dim)
            q[b, h, s : s + V] += code
            k[b, h, s : s + V] += code
    return q, k


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def random_kinds(B, H, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[KINDS[i] for i in row] for row in torch.randint(0, 2, (B, H), generator=gen).tolist()]


LAYOUT = VideoLayout(frames=16, height=8, width=8)  # N = 1024


@pytest.mark.parametrize(
    "layout",
    [
        LAYOUT,
        VideoLayout(frames=15, height=7, width=7),  # N = 735, not a multiple of the block
        VideoLayout(frames=16, height=8, width=8, text_tokens=40, text_position="before"),
        VideoLayout(frames=16, height=8, width=8, text_tokens=40, text_position="after"),
    ],
    ids=["plain", "ragged", "text-before", "text-after"],
)
def test_planted_heads_are_classified_and_output_stays_close_to_dense(layout):
    kinds = random_kinds(2, 6, seed=layout.num_tokens)
    q, k = planted_qk(layout, kinds, seed=1)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    out, info = sparse_attention(q, k, v, layout=layout, method="svg", density=0.25, block_size=32)
    got = [p for row in info["head_pattern"] for p in row]
    want = [p for row in kinds for p in row]
    accuracy = sum(g == w for g, w in zip(got, want)) / len(want)
    assert accuracy >= 0.95, (got, want)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 0.05
    assert abs(info["density"] - 0.25) <= 0.02
    assert info["stats"]["spatial"] == pytest.approx(want.count("spatial") / len(want))
    assert info["stats"]["temporal"] == pytest.approx(want.count("temporal") / len(want))
    assert info["stats"]["dense"] == 0.0


def test_heads_of_each_batch_element_are_classified_independently():
    kinds = [["spatial", "temporal", "spatial"], ["temporal", "spatial", "temporal"]]
    q, k = planted_qk(LAYOUT, kinds, seed=5)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    out, info = sparse_attention(q, k, v, layout=LAYOUT, method="svg", density=0.25, block_size=32)
    assert info["head_pattern"] == kinds
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 0.05


SHAPES = [
    (VideoLayout(frames=16, height=8, width=8), 32),
    (VideoLayout(frames=15, height=7, width=7), 32),  # N = 735: last block short
    (VideoLayout(frames=21, height=6, width=10), 64),  # N = 1260, block 64: last block short
    (VideoLayout(frames=9, height=6, width=10, text_tokens=37, text_position="before"), 32),
    (VideoLayout(frames=13, height=9, width=11, text_tokens=50, text_position="after"), 64),
    (VideoLayout(frames=21, height=30, width=52), 64),  # Wan2.1 480p latents, N = 32,760 (masks only: cheap)
]


@pytest.mark.parametrize("layout,block", SHAPES, ids=[f"N{l.num_tokens}-b{b}-{l.text_position}" for l, b in SHAPES])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
def test_realised_density_meets_the_request(layout, block, sink):
    classes = torch.tensor([[SPATIAL, TEMPORAL]])
    N, V = layout.num_tokens, layout.video_tokens
    sizes = torch.tensor([min(block, V - s) for s in range(0, V, block)])
    floor = float(N**2 - V**2 + (sizes**2).sum()) / N**2
    for density in (0.15, 0.2, 0.25, 0.35, 0.5, 0.7, 0.9):
        masks = video_masks(layout, block, density, sink)
        plan = build_plan(classes, masks, layout, block)
        plan.validate(layout.num_tokens)
        realised = plan.density()  # (1, 2): exact, text rows and columns included
        # within one block of the request (far inside the issue's ±0.02), unless the request lies below
        # the floor: dense text plus every query's own block
        want = max(density, floor)
        assert (realised - want).abs().max() <= block**2 / N**2, (density, realised)


def test_temporal_pattern_is_the_spatial_band_in_spatial_major_order():
    layout = VideoLayout(frames=6, height=5, width=7)  # V = 210, block 16: last block short
    masks = video_masks(layout, 16, 0.3, sink=False)
    assert torch.equal(masks[SPATIAL], masks[TEMPORAL])  # without the sink both are the same band
    plan = build_plan(torch.tensor([[SPATIAL, TEMPORAL]]), masks, layout, 16)
    order = layout.spatial_major_order()  # plan position -> frame-major token
    assert torch.equal(plan.q_perm[0].long(), torch.arange(210)) and torch.equal(plan.q_perm[1].long(), order)
    assert torch.equal(plan.k_perm, plan.q_perm)
    mask = plan.token_mask()[0]  # (2, V, V) model order
    assert torch.equal(mask[1][order][:, order], mask[0])
    # a band: every row keeps the blocks within w of the diagonal, some rows also ring w + 1, nothing further
    dist = (torch.arange(14)[:, None] - torch.arange(14)[None, :]).abs()  # 14 blocks of 16
    w = int(dist[~masks[SPATIAL]].min()) - 1
    assert masks[SPATIAL][dist <= w].all() and not masks[SPATIAL][dist > w + 1].any() and w >= 1


def test_first_frame_sink_is_seen_by_every_spatial_query_and_counted():
    layout = VideoLayout(frames=16, height=6, width=6)  # frame = 36 tokens, block 16: sink = 3 blocks
    with_sink = video_masks(layout, 16, 0.25, sink=True)
    plan = build_plan(torch.tensor([[SPATIAL]]), with_sink, layout, 16)
    mask = plan.token_mask()[0, 0]
    assert mask[:, : layout.frame_tokens].all()
    # the band shrinks to pay for the sink: same density either way
    without = build_plan(torch.tensor([[SPATIAL]]), video_masks(layout, 16, 0.25, sink=False), layout, 16)
    assert abs(float(plan.density()) - float(without.density())) <= 16**2 / layout.num_tokens**2
    assert mask.sum(1).float().mean() < without.token_mask()[0, 0].sum(1).float().mean() + 1


def test_profiling_rows_cover_every_frame_and_move_with_the_step():
    layout = VideoLayout(frames=21, height=6, width=10)
    frame = layout.frame_of_video_token()
    for layer, step in [(0, 0), (3, 7), (29, 49)]:
        rows = sample_rows(layout, 64, layer, step)
        assert rows.unique().numel() == 64
        assert set(frame[rows].tolist()) == set(range(21))
        assert torch.equal(rows, sample_rows(layout, 64, layer, step))  # deterministic per (layer, step)
    assert not torch.equal(sample_rows(layout, 64, 0, 0), sample_rows(layout, 64, 0, 1))
    # fewer rows than frames: still evenly spread over the whole video
    rows = sample_rows(layout, 8, 2, 3)
    spacing = -(-layout.video_tokens // 8)
    assert rows[0] < spacing and rows.diff().max() <= spacing and rows[-1] >= layout.video_tokens - spacing


def test_profiling_rows_through_sparse_attention_with_text():
    layout = VideoLayout(frames=16, height=6, width=6, text_tokens=30, text_position="before")
    q, k = planted_qk(layout, [["spatial", "temporal"]], dim=32, seed=7)
    _, info = sparse_attention(q, k, k, layout=layout, method="svg", density=0.3, block_size=32)
    rows = info["sampled_rows"] - layout.video_start  # model order -> video-local
    assert rows.min() >= 0 and rows.max() < layout.video_tokens
    assert set(layout.frame_of_video_token()[rows].tolist()) == set(range(16))


@pytest.mark.parametrize("with_v", [False, True], ids=["lost-mass", "output-error"])
def test_profile_error_is_the_plans_own_error_on_the_sampled_rows(with_v):
    layout = VideoLayout(frames=16, height=6, width=6, text_tokens=24, text_position="after")
    kinds = [["spatial", "temporal", "spatial", "temporal"]]
    q, k = planted_qk(layout, kinds, dim=32, logit=5.0, seed=8)  # weak structure: errors well above zero
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    ctx = AttentionContext(layout=layout, layer=4, step=11)
    plan, info = SVG().plan(q, k, ctx, settings_for("svg", {"density": 0.25, "block_size": 32}), v=v if with_v else None)
    assert info["head_pattern"] == kinds
    rows = info["sampled_rows"]
    mask = plan.token_mask()[:, :, rows]  # (B, H, R, N): the plan, evaluated at the sampled rows
    probs = (torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows], k) / 32**0.5).softmax(-1)
    err = torch.stack([info["pattern_error"]["spatial"], info["pattern_error"]["temporal"]], -1)
    chosen = err.min(-1).values  # (B, H)
    if with_v:
        exact = probs @ v
        ours = torch.softmax((torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows], k) / 32**0.5).masked_fill(~mask, -torch.inf), -1) @ v
        want = (ours - exact).flatten(2).norm(dim=-1) / exact.flatten(2).norm(dim=-1)
    else:
        want = 1 - (probs * mask).sum(-1).mean(-1)
    assert torch.allclose(chosen, want, atol=1e-4), (chosen, want)
    assert (chosen > 0.01).all()  # the check is not vacuous


def test_density_one_is_exactly_dense():
    q, k = planted_qk(LAYOUT, [["spatial", "temporal"]], dim=32, seed=10)
    v = torch.randn(q.shape)
    out, info = sparse_attention(q, k, v, layout=LAYOUT, method="svg", density=1.0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert info["density"] == 1.0
    assert info["head_pattern"] == [["dense", "dense"]]
    assert info["stats"] == {"spatial": 0.0, "temporal": 0.0, "dense": 1.0}


def test_dense_error_sends_structureless_heads_dense():
    kinds = [["spatial", "random", "temporal"], ["random", "temporal", "spatial"]]
    q, k = planted_qk(LAYOUT, kinds, seed=11)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    out, info = sparse_attention(q, k, v, layout=LAYOUT, method="svg", density=0.25, block_size=32, dense_error=0.5)
    assert info["head_pattern"] == [[p if p != "random" else "dense" for p in row] for row in kinds]
    per_head = info["density_per_head"]
    assert per_head[0, 1] == 1.0 and per_head[1, 0] == 1.0
    assert info["stats"]["dense"] == pytest.approx(2 / 6)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 0.05
    # off (the default): every head gets a sparse pattern and the budget holds
    _, info = sparse_attention(q, k, v, layout=LAYOUT, method="svg", density=0.25, block_size=32)
    assert info["stats"]["dense"] == 0.0 and abs(info["density"] - 0.25) <= 0.02


def test_masks_are_built_once_per_shape_and_knobs():
    q, k = planted_qk(LAYOUT, [["spatial"]], dim=32, seed=13)
    ctx = AttentionContext(layout=LAYOUT)
    p = settings_for("svg", {"density": 0.25, "block_size": 32})
    SVG().plan(q, k, ctx, p)
    first = ctx.state["svg_masks"][1]
    ctx.step = 1
    SVG().plan(q, k, ctx, p)
    assert ctx.state["svg_masks"][1] is first
    SVG().plan(q, k, ctx, p.updated(density=0.4))
    assert ctx.state["svg_masks"][1] is not first


def test_bad_inputs_name_the_input():
    q, k = planted_qk(LAYOUT, [["spatial"]], dim=32, seed=14)
    ctx = AttentionContext(layout=LAYOUT)
    with pytest.raises(ValueError, match="v: expected shape"):
        SVG().plan(q, k, ctx, settings_for("svg"), v=torch.zeros(1, 1, 5, 32))
    with pytest.raises(ValueError, match="q sequence length 1024"):
        SVG().plan(q, k, AttentionContext(layout=VideoLayout(frames=3, height=4, width=4)), settings_for("svg"))


def test_a_partly_taken_ring_is_spread_over_the_whole_sequence():
    nb, block = 64, 16
    mask = band_mask(nb * block, block, 0, target_pairs=nb * block**2 * 2)  # diagonal + half of ring 1
    extra = mask.sum(1) - 1  # (nb,) blocks beyond the diagonal per row
    assert int(extra.sum()) == nb and torch.equal(mask, mask.T)
    quarters = extra.view(4, -1).sum(1)  # each quarter of the sequence gets its share
    assert (quarters == nb // 4).all(), quarters


def test_band_mask_keeps_at_least_the_diagonal():
    mask = band_mask(1000, 64, 0, target_pairs=0.0)  # a request below the diagonal: the diagonal is the floor
    assert torch.equal(mask, torch.eye(16, dtype=torch.bool))


def test_segment_identity_changes_exactly_for_reclassified_heads():
    """The tile-skip cache drops a head's marks when its identity changes: svg must report the class per head."""
    layout = VideoLayout(frames=8, height=4, width=4)
    settings = settings_for("svg", {"density": 0.3, "block_size": 16})
    ids = []
    for kinds in ([["spatial", "temporal", "spatial"]], [["temporal", "temporal", "spatial"]]):
        q, k = planted_qk(layout, kinds, dim=32, seed=3)
        _, info = SVG().plan(q, k, AttentionContext(layout=layout), settings)
        assert info["head_pattern"] == kinds
        ids.append(info["segment_identity"])
    assert (ids[0] != ids[1]).tolist() == [True, False, False]  # only head 0 changed class
