"""Plain PyTorch reference for block-sparse attention: materialises the (N, N) mask.

A test oracle only: no runtime code imports it. For small N. Rows whose query attends to no key give zeros.
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
    """(G, Sq, L) float32 tile-skip statistics, from their definition, one entry at a time (small N only).

    Entry (g, s, l): over the rows of query segment s, the max of (the row's max scaled logit over
    key segment kv_index[g, s, l]) minus (the row's running max after scanning that entry), in natural
    log units; the scan runs over the listed entries in order, or backwards when ``reverse``.
    -inf for entries not computed: past kv_count, marked in ``skip``, or with an empty segment.
    Loops over segments and entries in model order, sharing no code with the paths it checks.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    plan = plan.to("cpu")
    skip = None if skip is None else skip.cpu()
    G, Sq, L = plan.kv_index.shape
    n, d = q.shape[2], q.shape[3]
    scores = torch.einsum("gnd,gmd->gnm", q.reshape(G, n, d).float().cpu(), k.reshape(G, n, d).float().cpu()) * scale
    stats = torch.full((G, Sq, L), float("-inf"))
    for g in range(G):
        for s in range(Sq):
            row_scores = scores[g, _segment_tokens(plan.q_perm, plan.q_offsets, g, s)]  # (rows, N) query segment s
            count = int(plan.kv_count[g, s])
            running = torch.full(row_scores.shape[:1], float("-inf"))  # each row's max logit so far
            for l in reversed(range(count)) if reverse else range(count):
                cols = _segment_tokens(plan.k_perm, plan.k_offsets, g, int(plan.kv_index[g, s, l]))
                if row_scores.numel() == 0 or cols.numel() == 0 or (skip is not None and bool(skip[g, s, l])):
                    continue
                seg_max = row_scores[:, cols].amax(1)  # (rows,)
                running = torch.maximum(running, seg_max)
                stats[g, s, l] = (seg_max - running).max()
    return stats.to(q.device)


def _segment_tokens(perm, offsets, g: int, seg: int) -> torch.Tensor:
    """(size,) int64 model tokens of segment ``seg`` of batch·head ``g``."""
    pos = torch.arange(int(offsets[g, seg]), int(offsets[g, seg + 1]))
    return pos if perm is None else perm[g, pos].long()
