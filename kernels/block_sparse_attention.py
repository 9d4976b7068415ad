"""Block-sparse flash attention over a BlockPlan.

PLACEHOLDER until the fused Triton kernel lands: runs the plan through the reference.
"""

from __future__ import annotations

import torch

from vdit_sparse.plan import BlockPlan, from_block_mask

from .reference import reference_attention


def block_sparse_attention(q, k, v, plan, block_size=None, *, scale=None):
    """(B, H, N, D) attention of q, k, v computed only on the pairs ``plan`` lists.

    ``plan`` is a BlockPlan, or a bool block mask (B, H, ceil(N/BM), ceil(N/BN)) with ``block_size=(BM, BN)``.
    """
    if isinstance(plan, torch.Tensor):
        if block_size is None:
            raise ValueError("block_size: required with a block mask, e.g. block_size=(64, 64)")
        plan = from_block_mask(plan, block_size, q.shape[2])
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan: expected a BlockPlan or a bool block mask, got {type(plan).__name__}")
    return reference_attention(q, k, v, plan, scale)
