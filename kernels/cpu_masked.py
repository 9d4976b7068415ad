"""Block-sparse attention on the CPU by masked row chunks: dense BLAS over a few query rows at a time.

At the token counts a CPU handles (a few thousand), tiles padded around small segments (svg2's
clusters hold a handful of tokens) waste far more work than computing a chunk of rows against every
key and masking what the plan leaves out. Memory stays O(chunk · N), never N × N. The outputs and
the tile-skip statistics are those of the plan exactly (same definition as kernels/reference.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vdit_sparse.plan import BlockPlan, plan_order, segment_ids

# Scores of one chunk hold at most about this many floats (64 MB).
MAX_CHUNK_ELEMENTS = 1 << 24


def masked_rows_attention(q, k, v, plan: BlockPlan, scale: float, *, skip=None, tile_stats=False, reverse=False, out=None):
    """(B, H, N, Dv) attention over ``plan`` (and (out, stats (G, Sq, L)) with ``tile_stats``)."""
    B, H, N, D = q.shape
    G, Dv = plan.groups, v.shape[3]
    Sq, L = plan.kv_index.shape[1], plan.kv_index.shape[2]
    Sk = plan.k_offsets.shape[1] - 1
    qg = plan_order(q.reshape(G, N, D).float(), plan.q_perm)  # (G, N, D) float32
    kg = plan_order(k.reshape(G, N, D).float(), plan.k_perm)
    vg = plan_order(v.reshape(G, N, Dv).float(), plan.k_perm)
    q_seg, k_seg = segment_ids(plan.q_offsets, N), segment_ids(plan.k_offsets, N)  # (G, N)
    valid = plan.valid_entries()  # (G, Sq, L)
    if skip is not None:
        valid = valid & ~skip
    entries = torch.where(valid, plan.kv_index.long(), Sk)  # invalid entries point at a spare column
    selected = torch.zeros(G, Sq, Sk + 1, dtype=torch.bool, device=q.device)
    selected.scatter_(2, entries, True)
    selected = selected[..., :Sk]  # (G, Sq, Sk): which key segments each query segment attends to
    result = torch.empty(G, N, Dv, dtype=torch.float32, device=q.device)  # plan order
    stats = torch.full((G, Sq, L), float("-inf"), device=q.device) if tile_stats else None
    rows = max(1, MAX_CHUNK_ELEMENTS // max(G * N, 1))
    if stats is None:
        # torch's fused CPU attention: 4-D inputs and an additive float mask are what its flash kernel
        # takes; 3-D inputs or a bool mask fall back to the math path, 3-6x slower at 1,792 tokens
        # (torch 2.13). The mask is gathered straight from a per-segment bias, never built and filled.
        seg_bias = torch.zeros(G, Sq, Sk, device=q.device).masked_fill_(~selected, float("-inf"))
        seg_empty = ~selected.any(-1)  # (G, Sq): query segments with no key at all give zero rows
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        seg_rows = q_seg[:, r0:r1]  # (G, R)
        if stats is None:
            bias = torch.gather(seg_bias, 1, seg_rows[..., None].expand(-1, -1, Sk))  # (G, R, Sk)
            bias = torch.gather(bias, 2, k_seg[:, None, :].expand(-1, r1 - r0, -1))  # (G, R, N)
            chunk = F.scaled_dot_product_attention(qg[None, :, r0:r1], kg[None], vg[None], attn_mask=bias[None], scale=scale)[0]
            result[:, r0:r1] = chunk.masked_fill_(torch.gather(seg_empty, 1, seg_rows)[..., None], 0.0)
            continue
        allowed = torch.gather(selected, 1, seg_rows[..., None].expand(-1, -1, Sk))  # (G, R, Sk)
        allowed = torch.gather(allowed, 2, k_seg[:, None, :].expand(-1, r1 - r0, -1))  # (G, R, N)
        scores = torch.bmm(qg[:, r0:r1], kg.transpose(1, 2)) * scale  # (G, R, N)
        _chunk_stats(scores, seg_rows, k_seg, entries, valid, Sk, reverse, stats)
        scores.masked_fill_(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row with no keys gives zeros
        result[:, r0:r1] = torch.bmm(weights, vg)
    if plan.q_perm is not None:  # back to model order
        back = torch.empty_like(result)
        back.scatter_(1, plan.q_perm.long()[..., None].expand(-1, -1, Dv), result)
        result = back
    if out is None:
        out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    out.copy_(result.view(B, H, N, Dv))
    return (out, stats) if tile_stats else out


def _chunk_stats(scores, seg_rows, k_seg, entries, valid, Sk, reverse, stats) -> None:
    """Fold one chunk's rows into the (G, Sq, L) statistics: max over rows of (segment max − running max)."""
    G, R, N = scores.shape
    L = entries.shape[2]
    seg_max = torch.full((G, R, Sk + 1), float("-inf"), device=scores.device)
    seg_max.scatter_reduce_(2, k_seg[:, None, :].expand(-1, R, -1), scores, reduce="amax")  # (G, R, Sk + 1)
    row_entries = torch.gather(entries, 1, seg_rows[..., None].expand(-1, -1, L))  # (G, R, L)
    row_valid = torch.gather(valid, 1, seg_rows[..., None].expand(-1, -1, L))
    tile_max = torch.where(row_valid, torch.gather(seg_max, 2, row_entries), float("-inf"))  # (G, R, L)
    scan = tile_max.flip(2) if reverse else tile_max
    rel = torch.where(scan == float("-inf"), float("-inf"), scan - torch.cummax(scan, dim=2).values)
    rel = rel.flip(2) if reverse else rel
    stats.scatter_reduce_(1, seg_rows[..., None].expand(-1, -1, L), rel, reduce="amax")
