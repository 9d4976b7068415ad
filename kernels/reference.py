"""Plain PyTorch reference for block-sparse attention: materialises the (N, N) mask.

For tests at small N only. Rows whose query attends to no key give zeros.
"""

from __future__ import annotations

import math

import torch

from vdit_sparse.plan import BlockPlan


def reference_attention(q, k, v, plan: BlockPlan, scale: float | None = None) -> torch.Tensor:
    """(B, H, N, D) attention of q, k, v (B, H, N, D) restricted to ``plan``, computed in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = plan.token_mask()  # (B, H, N, N)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows give NaN: make them zero
    return torch.einsum("bhnm,bhmd->bhnd", weights, v.float()).to(q.dtype)


def dense_reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """(B, H, N, D) full attention in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    return torch.einsum("bhnm,bhmd->bhnd", torch.softmax(scores, -1), v.float()).to(q.dtype)


def reference_tile_stats(q, k, plan: BlockPlan, scale: float | None = None, skip=None, reverse: bool = False):
    """(G, Sq, L) float32 tile-skip statistics, computed densely in plan order (small N only).

    Entry (g, s, l): over the rows of query segment s, the max of (the row's max scaled logit over
    key segment kv_index[g, s, l]) minus (the row's running max after scanning that entry), in natural
    log units; the scan runs over the listed entries in order, or backwards when ``reverse``.
    -inf for entries not computed: past kv_count, marked in ``skip``, or with an empty segment.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    G, Sq, L = plan.kv_index.shape
    n, d = q.shape[2], q.shape[3]
    Sk = plan.k_offsets.shape[1] - 1
    qg = _plan_order(q.reshape(G, n, d).float(), plan.q_perm)  # (G, N, D)
    kg = _plan_order(k.reshape(G, n, d).float(), plan.k_perm)
    scores = torch.einsum("gnd,gmd->gnm", qg, kg) * scale  # (G, N, N) plan order
    k_seg = _segment_of(plan.k_offsets, n)  # (G, N)
    q_seg = _segment_of(plan.q_offsets, n)
    seg_max = torch.full((G, n, Sk), float("-inf"))
    seg_max.scatter_reduce_(2, k_seg[:, None, :].expand(-1, n, -1), scores, reduce="amax")  # (G, N, Sk)
    valid = torch.arange(L) < plan.kv_count[..., None].cpu()  # (G, Sq, L)
    if skip is not None:
        valid &= ~skip.cpu()
    entries = plan.kv_index.long().cpu().clamp(0, max(Sk - 1, 0))
    row_entries = torch.gather(entries, 1, q_seg[..., None].expand(-1, -1, L))  # (G, N, L)
    row_valid = torch.gather(valid, 1, q_seg[..., None].expand(-1, -1, L))
    tile_max = torch.where(row_valid, torch.gather(seg_max, 2, row_entries), float("-inf"))  # (G, N, L)
    scan = tile_max.flip(2) if reverse else tile_max
    running = torch.cummax(scan, dim=2).values
    rel = torch.where(scan == float("-inf"), float("-inf"), scan - running)
    rel = rel.flip(2) if reverse else rel
    stats = torch.full((G, Sq, L), float("-inf"))
    stats.scatter_reduce_(1, q_seg[..., None].expand(-1, -1, L), rel, reduce="amax")
    return stats.to(q.device)


def _plan_order(x: torch.Tensor, perm) -> torch.Tensor:
    """(G, N, D) rows of x in plan order: plan position i holds model token perm[g, i]."""
    if perm is None:
        return x.cpu()
    return torch.gather(x.cpu(), 1, perm.long().cpu()[..., None].expand(-1, -1, x.shape[2]))


def _segment_of(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """(G, N) int64: the segment each plan position falls in."""
    off = offsets.long().cpu()
    pos = torch.arange(n).expand(off.shape[0], n).contiguous()
    return torch.searchsorted(off[:, 1:].contiguous(), pos, right=True)
