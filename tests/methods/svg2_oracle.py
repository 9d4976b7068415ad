"""A test oracle: Sparse VideoGen2's published algorithm (semantic-aware permutation), in plain PyTorch.

Written from the paper and the public code's behaviour (svg-project/Sparse-VideoGen), not from ours, so
that svg2 can be measured against the algorithm it implements. Imported by the tests and by
scripts/svg2_vs_oracle.py; no runtime code uses it. Per (batch, head) point set:

- **k-means** (Euclidean, batched): a cold start draws its initial centroids uniformly at random from the
  points (with replacement); a warm start takes the previous call's centroids. Each round assigns every
  point to its nearest centroid, then moves each centroid to the mean of its points; an empty cluster keeps
  its old centroid. Rounds stop after ``max_iters`` or once no centroid moved by ``tol`` or more. The labels
  and sizes returned are the last round's assignment, and the centroids the means computed from it
  (except when it stopped on convergence: then the centroids that assignment was made to).
- **cluster mass**: ``softmax_j(c_q,i · c_k,j / √d)`` weighted by the key clusters' sizes |K_j|.
- **selection**: per query cluster, key clusters in descending mass; a cluster is dropped once the mass
  of the clusters before it exceeds ``top_p`` (so the best one is always kept), and the first
  ``int(min_kc_ratio · Ck)`` are always kept.
- **mask**: cluster-granular: query token n sees key token m iff its cluster pair was selected.
"""

from __future__ import annotations

import math

import torch


def kmeans(x, num_clusters: int, max_iters: int, init=None, tol: float = 1e-4, generator=None):
    """x (G, N, D) -> labels (G, N) int64, centroids (G, C, D) float32, sizes (G, C) int64."""
    G, N, D = x.shape
    x = x.float()
    if init is None:
        pick = torch.randint(0, N, (G, num_clusters), generator=generator)
        centroids = torch.gather(x, 1, pick[..., None].expand(-1, -1, D))
    else:
        centroids = init.float().clone()
    labels = sizes = None
    for _ in range(max(1, max_iters)):
        labels = torch.cdist(x, centroids).argmin(-1)  # (G, N) nearest centroid, ties to the lower index
        sums = torch.zeros(G, num_clusters, D).scatter_add_(1, labels[..., None].expand(-1, -1, D), x)
        sizes = torch.zeros(G, num_clusters, dtype=torch.int64).scatter_add_(1, labels, torch.ones_like(labels))
        means = torch.where(sizes[..., None] > 0, sums / sizes.clamp_min(1)[..., None], centroids)
        shift = (means - centroids).norm(dim=-1).max()
        if shift < tol:
            break  # converged: the assignment was made to `centroids`
        centroids = means
    return labels, centroids, sizes


def cluster_mass(q_centroids, k_centroids, k_sizes):
    """(G, Cq, Ck): each key cluster's share of a query cluster's attention, estimated from centroids."""
    scores = q_centroids @ k_centroids.transpose(1, 2) / math.sqrt(q_centroids.shape[-1])
    weighted = k_sizes[:, None, :].float() * (scores - scores.amax(-1, keepdim=True)).exp()
    return weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-12)


def select(mass, top_p: float, min_kc_ratio: float = 0.0):
    """(G, Cq, Ck) bool: the key clusters each query cluster keeps."""
    values, order = mass.sort(-1, descending=True)
    drop = values.cumsum(-1) > top_p
    drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], -1)  # shifted: the one crossing p stays
    keep_first = int(min_kc_ratio * mass.shape[-1])
    if keep_first > 0:
        drop[..., :keep_first] = False
    return torch.zeros_like(drop).scatter_(-1, order, ~drop)


def masked_attention(q, k, v, q_labels, k_labels, selected):
    """Attention of q, k, v (G, N, D) over the token pairs whose cluster pair is selected. Returns
    (out (G, N, D) float32, density (G,)): the share of the N² pairs computed."""
    G, N, D = q.shape
    rows = torch.arange(G)[:, None, None]
    allowed = selected[rows, q_labels[:, :, None], k_labels[:, None, :]]  # (G, N, N)
    logits = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(D)
    out = logits.masked_fill(~allowed, -math.inf).softmax(-1) @ v.float()
    return out, allowed.float().mean((1, 2))


class OracleSVG2:
    """The published method over a run: one instance per (branch, layer), warm-started from call to call."""

    def __init__(self, num_q_clusters=16, num_k_clusters=64, top_p=0.9, min_kc_ratio=0.0,
                 iters_first=50, iters_step=2, seed=0):
        self.counts = (num_q_clusters, num_k_clusters)
        self.top_p, self.min_kc_ratio = top_p, min_kc_ratio
        self.iters = (iters_first, iters_step)
        self.generator = torch.Generator().manual_seed(seed)
        self.centroids = None  # (q, k) of the previous call

    def cluster(self, q, k):
        """Warm- or cold-started k-means of q and k (G, N, D): ((labels, centroids, sizes) of q, of k)."""
        warm = self.centroids is not None
        iters = self.iters[1] if warm else self.iters[0]
        qc = kmeans(q, self.counts[0], iters, self.centroids[0] if warm else None, generator=self.generator)
        kc = kmeans(k, self.counts[1], iters, self.centroids[1] if warm else None, generator=self.generator)
        self.centroids = (qc[1], kc[1])
        return qc, kc

    def __call__(self, q, k, v, top_p=None):
        """out (G, N, D), density (G,) of one call."""
        (q_labels, q_centroids, _), (k_labels, k_centroids, k_sizes) = self.cluster(q, k)
        mass = cluster_mass(q_centroids, k_centroids, k_sizes)
        selected = select(mass, self.top_p if top_p is None else top_p, self.min_kc_ratio)
        return masked_attention(q, k, v, q_labels, k_labels, selected)
