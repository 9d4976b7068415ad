"""The vectorised torch path: equal to the reference, cost in proportion to density, memory below N²."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vdit_sparse.kernels import cpu_path
from vdit_sparse.kernels import block_sparse_attention
from vdit_sparse.kernels.reference import reference_attention, reference_tile_stats
from vdit_sparse.plan import from_block_mask


@pytest.mark.parametrize("tiles", [(5, 7), (16, 64), (64, 16)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("kind", ["ragged_n", "segments"])
def test_equals_reference_at_any_tile_size(kit, gen, tiles, kind):
    N = 90
    plan = kit.make_plan(kind, 2, 2, N, gen)
    q, k, v = kit.make_qkv(2, 2, N, 16, torch.float32, gen)
    out = kit.poisoned(q)
    skip = torch.rand(plan.kv_index.shape, generator=gen) < 0.3
    res, stats = block_sparse_attention(
        q, k, v, plan, backend="torch", out=out, skip=skip, tile_stats=True, reverse=True,
        config={"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]},
    )
    assert kit.rel_l2(res, reference_attention(q, k, v, plan.drop(skip))) < 1e-5
    ref_stats = reference_tile_stats(q, k, plan, skip=skip, reverse=True)
    assert torch.equal(stats.isinf(), ref_stats.isinf())
    torch.testing.assert_close(stats[ref_stats.isfinite()], ref_stats[ref_stats.isfinite()], atol=1e-4, rtol=0)


def _flops(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_cost_follows_density(kit, gen):
    """Matmul work is exactly the listed blocks' (QK^T and PV: 2·2·rows·keys·D each), not N²."""
    B, H, N, D, blk = 1, 2, 512, 32, 64
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    nb = N // blk
    full = torch.ones(B, H, nb, nb, dtype=torch.bool)
    quarter = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    cols = torch.rand(B, H, nb, nb, generator=gen).argsort(-1)[..., : nb // 4]  # 2 key blocks per query block
    quarter.scatter_(3, cols, True)
    cfg = {"BLOCK_M": blk, "BLOCK_N": blk}
    dense = _flops(lambda: block_sparse_attention(q, k, v, full, (blk, blk), backend="torch", config=cfg))
    sparse = _flops(lambda: block_sparse_attention(q, k, v, quarter, (blk, blk), backend="torch", config=cfg))
    assert dense == 4 * B * H * N * N * D
    assert sparse == dense // 4


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_stays_far_below_n_squared(kit, gen, monkeypatch):
    B, H, N, D, blk = 1, 1, 2048, 16, 64
    monkeypatch.setattr(cpu_path, "MAX_CHUNK_ELEMENTS", 1 << 14)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    mask = torch.rand(B, H, N // blk, N // blk, generator=gen) < 0.1
    plan = from_block_mask(mask, (blk, blk), N)
    with _LargestTensor() as mode:
        out = block_sparse_attention(q, k, v, plan, backend="torch", config={"BLOCK_M": blk, "BLOCK_N": blk})
    assert mode.largest <= 4 * N * D  # O(N·D): inputs, output and one chunk of tiles; N² would be 64× more
    rows = torch.arange(0, 256)  # check a slice against the dense reference (which is N² itself)
    first_rows = mask.clone()
    first_rows[:, :, 4:] = False  # same keys for the first 4 query blocks, nothing for the others
    sub = from_block_mask(first_rows, (blk, blk), N)
    ref = reference_attention(q, k, v, sub)[:, :, rows]
    assert kit.rel_l2(out[:, :, rows], ref) < 1e-5


def test_chunking_does_not_change_the_result(kit, gen, monkeypatch):
    N = 120
    plan = kit.make_plan("segments", 1, 2, N, gen)
    q, k, v = kit.make_qkv(1, 2, N, 16, torch.float32, gen)
    cfg = {"BLOCK_M": 8, "BLOCK_N": 8}
    whole = block_sparse_attention(q, k, v, plan, backend="torch", config=cfg)
    monkeypatch.setattr(cpu_path, "MAX_CHUNK_ELEMENTS", 8 * 16)  # one query tile per chunk
    chunked = block_sparse_attention(q, k, v, plan, backend="torch", config=cfg)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_cpu_dispatch_picks_the_cheaper_path(kit, gen, monkeypatch):
    """Without the compiled loop: gathered key lists for block plans, masked dense rows for segments of a
    few tokens (small svg2 clusters)."""
    from vdit_sparse.kernels import cpu_compiled, cpu_gathered, cpu_masked
    from vdit_sparse.plan import BlockPlan

    used = []

    def spy(module, name, label):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: used.append(label) or real(*a, **kw))

    monkeypatch.setattr(cpu_compiled, "extension", lambda: None)
    spy(cpu_gathered, "gathered_attention", "gathered")
    spy(cpu_masked, "masked_rows_attention", "masked")
    N = 256
    q, k, v = kit.make_qkv(1, 2, N, 16, torch.float32, gen)
    blocks = from_block_mask(torch.rand(1, 2, 4, 4, generator=gen) < 0.3, (64, 64), N)
    off = torch.arange(0, N + 1, 4, dtype=torch.int32).expand(2, -1).contiguous()  # 64 clusters of 4 tokens
    count, index = kit.random_lists(off, off, 0.3, gen)
    clusters = BlockPlan(off, off, count, index, 1, 2, kit.random_perm(2, N, gen), kit.random_perm(2, N, gen), num_tokens=N)
    for plan, expected in ((blocks, "gathered"), (clusters, "masked")):
        out, stats = block_sparse_attention(q, k, v, plan, tile_stats=True)
        assert used[-1] == expected
        assert kit.rel_l2(out, reference_attention(q, k, v, plan)) < 1e-5
        ref_stats = reference_tile_stats(q, k, plan)
        assert torch.equal(stats.isinf(), ref_stats.isinf())
