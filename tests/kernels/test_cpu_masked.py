"""The masked-rows CPU path equals the reference on outputs and tile statistics."""

import pytest
import torch

from vdit_sparse.kernels import cpu_masked
from vdit_sparse.kernels.reference import reference_attention, reference_tile_stats
from vdit_sparse.plan import BlockPlan, from_block_mask


def random_plan(G, N, Sq, Sk, gen, perm=True):
    def offsets(S):
        cuts = torch.randint(0, N + 1, (G, S - 1), generator=gen).sort(1).values
        return torch.cat([torch.zeros(G, 1, dtype=torch.long), cuts, torch.full((G, 1), N)], 1).to(torch.int32)

    L = Sk
    kv_count = torch.randint(0, Sk + 1, (G, Sq), generator=gen).to(torch.int32)
    kv_index = torch.stack([torch.stack([torch.randperm(Sk, generator=gen) for _ in range(Sq)]) for _ in range(G)]).to(torch.int32)
    perms = (torch.stack([torch.randperm(N, generator=gen) for _ in range(G)]).to(torch.int32) for _ in range(2)) if perm else (None, None)
    q_perm, k_perm = perms
    return BlockPlan(offsets(Sq), offsets(Sk), kv_count, kv_index[..., :L].contiguous(), 1, G, q_perm, k_perm, num_tokens=N)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("perm", [False, True])
def test_outputs_and_stats_equal_the_reference(gen, reverse, perm, monkeypatch):
    G, N, D = 3, 70, 16
    plan = random_plan(G, N, 5, 6, gen, perm)
    plan.validate()
    q, k, v = (torch.randn(1, G, N, D, generator=gen) for _ in range(3))
    skip = torch.rand(G, 5, 6, generator=gen) < 0.3
    monkeypatch.setattr(cpu_masked, "MAX_CHUNK_ELEMENTS", G * N * 16)  # several row chunks
    out, stats = cpu_masked.masked_rows_attention(q, k, v, plan, 0.25, skip=skip, tile_stats=True, reverse=reverse)
    ref = reference_attention(q, k, v, plan.drop(skip), 0.25)
    ref_stats = reference_tile_stats(q, k, plan, 0.25, skip=skip, reverse=reverse)
    assert torch.allclose(out, ref, atol=1e-5)
    finite = torch.isfinite(ref_stats)
    assert torch.equal(finite, torch.isfinite(stats))
    assert torch.allclose(stats[finite], ref_stats[finite], atol=1e-5)
    plain = cpu_masked.masked_rows_attention(q, k, v, plan, 0.25, skip=skip)  # the fused path, no statistics
    assert torch.allclose(plain, ref, atol=1e-5)


def test_a_query_block_without_keys_gives_zeros():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = False
    q, k, v = (torch.randn(1, 1, 20, 8) for _ in range(3))
    out = cpu_masked.masked_rows_attention(q, k, v, from_block_mask(mask, (16, 16), 20), 0.3)
    assert torch.isfinite(out).all() and (out[0, 0, :16] == 0).all()
