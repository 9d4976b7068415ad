"""svg: head classification (spatial / temporal / dense), its band masks, density and accuracy against dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vdit_sparse import Params, VideoLayout, sparse_attention
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods.svg import (
    SPATIAL,
    TEMPORAL,
    SVG,
    band_mask,
    build_plan,
    pattern_errors,
    row_patterns,
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
        VideoLayout(frames=12, height=8, width=8, text_tokens=40, text_position="before"),
        VideoLayout(frames=12, height=8, width=8, text_tokens=40, text_position="after"),
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
