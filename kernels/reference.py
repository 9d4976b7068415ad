"""Plain PyTorch reference for block-sparse attention: materialises the (N, N) mask.

For tests at small N only. Rows whose query attends to no key give zeros.
"""

from __future__ import annotations

import math

import torch

from vdit_sparse.plan import BlockPlan, plan_order, segment_ids


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
    qg = plan_order(q.reshape(G, n, d).float().cpu(), None if plan.q_perm is None else plan.q_perm.cpu())  # (G, N, D)
    kg = plan_order(k.reshape(G, n, d).float().cpu(), None if plan.k_perm is None else plan.k_perm.cpu())
    scores = torch.einsum("gnd,gmd->gnm", qg, kg) * scale  # (G, N, N) plan order
    k_seg = segment_ids(plan.k_offsets.cpu(), n)  # (G, N)
    q_seg = segment_ids(plan.q_offsets.cpu(), n)
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
