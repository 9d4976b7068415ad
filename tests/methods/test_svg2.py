"""svg2: k-means permutation, cluster-pair selection (top-p and fixed budget), warm starts, text."""

from __future__ import annotations

import math

import pytest
import torch

from vdit_sparse import VideoLayout, sparse_attention
from vdit_sparse.methods import settings_for
from vdit_sparse.kernels.kmeans import cluster_sizes
from vdit_sparse.kernels.reference import dense_reference
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods.svg2 import SVG2, cluster_counts, cluster_mass, floor_count, select_budget, select_top_p

LAYOUT = VideoLayout(frames=4, height=16, width=16)  # 1024 video tokens
SMALL = VideoLayout(frames=2, height=16, width=16)  # 512: for tests of selection, not of clustering
QUICK = dict(kmeans_iters_first=10, num_q_clusters=16, num_k_clusters=32)


def adjusted_rand_index(a, b):
    """Hubert-Arabie ARI of two labelings (N,): 1 for the same partition, about 0 for unrelated ones."""
    a, b = torch.unique(a, return_inverse=True)[1], torch.unique(b, return_inverse=True)[1]
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)
    pairs = lambda t: (t * (t - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), a.numel() * (a.numel() - 1) / 2
    expected = rows * cols / total
    return float((both - expected) / ((rows + cols) / 2 - expected))


def planted_qkv(layout, batch, heads, clusters, dim=32, logit=10.0, spread=0.5, seed=0):
    """q, k, v (B, H, N, dim) and labels (B, H, V): each video token's q and k lie around one of
    ``clusters`` random centres per (batch, head), so a query attends almost only to its own
    cluster's keys (matched logit ≈ ``logit``). Text tokens carry noise only."""
    gen = torch.Generator().manual_seed(seed)
    G, V, s = batch * heads, layout.video_tokens, layout.video_start
    centres = torch.randn(G, clusters, dim, generator=gen)
    centres = centres / centres.norm(dim=-1, keepdim=True) * (logit * math.sqrt(dim)) ** 0.5
    labels = torch.randint(0, clusters, (G, V), generator=gen)
    around = torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim))  # (G, V, dim)
    q = torch.randn(G, layout.num_tokens, dim, generator=gen) * spread
    k = torch.randn(G, layout.num_tokens, dim, generator=gen) * spread
    q[:, s : s + V] += around
    k[:, s : s + V] += around
    v = torch.randn(G, layout.num_tokens, dim, generator=gen)
    shape = (batch, heads, layout.num_tokens, dim)
    return q.view(shape), k.view(shape), v.view(shape), labels.view(batch, heads, V)


def random_qk(layout, batch=1, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.num_tokens, dim, generator=gen) for _ in range(2)]


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def plan_of(q, k, layout, state=None, **params):
    ctx = AttentionContext(layout=layout, state={} if state is None else state)
    return SVG2().plan(q, k, ctx, settings_for("svg2", params))


def test_planted_clusters_are_recovered_and_attention_stays_accurate():
    q, k, v, truth = planted_qkv(LAYOUT, batch=2, heads=2, clusters=8)
    out, info = sparse_attention(q, k, v, layout=LAYOUT, method="svg2", num_q_clusters=8, num_k_clusters=8)
    for b in range(2):
        for h in range(2):
            assert adjusted_rand_index(info["q_labels"][b, h], truth[b, h]) >= 0.9
            assert adjusted_rand_index(info["k_labels"][b, h], truth[b, h]) >= 0.9
    assert rel_l2(out, dense_reference(q, k, v)) <= 0.03
    assert info["density"] <= 0.2  # about one key cluster of eight per query cluster
    assert info["stats"] == {"kmeans_iters": 50, "q_clusters": 8, "k_clusters": 8}


def test_plan_segments_are_the_clusters_in_sorted_order():
    q, k = random_qk(SMALL, batch=2, heads=2)
    plan, info = plan_of(q, k, SMALL, num_q_clusters=12, num_k_clusters=20, kmeans_iters_first=10)
    plan.validate(SMALL.num_tokens)
    V = SMALL.video_tokens
    for side, perm, offsets, C in (("q", plan.q_perm, plan.q_offsets, 12), ("k", plan.k_perm, plan.k_offsets, 20)):
        labels = info[f"{side}_labels"].reshape(4, V)
        assert labels.dtype == torch.int32 and info[f"{side}_labels"].shape == (2, 2, V)
        in_plan_order = torch.gather(labels, 1, perm.long())
        assert (in_plan_order.diff(dim=1) >= 0).all()  # each cluster one contiguous run, by id
        assert torch.equal(offsets.diff(dim=1).long(), cluster_sizes(labels, C))  # segment s = cluster s
    # the realised density is counted exactly from the plan's pairs
    torch.testing.assert_close(plan.density(), plan.token_mask().float().mean((2, 3)))


def test_raising_top_p_never_lowers_density():
    q, k = random_qk(SMALL, heads=2, seed=1)
    densities, masks = [], []
    for top_p in (0.2, 0.4, 0.6, 0.8, 0.9, 0.99):
        plan, _ = plan_of(q, k, SMALL, top_p=top_p, **QUICK)
        densities.append(plan.density())
        masks.append(plan.token_mask())
    for lower, higher in zip(densities, densities[1:]):
        assert (higher >= lower).all()
    for lower, higher in zip(masks, masks[1:]):
        assert not (lower & ~higher).any()  # the kept pairs only grow
    assert (densities[-1] > densities[0] + 0.2).all()  # and top_p does move the density


def test_top_p_keeps_the_fewest_clusters_reaching_the_mass():
    mass = torch.tensor([[[0.5, 0.1, 0.3, 0.1]]])
    assert select_top_p(mass, 0.5, 1).tolist() == [[[True, False, False, False]]]
    assert select_top_p(mass, 0.75, 1).tolist() == [[[True, False, True, False]]]
    assert select_top_p(mass, 0.85, 1).sum() == 3
    assert select_top_p(mass, 0.5, 3).sum() == 3  # the floor wins over a smaller top-p set


def test_top_p_by_value_matches_a_selection_by_rank_with_ties():
    gen = torch.Generator().manual_seed(3)
    mass = torch.randn(4, 6, 40, generator=gen).mul(2).softmax(-1)
    mass[..., 20:24] = mass[..., 20:21]  # tied masses, some at the boundary of what is kept
    mass[0, :, 30:] = 0.0  # empty key clusters
    mass = mass / mass.sum(-1, keepdim=True)
    for top_p, min_keep in ((0.5, 1), (0.9, 3), (0.999, 1), (0.2, 35)):
        order = torch.sort(mass, dim=-1, descending=True, stable=True)  # ties: lowest id first
        before = order.values.cumsum(-1) - order.values
        keep = (before < top_p) | (torch.arange(40) < min_keep)
        expected = torch.zeros_like(keep).scatter_(-1, order.indices, keep)
        assert torch.equal(select_top_p(mass, top_p, min_keep), expected)


def test_cluster_mass_weights_key_clusters_by_size():
    q_cent = torch.zeros(1, 1, 4)
    k_cent = torch.zeros(1, 3, 4)  # equal scores: the mass splits as the key clusters' sizes
    mass = cluster_mass(q_cent, k_cent, torch.tensor([[1, 3, 0]]))
    torch.testing.assert_close(mass, torch.tensor([[[0.25, 0.75, 0.0]]]))
    k_cent[0, 0, 0] = 2.0 * math.log(3.0)  # a score higher by log 3 (after the 1/√4 scale) makes up for 3× fewer keys
    q_cent[0, 0, 0] = 1.0
    torch.testing.assert_close(cluster_mass(q_cent, k_cent, torch.tensor([[1, 3, 0]])), torch.tensor([[[0.5, 0.5, 0.0]]]))


def test_budget_keeps_floors_then_most_mass_per_pair():
    mass = torch.tensor([[[0.6, 0.3, 0.1]]])  # one query cluster of 10 tokens; key clusters of 10, 1, 1
    q_sizes, k_sizes = torch.tensor([[10]]), torch.tensor([[10, 1, 1]])
    pick = lambda budget, keep=1: select_budget(mass, q_sizes, k_sizes, torch.tensor([budget]), keep).tolist()  # noqa: E731
    assert pick(105.0) == [[[True, True, False]]]  # floor (100 pairs) + the densest pair (10) within half a pair
    assert pick(104.0) == [[[True, False, False]]]
    assert pick(0.0) == [[[True, False, False]]]  # the floor survives any budget
    assert pick(1000.0, keep=0) == [[[True, True, True]]]
    assert floor_count(30, 0.1) == 3 and floor_count(500, 0.0) == 1


@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
def test_fixed_budget_lands_near_target(target):
    q, k = random_qk(SMALL, heads=2, seed=2)
    plan, _ = plan_of(q, k, SMALL, density=target, **QUICK)
    assert (plan.density() - target).abs().max() <= 0.02
    top_p_plan, _ = plan_of(q, k, SMALL, **QUICK)  # top_p = 0.9 alone
    assert (top_p_plan.density() > 0.6).all()  # on random data top-p keeps most pairs: the budget mode is needed


def test_density_takes_precedence_over_top_p():
    q, k = random_qk(SMALL, seed=3)
    a, _ = plan_of(q, k, SMALL, density=0.3, top_p=0.2, **QUICK)
    b, _ = plan_of(q, k, SMALL, density=0.3, top_p=0.99, **QUICK)
    assert torch.equal(a.kv_count, b.kv_count) and torch.equal(a.kv_index, b.kv_index)


@pytest.mark.parametrize("position", ["before", "after"])
def test_text_is_dense_and_counted_in_the_budget(position):
    layout = VideoLayout(frames=4, height=8, width=8, text_tokens=40, text_position=position)
    q, k, v, _ = planted_qkv(layout, batch=1, heads=2, clusters=4, seed=4)
    plan, info = plan_of(q, k, layout, density=0.4, num_q_clusters=8, num_k_clusters=16)
    mask = plan.token_mask()
    text = torch.arange(layout.text_start, layout.text_start + layout.text_tokens)
    assert mask[:, :, text].all() and mask[:, :, :, text].all()  # text rows and columns fully computed
    assert (plan.density() - 0.4).abs().max() <= 0.02  # the video part got what text left of the budget
    assert info["q_labels"].shape == (1, 2, layout.video_tokens)
    out, _ = sparse_attention(q, k, v, layout=layout, method="svg2", num_q_clusters=8, num_k_clusters=16)
    dense = dense_reference(q, k, v)
    torch.testing.assert_close(out[:, :, text], dense[:, :, text], rtol=1e-4, atol=1e-5)


def test_everything_kept_equals_dense():
    q, k = random_qk(SMALL, seed=5)
    v = torch.randn_like(q)
    out, info = sparse_attention(q, k, v, layout=SMALL, method="svg2", top_p=1.0, min_k_ratio=1.0, **QUICK)
    assert info["density"] == pytest.approx(1.0)
    torch.testing.assert_close(out, dense_reference(q, k, v), rtol=1e-4, atol=1e-5)


def test_min_k_ratio_floor():
    q, k, _, _ = planted_qkv(LAYOUT, batch=1, heads=2, clusters=8, seed=6)
    # planted data: top-p alone keeps about one key cluster per query cluster
    lean, _ = plan_of(q, k, LAYOUT, num_q_clusters=8, num_k_clusters=16)
    floored, _ = plan_of(q, k, LAYOUT, min_k_ratio=0.5, num_q_clusters=8, num_k_clusters=16)
    nonempty_k = (floored.k_offsets.diff(dim=1) > 0).sum(1, keepdim=True)
    nonempty_q = floored.q_offsets.diff(dim=1) > 0  # an empty query cluster lists nothing
    assert (lean.kv_count < 8).all()
    assert (floored.kv_count >= torch.clamp(nonempty_k, max=8))[nonempty_q].all()  # ceil(0.5 · 16) = 8 key clusters


def test_warm_start_uses_stored_centroids_and_cold_starts_on_a_new_shape():
    q, k, _, truth = planted_qkv(LAYOUT, batch=1, heads=2, clusters=8, seed=7)
    state = {}
    _, first = plan_of(q, k, LAYOUT, state=state, num_q_clusters=8, num_k_clusters=8)
    assert first["stats"]["kmeans_iters"] == 50
    stored = state["svg2"]["q"].centroids
    assert stored.shape == (2, 8, 32)  # one set per (batch element, head)
    gen = torch.Generator().manual_seed(8)
    q2, k2 = q + 0.05 * torch.randn(q.shape, generator=gen), k + 0.05 * torch.randn(k.shape, generator=gen)
    _, second = plan_of(q2, k2, LAYOUT, state=state, num_q_clusters=8, num_k_clusters=8, kmeans_iters_step=2)
    assert second["stats"]["kmeans_iters"] == 2
    assert torch.equal(second["q_labels"], first["q_labels"])  # a small change keeps the partition
    assert not torch.equal(state["svg2"]["q"].centroids, stored)  # and the centroids follow the data
    assert torch.equal(second["segment_identity"], first["segment_identity"])  # cluster c is still segment c
    collapsed = q2.clone()
    collapsed[0, 1] = 0.0  # head 1: every query at one point, so all clusters but one empty out
    _, fourth = plan_of(collapsed, k2, LAYOUT, state=state, num_q_clusters=8, num_k_clusters=8)
    same = fourth["segment_identity"] == second["segment_identity"]
    assert same.tolist() == [True, False]  # head 1's emptied clusters were re-seeded: its segments changed meaning
    small = VideoLayout(frames=2, height=16, width=16)  # new resolution: stored centroids do not fit
    _, third = plan_of(q[:, :, :512], k[:, :, :512], small, state=state, num_q_clusters=8, num_k_clusters=8)
    assert third["stats"]["kmeans_iters"] == 50
    assert (third["segment_identity"] != fourth["segment_identity"]).all()
    assert adjusted_rand_index(third["q_labels"][0, 0], truth[0, 0, :512]) >= 0.9
    regrouped = plan_of(q[:, :, :512].reshape(2, 1, 512, 32), k[:, :, :512].reshape(2, 1, 512, 32), small,
                        state=state, num_q_clusters=8, num_k_clusters=8)[1]
    assert regrouped["stats"]["kmeans_iters"] == 50  # same B·H, other (batch, heads): centroids do not carry over


def test_branches_and_batch_elements_keep_their_own_centroids():
    q, k, _, _ = planted_qkv(LAYOUT, batch=2, heads=1, clusters=6, seed=9)
    q_other, k_other, _, _ = planted_qkv(LAYOUT, batch=2, heads=1, clusters=6, seed=10)
    cond, uncond = {}, {}
    plan_of(q, k, LAYOUT, state=cond, num_q_clusters=6, num_k_clusters=6)
    plan_of(q_other, k_other, LAYOUT, state=uncond, num_q_clusters=6, num_k_clusters=6)
    for state, qq in ((cond, q), (uncond, q_other)):
        centroids = state["svg2"]["q"].centroids  # (B·H, C, D)
        for g in range(2):
            own = torch.cdist(centroids[g], qq[g, 0]).min(1).values  # each centroid sits in its own data
            other = torch.cdist(centroids[g], qq[1 - g, 0]).min(1).values
            assert (own < other).all()


def test_cluster_counts_shrink_with_few_tokens():
    assert cluster_counts(30_000, 100, 500) == (100, 500)
    assert cluster_counts(1_000, 100, 500) == (100, 250)  # at most one cluster per 4 tokens
    assert cluster_counts(64, 100, 500) == (16, 16)
    assert cluster_counts(448, 16, 64) == (16, 64)  # the embedded model's 448 tokens take 64 key clusters
    assert cluster_counts(3, 100, 500) == (1, 1)
    layout = VideoLayout(frames=1, height=8, width=8)
    q, k = random_qk(layout, seed=11)
    _, info = sparse_attention(q, k, k, layout=layout, method="svg2")
    assert info["stats"]["q_clusters"] == 16 and info["stats"]["k_clusters"] == 16
    assert int(info["q_labels"].max()) < 16


def test_budget_spends_where_rows_stand_farthest_from_their_mass():
    # two query clusters of equal size; after each keeps its best key cluster, one more pair fits the budget
    mass = torch.tensor([[[0.5, 0.4, 0.1], [0.34, 0.33, 0.33]]])
    sizes = torch.tensor([[10, 10]]), torch.tensor([[10, 10, 10]])
    keep = select_budget(mass, *sizes, torch.tensor([300.0]), 1)
    # cluster 0 would gain more mass (0.4 > 0.33), but cluster 1 stands farther from its full mass:
    # squared shortfalls 0.1² + 0.33² (this choice) against 0.5² ... 0.1² + 0.66² (the other)
    assert keep.tolist() == [[[True, False, False], [True, True, False]]]


def test_sampled_mass_is_the_exact_mass_when_every_row_is_sampled():
    from vdit_sparse.methods.svg2 import sampled_mass

    gen = torch.Generator().manual_seed(12)
    G, V, D, Cq, Ck = 2, 48, 8, 4, 6
    q, k = torch.randn(G, V, D, generator=gen), torch.randn(G, V, D, generator=gen)
    q_labels = torch.randperm(V, generator=gen).remainder(Cq).repeat(G, 1).to(torch.int32)  # 12 tokens each
    k_labels = torch.randint(0, Ck, (G, V), generator=gen, dtype=torch.int32)
    probs = (q @ k.transpose(1, 2) / math.sqrt(D)).softmax(-1)  # (G, V, V)
    exact = torch.zeros(G, Cq, Ck)
    for g in range(G):
        for i in range(Cq):
            for j in range(Ck):
                exact[g, i, j] = probs[g][q_labels[g] == i][:, k_labels[g] == j].sum(1).mean()
    mass = sampled_mass(q, k, q_labels, k_labels, cluster_sizes(q_labels, Cq), Ck, rows=V)
    torch.testing.assert_close(mass, exact, rtol=1e-5, atol=1e-6)
    fewer = sampled_mass(q, k, q_labels, k_labels, cluster_sizes(q_labels, Cq), Ck, rows=8)  # 2 rows per cluster
    torch.testing.assert_close(fewer.sum(-1), torch.ones(G, Cq))  # still each row's whole attention


def test_sampled_rows_plan_stays_accurate_on_planted_clusters():
    q, k, v, _ = planted_qkv(LAYOUT, batch=1, heads=2, clusters=8, seed=13)
    out, info = sparse_attention(q, k, v, layout=LAYOUT, method="svg2", num_sampled_rows=32, num_q_clusters=8,
                                 num_k_clusters=8)
    assert rel_l2(out, dense_reference(q, k, v)) <= 0.03 and info["density"] <= 0.2
