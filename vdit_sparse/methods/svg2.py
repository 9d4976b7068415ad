"""SVG2: semantic-aware permutation. Cluster tokens by their q / k vectors, compute cluster pairs.

Per batch element and head, the video tokens' queries and keys are clustered separately with
k-means; tokens are reordered so that each cluster is one contiguous segment of the plan
(``q_perm`` / ``k_perm``, segments = clusters, empty clusters are zero-length segments). The
attention mass between clusters is estimated from centroids, weighted by key-cluster size, as
Sparse VideoGen2 publishes it,

    p(i, j) = softmax_j(c_q,i · c_k,j / √d + log |K_j|),

with two corrections for the clusters' spread (``cluster_mass``): a key cluster's spread raises its
mass (exp is convex), a query cluster's spread flattens its row. Each query cluster keeps the fewest
key clusters whose estimated mass reaches ``top_p`` (at least ``min_k_ratio`` of the key clusters, and
at least one). With ``density`` given, a fixed budget replaces top-p: the cluster pairs that lower the
estimated squared error most per computed (query, key) pair are kept until the pairs' cost
Σ|Q_i||K_j| reaches the target (``select_budget``). ``num_sampled_rows`` > 0 measures the mass on
that many real query rows per head instead of estimating it. Text tokens are computed densely.

Against the published algorithm (tests/methods/svg2_oracle.py, scripts/svg2_vs_oracle.py) on the
embedded models' attention, 16 / 64 clusters, top_p 0.5-0.9: 0.89-0.94x its error at equal top_p and 0.71-0.83x
at equal density at 448 tokens, 0.77-0.90x and 0.72-0.81x at 1,600 (BENCHMARKS.md).

Cluster counts: ``num_q_clusters`` = 100 and ``num_k_clusters`` = 500 by default, inside the
published ranges (100-400 query, 500-1000 key clusters at 30k-120k tokens) and at the low end for
query clusters, because kernel throughput falls as query clusters multiply. They are not yet
measured on a GPU here (pending). When there are few video tokens the counts shrink to at most
one cluster per ``MIN_CLUSTER_TOKENS`` tokens: smaller clusters cost a whole kernel tile each and
estimate little a dense block would not (at 8 the embedded model's 448 tokens got 56 key clusters
where 64 were asked, which cost 4 % of error at equal top_p against the published algorithm).

Warm start (``svg2_clusters``): the clusters live in ``ctx.state["svg2"]`` (the handle keeps one state per
branch and layer; inside it, one set per batch element and head). The first call runs ``kmeans_iters_first``
iterations from k-means++ seeds (the published code seeds uniformly at random); a later call of the same shape
re-centres the previous call's clusters on its own tokens and runs ``kmeans_iters_step`` (1) iterations from
there; a new shape (resolution, batch, cluster counts) starts cold again. Cluster c stays segment c through a
warm start, so ``info["segment_identity"]`` (per head) changes only at a cold start or when one of the head's
clusters was empty and re-seeded: the tile-skip cache keeps its marks for cluster pairs across steps and drops
them when the identity changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..plan import BlockPlan, attach_text, from_clusters
from ..settings import Settings, count, fraction, optional_fraction, positive_int, setting, unit_interval, warmup
from .base import Method
from .svg2_clusters import run_clusters

MIN_CLUSTER_TOKENS = 4


def cluster_counts(video_tokens: int, num_q_clusters: int, num_k_clusters: int) -> tuple[int, int]:
    """The cluster counts used for ``video_tokens`` tokens: the requested ones, at most one per MIN_CLUSTER_TOKENS."""
    cap = max(1, video_tokens // MIN_CLUSTER_TOKENS)
    return min(num_q_clusters, cap), min(num_k_clusters, cap)


def cluster_mass(q_centroids, k_centroids, k_sizes, k_variance=None, q_variance=None):
    """(G, Cq, Ck) estimated share of each query cluster's attention that falls on each key cluster.

    The published estimate is softmax_j(c_q,i · c_k,j / √d + log |K_j|): the query cluster scored as its mean
    query, every key of cluster j as its mean key. Centroids alone misjudge both spreads (variances (G, C, D)):

    - ``k_variance``: for Gaussian keys, mean_k exp(a · k) = exp(a · c_k + ½ Σ_d a_d² σ²_j,d), a = c_q / √d: a
      cluster of mixed keys draws more attention than its mean key would (exp is convex);
    - ``q_variance``: the queries of cluster i do not share one softmax row; the mean of their rows is flatter
      than the row of their mean. Over Gaussian queries, each logit varies with s²_ij = Σ_d σ²_i,d c²_k,j,d / d,
      and the mean-field approximation of a softmax of Gaussian logits (as the probit approximation of a
      sigmoid) divides each logit by √(1 + π s²_ij / 8).
    """
    scale = 1.0 / math.sqrt(q_centroids.shape[-1])
    logits = torch.einsum("gid,gjd->gij", q_centroids, k_centroids) * scale  # (G, Cq, Ck)
    if k_variance is not None:
        logits = logits + 0.5 * scale**2 * torch.einsum("gid,gjd->gij", q_centroids.square(), k_variance)
    if q_variance is not None:
        spread = scale**2 * torch.einsum("gid,gjd->gij", q_variance, k_centroids.square())  # (G, Cq, Ck) s²
        logits = logits * torch.rsqrt(1.0 + math.pi / 8.0 * spread)
    logits = logits + k_sizes.float().log()[:, None, :]  # an empty key cluster gets -inf: no mass
    return logits.softmax(-1)


def sampled_mass(q, k, q_labels, k_labels, q_sizes, num_k_clusters: int, rows: int):
    """(G, Cq, Ck) each query cluster's attention share per key cluster, measured on sampled query rows.

    ``rows`` query tokens per head, spread evenly over the query clusters (at least one per non-empty cluster)
    and evenly inside each (every s-th token of the cluster in token order, so spread over the video), attend
    to every key; their softmax rows, summed per key cluster and averaged per query cluster, are the mass.
    Unlike the centroid estimate this counts the spread of logits inside a key cluster (exp is convex: a
    cluster of mixed keys draws more attention than its mean key), for rows/N of a dense call's work.
    """
    G, V, D = q.shape
    Cq = q_sizes.shape[1]
    per = max(1, -(-rows // Cq))  # rows per query cluster
    sizes = q_sizes[:, :, None].float()  # (G, Cq, 1)
    offsets = (q_sizes.cumsum(1) - q_sizes)[:, :, None].float()
    spread = (torch.arange(per, device=q.device).float() + 0.5) / per  # (per,) evenly inside each cluster
    position = (offsets + (spread * sizes).floor()).clamp(max=V - 1).long().view(G, Cq * per)
    token = torch.gather(q_labels.argsort(dim=1, stable=True), 1, position)  # (G, Cq·per) plan order -> token
    sample = torch.gather(q, 1, token[..., None].expand(-1, -1, D)).float()
    probs = (sample @ k.float().transpose(1, 2) / math.sqrt(D)).softmax(-1)  # (G, Cq·per, V)
    by_cluster = torch.zeros(G, Cq * per, num_k_clusters, device=q.device)
    by_cluster.scatter_add_(2, k_labels.long()[:, None, :].expand(-1, Cq * per, -1), probs)
    return by_cluster.view(G, Cq, per, num_k_clusters).mean(2)  # an empty query cluster's rows are a neighbour's


def floor_count(num_k_clusters: int, min_k_ratio: float) -> int:
    """Key clusters every query cluster keeps whatever the budget: ceil(min_k_ratio · Ck), at least one."""
    return max(1, math.ceil(min_k_ratio * num_k_clusters - 1e-9))  # 0.1 · 30 is 3.0000000000000004 in floats


def sorted_descending(x):
    """x's values sorted along the last dimension, largest first (no indices). On a CPU numpy's vectorised sort
    takes 1/50 of torch's time on svg2's (G, Cq, Ck) masses."""
    if x.device.type != "cpu":
        return x.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.ascontiguousarray(np.sort(x.float().numpy(), axis=-1)[..., ::-1]))


def select_top_p(mass, top_p: float, min_keep: int):
    """(G, Cq, Ck) bool: per query cluster, the fewest key clusters whose mass reaches top_p, at least min_keep.

    Found by value on the sorted masses (no indices to carry back): the clusters of mass above the last one
    needed, then as many of those equal to it as are still needed, lowest id first.
    """
    values = sorted_descending(mass)
    before = values.cumsum(-1) - values  # (G, Cq, Ck) ascending: mass of the better-ranked key clusters
    top = torch.full_like(values[..., :1], top_p)
    needed = torch.searchsorted(before, top).clamp(min=min(min_keep, mass.shape[-1]))  # (G, Cq, 1) how many
    last = torch.gather(values, -1, needed - 1)  # (G, Cq, 1) the smallest mass kept
    keep = mass >= last
    spare = keep.sum(-1, keepdim=True) - needed  # clusters tied with the last one that are not needed
    if spare.any():  # exact ties (rare but for empty clusters): the lowest ids among them are kept
        tied = mass == last
        keep &= ~tied | (tied.cumsum(-1) <= (tied.sum(-1, keepdim=True) - spare))
    return keep


def select_budget(mass, q_sizes, k_sizes, budget, min_keep: int):
    """(G, Cq, Ck) bool: the cluster pairs that most lower the estimated squared error, up to ``budget`` (G,) pairs.

    A query row that keeps mass m of its attention is off by about (1 − m)·|Δ|: the squared error of query
    cluster i is |Q_i|(1 − m_i)². Each query cluster's key clusters are ranked by mass per computed pair
    (p(i, j) / |K_j|); along that ranking, taking cluster j (mass p, mass b before it) lowers the error by
    |Q_i|((1 − b)² − (1 − b − p)²) for |Q_i||K_j| pairs, a value per pair that falls along each row, so one
    global sort takes every row's clusters in its own order. Counting mass alone (the value p / |K_j|)
    starves query clusters whose attention is spread out; squaring spends the budget where rows stand farthest
    from their full mass, as top-p does, while still buying the cheapest mass first.

    Each query cluster first keeps its ``min_keep`` key clusters of most mass (these count against the budget and may
    exceed it); a pair is kept when the budget covers at least half of it, so the realised count lands
    within half a pair of the budget.
    """
    G, Cq, Ck = mass.shape
    k_size = k_sizes.float().clamp_min(1.0)[:, None, :]
    per_pair = mass / k_size  # (G, Cq, Ck) mass per computed (query, key) pair
    ranked = per_pair.sort(-1, descending=True)
    p = torch.gather(mass, -1, ranked.indices)
    before = (p.cumsum(-1) - p).clamp(max=1.0)
    gain = ranked.values * ((1 - before) + (1 - before - p).clamp_min(0.0))  # (1-b)² - (1-b-p)², per pair
    floor = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, mass.topk(min(min_keep, Ck), dim=-1).indices, True)
    gain = torch.where(torch.gather(floor, -1, ranked.indices), math.inf, gain)  # the floor first, whatever it costs
    cost = torch.gather((q_sizes.float()[:, :, None] * k_sizes.float()[:, None, :]), -1, ranked.indices)
    order = gain.view(G, -1).argsort(dim=1, descending=True, stable=True)  # (G, Cq·Ck)
    cost_sorted = torch.gather(cost.view(G, -1), 1, order)
    spent_before = cost_sorted.cumsum(1) - cost_sorted
    keep_sorted = spent_before + cost_sorted / 2 <= budget[:, None]
    keep_sorted |= torch.gather(gain.view(G, -1), 1, order) == math.inf
    keep_ranked = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted).view(G, Cq, Ck)
    return torch.zeros_like(keep_ranked).scatter_(-1, ranked.indices, keep_ranked)


def segment_plan(q_labels, k_labels, q_sizes, k_sizes, selected, batch: int, heads: int) -> BlockPlan:
    """A BlockPlan over the video tokens with one segment per cluster, tokens sorted by cluster."""
    return from_clusters(q_labels, k_labels, q_sizes, k_sizes, selected, batch, heads)


def head_sets(batch: int, heads: int, head_range, device) -> tuple[int, torch.Tensor] | None:
    """(total, index (B·H,)) of this call's (batch, head) point sets among the model's, or None when the call
    holds every head; ``head_range`` is the context's (first, total), set on a Ulysses rank."""
    if head_range is None:
        return None
    first, total = head_range
    index = torch.arange(batch)[:, None] * total + first + torch.arange(heads)[None, :]  # (B, H)
    return batch * total, index.flatten().to(device)


@dataclass(frozen=True)
class SVG2Settings(Settings):
    method = "svg2"

    top_p: float = setting(0.9, fraction, "share of the estimated attention mass each query cluster keeps")
    density: float | None = setting(None, optional_fraction, "a fixed budget instead of top_p (null: top_p decides)")
    min_k_ratio: float = setting(0.0, unit_interval, "floor on the share of key clusters each query cluster keeps")
    num_q_clusters: int = setting(100, positive_int, "k-means clusters of the queries, per head")
    num_k_clusters: int = setting(500, positive_int, "k-means clusters of the keys, per head")
    num_sampled_rows: int = setting(0, count, "query rows per head whose exact attention estimates the cluster "
                                    "pair mass (0: from centroids, as published)")
    kmeans_iters_first: int = setting(50, positive_int, "k-means iterations at a cold start")
    kmeans_iters_step: int = setting(1, count, "k-means iterations per later call, from the previous call's clusters "
                                    "re-centred on this call's tokens")
    warmup_steps: float = setting(0.25, warmup, "first steps run dense: a count, or a fraction of the steps when < 1")


class SVG2(Method):
    name = "svg2"
    Settings = SVG2Settings
    summary = "k-means on q and k per head, tokens reordered by cluster, cluster pairs kept up to top_p of the mass"
    knobs = {"density": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7), "top_p": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)}

    def plan(self, q, k, ctx, params, v=None):
        layout = ctx.layout
        B, H, _, D = q.shape
        G, V = B * H, layout.video_tokens
        video = slice(layout.video_start, layout.video_start + V)
        qv = q[:, :, video].reshape(G, V, D)  # (G, V, D): text is computed densely, never clustered
        kv = k[:, :, video].reshape(G, V, D)
        counts = cluster_counts(V, params.num_q_clusters, params.num_k_clusters)
        state = ctx.state.setdefault("svg2", {})
        sets = head_sets(B, H, ctx.heads, q.device)
        q_cl, k_cl, iters, identity = run_clusters(qv, kv, counts, (B, H, V, D), state, params, sets)
        q_labels, k_labels = q_cl.labels, k_cl.labels  # (G, V) int32
        q_sizes, k_sizes = q_cl.sizes, k_cl.sizes  # (G, C)

        if params.num_sampled_rows:
            mass = sampled_mass(qv, kv, q_labels, k_labels, q_sizes, counts[1], params.num_sampled_rows)
        else:
            mass = cluster_mass(q_cl.centroids, k_cl.centroids, k_sizes, k_cl.variance, q_cl.variance)
        min_keep = floor_count(counts[1], params.min_k_ratio)
        if params.density is None:
            selected = select_top_p(mass, params.top_p, min_keep)
        else:
            # text rows and columns are always computed: the video part gets what is left of density · N²
            n = layout.num_tokens
            budget = torch.full((G,), max(0.0, params.density * n * n - (n * n - V * V)), device=q.device)
            selected = select_budget(mass, q_sizes, k_sizes, budget, min_keep)
        selected &= (k_sizes > 0)[:, None, :] & (q_sizes > 0)[:, :, None]  # empty segments need no entries

        plan = attach_text(segment_plan(q_labels, k_labels, q_sizes, k_sizes, selected, B, H), layout)
        info = {
            "q_labels": q_labels.view(B, H, V),
            "k_labels": k_labels.view(B, H, V),
            "stats": {"kmeans_iters": iters, "q_clusters": counts[0], "k_clusters": counts[1]},
            "segment_identity": identity,
        }
        return plan, info
