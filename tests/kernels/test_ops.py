"""The custom op: its real output is the reference's, and its fake, what torch.compile traces with,
has the real output's shape (v's head dim may differ from q's)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vdit_sparse.kernels import ops
from vdit_sparse.kernels.reference import reference_attention

N = 90


def op_inputs(kit, gen, dv):
    """A permuted plan of unequal segments and the op's arguments: q, k with head dim 32, v with ``dv``."""
    plan = kit.make_plan("segments", 1, 2, N, gen)
    q, k = kit.make_qkv(1, 2, N, 32, torch.float32, gen)[:2]
    v = torch.randn(1, 2, N, dv, generator=gen)
    return plan, (q, k, v, plan.q_offsets, plan.k_offsets, plan.kv_count, plan.kv_index, plan.q_perm, plan.k_perm, 0.2)


@pytest.mark.parametrize("dv", [16, 32, 64])
def test_fake_output_has_the_real_shape(kit, gen, dv):
    plan, args = op_inputs(kit, gen, dv)
    real = ops.block_sparse_attention_op(*args)
    assert real.shape == (1, 2, N, dv)
    assert kit.rel_l2(real, reference_attention(*args[:3], plan, 0.2)) < 1e-5
    with FakeTensorMode() as mode:
        fake = ops.block_sparse_attention_op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


def test_opcheck_passes(kit, gen):
    """torch's own checks of a custom op: schema, autograd registration, fake against real, AOT dispatch."""
    _, args = op_inputs(kit, gen, 16)
    torch.library.opcheck(ops.block_sparse_attention_op, args)  # raises on the first failed check


def test_run_plan_equals_the_op(kit, gen):
    plan, args = op_inputs(kit, gen, 32)
    assert torch.equal(ops.run_plan(*args[:3], plan, 0.2), ops.block_sparse_attention_op(*args))
