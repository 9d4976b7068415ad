"""``vdit_sparse::block_sparse_attention`` as a PyTorch custom op, so torch.compile keeps the kernel
opaque and compiles everything around it. The plan's tensors are the op's inputs: a new plan with
the same shapes changes values, not the graph."""

from __future__ import annotations

import torch

from vdit_sparse.plan import BlockPlan

from .dispatch import block_sparse_attention


@torch.library.custom_op("vdit_sparse::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    kv_count: torch.Tensor, kv_index: torch.Tensor, q_perm: torch.Tensor | None, k_perm: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """(B, H, N, Dv) contiguous: block_sparse_attention of q, k, v over the plan given by its tensors."""
    B, H, N = q.shape[:3]
    plan = BlockPlan(q_offsets, k_offsets, kv_count, kv_index, B, H, q_perm, k_perm, num_tokens=N)
    return block_sparse_attention(q, k, v, plan, scale=scale)


@block_sparse_attention_op.register_fake
def _(q, k, v, q_offsets, k_offsets, kv_count, kv_index, q_perm, k_perm, scale):
    return q.new_empty(q.shape[:3] + v.shape[3:])  # (B, H, N, Dv)


def run_plan(q, k, v, plan: BlockPlan, scale: float) -> torch.Tensor:
    """The op applied to a BlockPlan."""
    return block_sparse_attention_op(
        q, k, v, plan.q_offsets, plan.k_offsets, plan.kv_count, plan.kv_index, plan.q_perm, plan.k_perm, scale
    )
