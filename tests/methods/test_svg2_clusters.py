"""svg2's clustering over a run: cold k-means, warm starts from the previous partition, the cluster summary."""

from __future__ import annotations

import torch

from vdit_sparse.kernels.kmeans import objective
from vdit_sparse.methods.svg2_clusters import cluster, recentred, summarize


def planted(G=2, N=600, D=16, C=12, spread=0.3, seed=0):
    """(x (G, N, D), labels (G, N)): points around C random centres per set."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(G, C, D, generator=gen) * 2
    labels = torch.randint(0, C, (G, N), generator=gen)
    x = torch.gather(centres, 1, labels[..., None].expand(-1, -1, D)) + spread * torch.randn(G, N, D, generator=gen)
    return x, labels


def direct_stats(x, labels, C):
    """Per cluster mean, size and per-dimension variance, one cluster at a time."""
    G, _, D = x.shape
    mean, var, size = torch.zeros(G, C, D), torch.zeros(G, C, D), torch.zeros(G, C, dtype=torch.int64)
    for g in range(G):
        for c in range(C):
            pts = x[g][labels[g] == c]
            size[g, c] = len(pts)
            if len(pts):
                mean[g, c], var[g, c] = pts.mean(0), pts.var(0, unbiased=False)
    return mean, size, var


def test_summary_is_each_clusters_exact_mean_size_and_variance():
    x, labels = planted()
    labels[0, labels[0] == 3] = 4  # cluster 3 of set 0 is empty
    mean, size, var = direct_stats(x, labels, 12)
    start = recentred(x, labels.int(), torch.full((2, 12, 16), 7.0))
    torch.testing.assert_close(start[0, 3], torch.full((16,), 7.0))  # an empty cluster keeps its previous centroid
    start[0, 3] = 0.0
    torch.testing.assert_close(start, mean, atol=1e-5, rtol=1e-5)
    got = summarize(x, labels.int(), start, torch.zeros(2, dtype=torch.int64))
    assert torch.equal(got.sizes, size)
    torch.testing.assert_close(got.variance, var, atol=1e-4, rtol=1e-4)


def test_warm_start_with_no_iterations_keeps_the_partition_and_recentres_it():
    x, _ = planted()
    first = cluster(x, 12, 20, None, seed=0)
    moved = x + 0.5  # every token drifted the same way
    again = cluster(moved, 12, 0, first, seed=0)
    assert torch.equal(again.labels, first.labels)  # what calibration's shared candidates rely on
    torch.testing.assert_close(again.centroids, first.centroids + 0.5, atol=1e-5, rtol=1e-5)
    assert int(again.reseeded.sum()) == 0


def test_one_warm_iteration_from_the_partition_tracks_drift_as_well_as_a_cold_run():
    x, truth = planted(seed=1)
    first = cluster(x, 12, 30, None, seed=0)
    gen = torch.Generator().manual_seed(2)
    shift = 0.4 * torch.randn(x.shape[0], 1, x.shape[2], generator=gen)  # every token of a set drifts alike
    drifted = x + shift + 0.05 * torch.randn(x.shape, generator=gen)
    warm = cluster(drifted, 12, 1, first, seed=0)
    cold = cluster(drifted, 12, 30, None, seed=0)
    warm_obj = objective(drifted, warm.centroids, warm.labels)
    cold_obj = objective(drifted, cold.centroids, cold.labels)
    assert (warm_obj <= 1.02 * cold_obj).all()
    # and from the old centroids, one iteration of plain k-means does no better than the re-centred partition
    from vdit_sparse.kernels.kmeans import kmeans

    plain = kmeans(drifted, 12, 1, init=first.centroids)
    assert (warm_obj <= objective(drifted, plain.centroids, plain.labels) + 1e-3).all()


def test_an_emptied_cluster_is_reseeded_and_counted():
    x, _ = planted()
    first = cluster(x, 12, 20, None, seed=0)
    collapsed = x.clone()
    collapsed[1] = 0.0  # set 1: every point in one spot, so all clusters but one lose their points
    again = cluster(collapsed, 12, 1, first, seed=0)
    assert int(again.reseeded[0]) == 0 and int(again.reseeded[1]) == 11
