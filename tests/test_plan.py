import pytest
import torch

from vdit_sparse import VideoLayout
from vdit_sparse.kernels.reference import dense_reference, reference_attention
from vdit_sparse.plan import (
    BlockPlan,
    attach_text,
    from_block_mask,
    from_clusters,
    from_head_patterns,
    full_plan,
    uniform_offsets,
)


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
    bad = BlockPlan(plan.q_offsets, plan.k_offsets, plan.kv_count, plan.kv_index + 5, 1, 1, num_tokens=8)
    with pytest.raises(ValueError, match="kv_index"):
        bad.validate()
    with pytest.raises(ValueError, match="BlockPlan.num_tokens: 8, but the plan is checked against 9 tokens"):
        plan.validate(9)
    with pytest.raises(ValueError, match="plan: covers 8 tokens, but the layout has 12 video tokens"):
        attach_text(plan, VideoLayout(3, 2, 2, text_tokens=4, text_position="after"))
    with pytest.raises(ValueError, match="block_mask shape"):
        from_block_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), (4, 4), 8)


def test_uniform_offsets_cover_every_token_once():
    off = uniform_offsets(37, 8, 2)
    assert off.shape == (2, 6) and off[0].tolist() == [0, 8, 16, 24, 32, 37]


def cluster_sizes(labels, count):
    """(G, count) tokens per cluster."""
    return torch.nn.functional.one_hot(labels, count).sum(1)


def cluster_plan(B=2, H=2, N=23, Cq=5, Ck=4):
    """A plan from random clusters (the last query cluster empty), and its (G, Cq, Ck) selected pairs and labels."""
    q_labels = torch.randint(0, Cq - 1, (B * H, N))
    k_labels = torch.randint(0, Ck, (B * H, N))
    selected = torch.rand(B * H, Cq, Ck) < 0.5
    plan = from_clusters(q_labels, k_labels, cluster_sizes(q_labels, Cq), cluster_sizes(k_labels, Ck), selected, B, H)
    return plan, selected, q_labels, k_labels


def test_to_dense_lists_segment_pairs_and_expands_to_the_token_mask():
    plan, selected, q_labels, k_labels = cluster_plan()
    plan.validate(23)
    dense = plan.to_dense()
    assert dense.shape == (2, 2, 5, 4) and dense.dtype == torch.bool
    assert torch.equal(dense, selected.view(2, 2, 5, 4))  # segment s is cluster s
    # token i sees token j exactly when (cluster of i, cluster of j) is a listed pair
    g = torch.arange(4)[:, None, None]
    expected = dense.view(4, 5, 4)[g, q_labels[:, :, None], k_labels[:, None, :]]  # (G, N, N)
    assert torch.equal(plan.token_mask(), expected.view(2, 2, 23, 23))
    mask = torch.rand(1, 3, 4, 3) < 0.5
    assert torch.equal(from_block_mask(mask, (8, 11), 30).to_dense(), mask)


def test_clusters_become_contiguous_segments_in_id_order():
    plan, selected, q_labels, _ = cluster_plan()
    in_plan_order = torch.gather(q_labels, 1, plan.q_perm.long())
    assert (in_plan_order.diff(dim=1) >= 0).all()
    assert torch.equal(plan.q_offsets.diff(dim=1).long(), cluster_sizes(q_labels, 5))
    assert (plan.q_offsets[:, -1] == plan.q_offsets[:, -2]).all()  # the empty cluster: an empty segment
    assert torch.equal(plan.kv_count, selected.sum(2).to(torch.int32))


def test_head_patterns_give_each_head_its_mask_in_its_order():
    N, block = 20, 8  # three blocks, the last one short
    masks = (torch.rand(3, 3, 3) < 0.5) | torch.eye(3, dtype=torch.bool)
    order = torch.randperm(N)  # pattern 1's plan position -> token
    choice = torch.tensor([[0, 1, 2], [1, 1, 0]])
    plan = from_head_patterns(masks, choice, block, N, [None, order, None])
    plan.validate(N)
    position = torch.empty(N, dtype=torch.long)
    position[order] = torch.arange(N)  # token -> pattern 1's plan position
    tm = plan.token_mask()
    for b in range(2):
        for h in range(3):
            p = int(choice[b, h])
            blocks = (position if p == 1 else torch.arange(N)) // block
            assert torch.equal(tm[b, h], masks[p][blocks[:, None], blocks[None, :]]), (b, h)
    assert plan.kv_index.shape[2] == int(masks.sum(2).max())
    unpermuted = from_head_patterns(masks, torch.tensor([[0, 2]]), block, N, [None, order, None])
    assert unpermuted.q_perm is None and unpermuted.k_perm is None  # no head takes the permuted pattern: no gather


def test_num_tokens_is_an_int_set_by_every_builder():
    lay = VideoLayout(2, 3, 3, text_tokens=5, text_position="before")
    video = from_block_mask(torch.rand(1, 2, 3, 3) < 0.5, (6, 6), 18)
    plans = {
        "from_block_mask": (video, 18),
        "full_plan": (full_plan(1, 2, 37, block=8), 37),
        "drop": (video.drop(torch.rand(video.kv_index.shape) < 0.5), 18),
        "attach_text": (attach_text(video, lay, text_block=4), 23),
        "from_clusters": (cluster_plan(N=23)[0], 23),
        "from_head_patterns": (from_head_patterns(torch.ones(2, 3, 3, dtype=torch.bool), torch.tensor([[0, 1]]), 6, 18), 18),
    }
    for name, (plan, n) in plans.items():
        assert type(plan.num_tokens) is int and plan.num_tokens == n, name
        plan.validate(n)
        # on the meta device no value can be read: density() must not need one
        assert plan.to("meta").density().shape == (plan.batch, plan.heads), name


def test_to_moves_every_tensor_and_keeps_the_rest():
    plan = cluster_plan()[0]
    moved = plan.to("meta")
    for name in ("q_offsets", "k_offsets", "kv_count", "kv_index", "q_perm", "k_perm"):
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(plan, name).device.type == "cpu", name  # the original stays where it was
    assert (moved.batch, moved.heads, moved.num_tokens) == (2, 2, 23)
    back = plan.to("cpu")
    assert all(torch.equal(getattr(back, n), getattr(plan, n)) for n in ("q_offsets", "kv_index", "q_perm", "k_perm"))
    assert from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), (4, 4), 8).to("meta").q_perm is None


def test_repr_is_one_readable_line():
    plan = from_block_mask(torch.eye(3, dtype=torch.bool).expand(1, 2, 3, 3).contiguous(), (4, 4), 12)
    plan.q_perm = torch.randperm(12).to(torch.int32).expand(2, 12).contiguous()
    assert repr(plan) == (
        "BlockPlan(batch=1, heads=2, num_tokens=12, q_segments=3, k_segments=3, permuted=q, "
        "mean_density=0.3333, device=cpu)"
    )
    assert "permuted=no" in repr(full_plan(1, 1, 8, block=4)) and "mean_density=1.0000" in repr(full_plan(1, 1, 8, block=4))
    assert "mean_density=?" in repr(plan.to("meta"))  # no value to read there, and no error either
