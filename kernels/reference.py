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
