import pytest
import torch

from vdit_sparse import VideoLayout
from vdit_sparse.kernels.reference import dense_reference, reference_attention
from vdit_sparse.plan import BlockPlan, attach_text, from_block_mask, full_plan, uniform_offsets


def random_mask(B, H, nq, nk, p=0.4):
    return torch.rand(B, H, nq, nk) < p


def test_density_counts_pairs_exactly_with_a_short_last_block():
    n, block = 37, 8  # last block holds 5 tokens
    mask = random_mask(2, 3, 5, 5)
    plan = from_block_mask(mask, (block, block), n)
    plan.validate()
    sizes = torch.tensor([8, 8, 8, 8, 5.0])
    expected = (mask.float() * sizes[:, None] * sizes[None, :]).sum((2, 3)) / n**2
    assert torch.allclose(plan.density(), expected)
    assert torch.allclose(plan.token_mask().float().mean((2, 3)), expected)


def test_token_mask_matches_block_mask_layout():
    mask = random_mask(1, 2, 4, 4)
    plan = from_block_mask(mask, (4, 4), 16)
    expected = mask.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(plan.token_mask(), expected)


def test_permuted_plan_masks_follow_the_permutation():
    n = 12
    mask = torch.eye(3, dtype=torch.bool)[None, None]  # diagonal blocks of 4
    plan = from_block_mask(mask, (4, 4), n)
    perm = torch.randperm(n).to(torch.int32)[None]
    plan.q_perm = plan.k_perm = perm
    plan.validate()
    tm = plan.token_mask()[0, 0]
    # model tokens perm[i], perm[j] attend iff plan positions i, j share a block
    for i in range(n):
        for j in range(n):
            assert tm[perm[0, i], perm[0, j]] == (i // 4 == j // 4)


def test_drop_removes_exactly_the_skipped_entries():
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    plan = from_block_mask(mask, (2, 2), 6)
    skip = torch.zeros(1, 3, 3, dtype=torch.bool)
    skip[0, 0, 1] = skip[0, 2, 0] = True
    dropped = plan.drop(skip)
    dropped.validate()
    expected = mask.clone()
    expected[0, 0, 0, 1] = expected[0, 0, 2, 0] = False
    assert torch.equal(dropped.token_mask(), expected.repeat_interleave(2, 2).repeat_interleave(2, 3))


@pytest.mark.parametrize("position", ["before", "after"])
def test_attach_text_makes_text_rows_and_columns_dense(position):
    lay = VideoLayout(2, 3, 3, text_tokens=5, text_position=position)
    video_mask = torch.eye(3, dtype=torch.bool).expand(1, 2, 3, 3)  # diagonal blocks of 6 video tokens
    plan = attach_text(from_block_mask(video_mask.contiguous(), (6, 6), 18), lay, text_block=4)
    plan.validate(lay.num_tokens)
    tm = plan.token_mask()[0, 0]
    text = torch.zeros(lay.num_tokens, dtype=torch.bool)
    text[lay.text_start:lay.text_start + 5] = True
    assert tm[text].all() and tm[:, text].all()
    video = ~text
    vv = tm[video][:, video]
    assert torch.equal(vv, torch.eye(3, dtype=torch.bool).repeat_interleave(6, 0).repeat_interleave(6, 1))


def test_attach_text_carries_permutations_over_video_tokens_only():
    lay = VideoLayout(2, 2, 2, text_tokens=3, text_position="before")
    plan = from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), (4, 4), 8)
    perm = torch.randperm(8).to(torch.int32)[None]
    plan.q_perm = plan.k_perm = perm
    full = attach_text(plan, lay)
    full.validate(11)
    assert full.q_perm[0, :3].tolist() == [0, 1, 2]
    assert torch.equal(full.q_perm[0, 3:], perm[0] + 3)


def test_reference_of_the_full_plan_is_dense_attention():
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    out = reference_attention(q, k, v, full_plan(1, 2, 30, block=8))
    assert torch.allclose(out, dense_reference(q, k, v), atol=1e-6)


def test_a_query_block_with_no_keys_gives_zeros():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = False
    q, k, v = (torch.randn(1, 1, 8, 4) for _ in range(3))
    out = reference_attention(q, k, v, from_block_mask(mask, (4, 4), 8))
    assert torch.isfinite(out).all() and (out[0, 0, 4:] == 0).all()


def test_validate_names_broken_fields():
    plan = from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), (4, 4), 8)
    bad = BlockPlan(plan.q_offsets, plan.k_offsets, plan.kv_count, plan.kv_index + 5, 1, 1)
    with pytest.raises(ValueError, match="kv_index"):
        bad.validate()
    with pytest.raises(ValueError, match="block_mask shape"):
        from_block_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), (4, 4), 8)


def test_uniform_offsets_cover_every_token_once():
    off = uniform_offsets(37, 8, 2)
    assert off.shape == (2, 6) and off[0].tolist() == [0, 8, 16, 24, 32, 37]
