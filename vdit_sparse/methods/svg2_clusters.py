"""svg2's clustering over a run: k-means of q or k per (batch, head), warm-started from call to call.

A cold start (the first call, or a new shape) runs ``kmeans_iters_first`` Lloyd rounds from k-means++ seeds.
A warm start begins from the previous call's *partition*, not its centroids: the previous labels' clusters
are re-centred on this call's tokens (one pass of sums, no distances), then ``kmeans_iters_step`` Lloyd
rounds follow. Token n is the same video position at every step, and its cluster of the last step is the
best guess for it now, so re-centring tracks how q and k drifted between steps for the price of a sum;
starting from the old centroids instead spends a whole distance pass (N × C × d: most of svg2's planning on
a CPU) only to find the same partition again. With ``kmeans_iters_step`` = 0 the previous partition is kept
as it is (calibration runs candidates that way, so that they share one clustering).

Every result carries what the cluster-mass estimate needs: the exact mean of each cluster's tokens, its size
and its per-dimension variance, all from the final labels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.kmeans import accumulate_reference, kmeans


class Clusters(NamedTuple):
    labels: torch.Tensor  # (G, V) int32: each token's cluster
    centroids: torch.Tensor  # (G, C, D) float32: the mean of each cluster's tokens (a re-seeded empty one: its seed)
    sizes: torch.Tensor  # (G, C) int64: tokens per cluster
    variance: torch.Tensor  # (G, C, D) float32: per-dimension variance of each cluster's tokens (0 when empty)
    reseeded: torch.Tensor  # (G,) int64: empty clusters re-seeded in this call (they now mean other tokens)


class Partition(NamedTuple):
    """What a warm start needs of the previous call (kept per branch and layer: no sizes or variances)."""

    labels: torch.Tensor  # (G, V) int32
    centroids: torch.Tensor  # (G, C, D) float32


def summarize(x, labels, centroids, reseeded) -> Clusters:
    """Sizes and variances of the clusters ``labels`` (G, V) of x (G, V, D), whose means are ``centroids``."""
    squares, counts = accumulate_reference(x.float().square(), labels, centroids.shape[1])  # (G, C, D), (G, C)
    n = counts.clamp_min(1.0)[..., None]
    variance = (squares / n - centroids.square()).clamp_min(0.0) * (counts > 0)[..., None]  # E[x²] − E[x]²
    return Clusters(labels, centroids, counts.long(), variance, reseeded)


def recentred(x, labels, previous_centroids):
    """(G, C, D) float32: the mean of this call's x over each cluster of ``labels``; an empty cluster keeps its
    previous centroid (the far point it was re-seeded at)."""
    sums, counts = accumulate_reference(x, labels, previous_centroids.shape[1])
    return torch.where((counts > 0)[..., None], sums / counts.clamp_min(1.0)[..., None], previous_centroids.float())


def cluster(x, num_clusters: int, iters: int, previous: Partition | None, seed: int, sets=None) -> Clusters:
    """k-means of x (G, V, D): cold from k-means++ seeds when ``previous`` is None, else warm from its partition."""
    if previous is None:
        result = kmeans(x, num_clusters, iters, seed=seed, sets=sets)
        return summarize(x, result.labels, result.centroids, result.reseeded)
    start = recentred(x, previous.labels, previous.centroids)
    if iters == 0:
        return summarize(x, previous.labels, start, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))
    result = kmeans(x, num_clusters, iters, init=start, sets=sets)
    return summarize(x, result.labels, result.centroids, result.reseeded)


def run_clusters(q, k, counts, shape, state, params, sets=None):
    """Warm- or cold-started k-means of q and k (G, V, D) as svg2 runs it call after call, kept in ``state``.

    Returns the q and k Clusters, the iterations run, and each head's segment identity (G,) int64: cluster c
    stays segment c through warm starts, so the identity changes only at a cold start or when one of the head's
    clusters was re-seeded (that segment now holds other tokens).
    """
    key = (shape, counts, str(q.device))  # any other problem than the stored one starts cold
    warm = state.get("key") == key
    iters = params.kmeans_iters_step if warm else params.kmeans_iters_first
    q_cl = cluster(q, counts[0], iters, state["q"] if warm else None, seed=0, sets=sets)
    k_cl = cluster(k, counts[1], iters, state["k"] if warm else None, seed=1, sets=sets)
    if warm:
        state["reseeds"] = state["reseeds"] + q_cl.reseeded + k_cl.reseeded
    else:
        state["cold_starts"] = state.get("cold_starts", 0) + 1
        state["reseeds"] = torch.zeros_like(q_cl.reseeded)
    state.update(key=key, q=Partition(q_cl.labels, q_cl.centroids), k=Partition(k_cl.labels, k_cl.centroids))
    identity = state["cold_starts"] * 2**32 + state["reseeds"]  # (G,) int64
    return q_cl, k_cl, iters, identity
