"""k-means: Triton kernels against the PyTorch reference (interpreted on CPU by conftest.py), the
chunked CPU path, planted-partition recovery, warm starts and empty clusters."""

import pytest
import torch

from vdit_sparse.kernels import kmeans as km

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton backend runs
TF32 = DEVICE == "cuda"  # compiled tl.dot on fp32 uses TF32: looser distance tolerance there
DIST_TOL = dict(rtol=2e-3, atol=2e-2) if TF32 else dict(rtol=1e-4, atol=1e-4)


def planted(groups, n, centres, dim, spread, seed=0):
    """x (G, N, D) drawn around `centres` random centres per group, and the true labels (G, N)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(groups, centres, dim, generator=g)
    mu = mu / mu.norm(dim=-1, keepdim=True) * 4.0  # centres 4 apart on a sphere
    labels = torch.randint(0, centres, (groups, n), generator=g)
    x = torch.gather(mu, 1, labels[..., None].expand(-1, -1, dim)) + spread * torch.randn(groups, n, dim, generator=g)
    return x, labels


def same_partition(a, b):
    """True when labels a and b (N,) describe the same partition up to renaming the clusters."""
    pairs = torch.unique(torch.stack([a.long(), b.long()]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


@pytest.mark.parametrize("dim, clusters", [(24, 37), (64, 8)])
def test_assign_triton_matches_reference(dim, clusters):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, dim, generator=g)  # N not a multiple of the 64-row tile, D masked to a power of 2
    c = torch.randn(3, clusters, dim, generator=g)
    labels, dist = km.assign_triton(x.to(DEVICE), c.to(DEVICE))
    labels, dist = labels.cpu(), dist.cpu()
    ref_labels, ref_dist = km.assign_reference(x, c)
    assert labels.dtype == torch.int32 and labels.shape == (3, 200)
    assert (labels == ref_labels).float().mean() >= 0.98  # only float near-ties may differ
    torch.testing.assert_close(dist, ref_dist, **DIST_TOL)
    exact = (x - torch.gather(c, 1, labels.long()[..., None].expand(-1, -1, dim))).square().sum(-1)
    torch.testing.assert_close(dist, exact, **DIST_TOL)  # the distance reported is to the label given


def test_accumulate_triton_matches_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 250, 40, generator=g)
    labels = torch.randint(0, 9, (2, 250), generator=g, dtype=torch.int32)
    labels[:, labels[0] == 4] = 5  # cluster 4 empty: its sum and count stay zero
    sums, counts = (t.cpu() for t in km.accumulate_triton(x.to(DEVICE), labels.to(DEVICE), 9))
    ref_sums, ref_counts = km.accumulate_reference(x, labels, 9)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(counts, torch.stack([torch.bincount(l.long(), minlength=9) for l in labels]).float())


def test_kmeans_triton_and_torch_agree():
    x, _ = planted(2, 256, 6, 32, spread=1.0, seed=3)
    c_t, l_t, _ = km.kmeans(x.to(DEVICE), 6, 8, backend="triton")
    c_r, l_r, _ = km.kmeans(x.to(DEVICE), 6, 8, backend="torch")
    assert (l_t == l_r).float().mean() >= 0.99
    torch.testing.assert_close(c_t, c_r, rtol=1e-4, atol=1e-3)


def test_chunked_assignment_matches_whole(monkeypatch):
    x = torch.randn(2, 1000, 16, generator=torch.Generator().manual_seed(4))
    c = x[:, :50].clone()
    whole_labels, whole_dist = km.assign_reference(x, c, chunk_size=1000)
    widest = []
    bmm = torch.bmm

    def recording(*args, **kwargs):
        out = bmm(*args, **kwargs)
        widest.append(out.shape[1])
        return out

    monkeypatch.setattr(torch, "bmm", recording)
    labels, dist = km.assign_reference(x, c, chunk_size=96)
    assert max(widest) == 96  # never more than chunk × C distances in memory
    assert torch.equal(labels, whole_labels)
    torch.testing.assert_close(dist, whole_dist)


@pytest.mark.parametrize("backend, n", [("torch", 1500), ("triton", 192)])
def test_kmeans_recovers_planted_partition(backend, n):
    x, truth = planted(3, n, 8, 32, spread=0.5, seed=5)
    centroids, labels, _ = km.kmeans(x.to(DEVICE if backend == "triton" else "cpu"), 8, 20, backend=backend)
    labels = labels.cpu()
    for g in range(3):
        assert same_partition(labels[g], truth[g]), f"group {g}"
    assert torch.equal(km.cluster_sizes(labels, 8).sort(1).values, km.cluster_sizes(truth, 8).sort(1).values)


def test_warm_start_two_iterations_reach_cold_objective():
    # overlapping mixture, fewer clusters than centres: a real optimisation problem
    x, _ = planted(4, 1500, 24, 32, spread=1.5, seed=6)
    first = km.kmeans(x, 16, 50).centroids
    moved = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    cold_c, cold_l, _ = km.kmeans(moved, 16, 50)
    warm_c, warm_l, _ = km.kmeans(moved, 16, 2, init=first)
    cold, warm = km.objective(moved, cold_c, cold_l), km.objective(moved, warm_c, warm_l)
    seeded = km.objective(moved, *km.kmeans(moved, 16, 2)[:2])  # 2 iterations from cold seeds: the contrast
    assert (warm <= 1.01 * cold).all(), (warm / cold)
    assert (seeded > 1.01 * cold).any()  # so the warm start, not the iteration count, closes the gap


def test_empty_cluster_takes_farthest_point():
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 0.2]]])  # (1, 4, 2)
    centroids = torch.tensor([[[0.0, 0.0], [100.0, 100.0], [-100.0, 0.0]]])  # clusters 1 and 2 win no point
    labels, dist = km.assign_reference(x, centroids)
    sums, counts = km.accumulate_reference(x, labels, 3)
    new = km.new_centroids(x, sums, counts, dist)
    torch.testing.assert_close(new[0, 0], x[0].mean(0))
    torch.testing.assert_close(new[0, 1], x[0, 2])  # the first empty cluster takes the farthest point
    torch.testing.assert_close(new[0, 2], x[0, 3])  # the second empty cluster the next farthest
    _, labels, reseeded = km.kmeans(x, 3, 3, init=centroids)
    assert (km.cluster_sizes(labels, 3) > 0).all()
    assert int(reseeded) >= 2  # the two empty clusters at least (cluster 0 empties in turn when its points leave)


def test_no_empty_cluster_after_cold_start():
    x = torch.randn(2, 300, 16, generator=torch.Generator().manual_seed(8))
    _, labels, _ = km.kmeans(x, 40, 10)
    assert (km.cluster_sizes(labels, 40) > 0).all()


def test_kmeans_is_deterministic_and_groups_are_independent():
    x, _ = planted(2, 400, 5, 16, spread=0.8, seed=9)
    c1, l1, _ = km.kmeans(x, 5, 10)
    c2, l2, _ = km.kmeans(x.clone(), 5, 10)
    assert torch.equal(l1, l2) and torch.equal(c1, c2)
    warm = km.kmeans(x, 5, 3, init=c1)[1]
    warm_alone = km.kmeans(x[1:], 5, 3, init=c1[1:])[1]  # a warm start touches nothing across groups
    assert torch.equal(warm[1:], warm_alone)


def test_zero_iterations_only_assigns():
    x = torch.randn(1, 100, 8, generator=torch.Generator().manual_seed(10))
    init = x[:, :4].clone()
    centroids, labels, reseeded = km.kmeans(x, 4, 0, init=init)
    assert torch.equal(centroids, init) and reseeded.tolist() == [0]
    assert torch.equal(labels, km.assign_reference(x, init)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clusters=0, iters=1), "num_clusters=0"),
        (dict(num_clusters=101, iters=1), "num_clusters=101"),
        (dict(num_clusters=4, iters=-1), "iters=-1"),
        (dict(num_clusters=4, iters=1, init=torch.zeros(1, 3, 8)), "init: expected shape"),
        (dict(num_clusters=4, iters=1, backend="cuda"), "backend='cuda'"),
    ],
)
def test_kmeans_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.kmeans(torch.zeros(1, 100, 8), **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kmeans_loop_never_syncs_with_host():
    x = torch.randn(8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    km.kmeans(x, 64, 1)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        centroids, labels, _ = km.kmeans(x, 64, 5)
        km.kmeans(x, 64, 2, init=centroids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_labels, _ = km.assign_reference(x.float(), centroids)
    assert (labels == ref_labels).float().mean() > 0.95  # bf16 distances: near-ties may flip


def test_returned_centroids_are_the_means_of_the_returned_clusters():
    x, _ = planted(2, 300, 6, 16, spread=1.5, seed=11)
    for iters, init in ((1, None), (3, None), (2, x[:, :6].clone())):
        centroids, labels, _ = km.kmeans(x, 6, iters, init=init)
        sums, counts = km.accumulate_reference(x, labels, 6)
        filled = counts > 0
        torch.testing.assert_close(centroids[filled], (sums / counts.clamp_min(1)[..., None])[filled])
    # the labels are the last assignment: to the centroids before the last update
    first = km.kmeans(x, 6, 1, init=x[:, :6].clone())
    assert torch.equal(first.labels, km.assign_reference(x, x[:, :6])[0])


def test_cluster_variance_about_the_centroid():
    x = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[0, 0, 1]], dtype=torch.int32)
    centroids = torch.tensor([[[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]]])  # cluster 2 is empty
    torch.testing.assert_close(km.cluster_variance(x, centroids, labels), torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]))
