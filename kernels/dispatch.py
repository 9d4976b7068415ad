"""``block_sparse_attention``: the public entry. Checks the arguments, then runs the plan on the Triton
kernel (CUDA tensors; CPU ones only under TRITON_INTERPRET=1) or on a torch path (CPU): the gathered
path (``cpu_gathered.py``), or torch's fused dense attention when the plan computes every pair."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vdit_sparse.plan import BlockPlan, from_block_mask

from . import cpu_compiled, cpu_gathered, cpu_masked, cpu_path
from .block_sparse_attention import block_sparse_attention_triton

BACKENDS = ("auto", "triton", "torch")
# Without the compiled loop, query segments this small on average (svg2 clusters at a few hundred
# tokens) go to the masked-rows path: the pure-PyTorch chunks' per-chunk work outweighs what they skip
# (measured, 1 thread: 448 tokens in 56 clusters, 28 ms masked vs 42-63 ms in chunks; 4,096 tokens in
# 100 clusters, 1.9 s vs 0.8-0.9 s). The compiled loop has no per-chunk cost and takes every plan.
SMALL_SEGMENT_ROWS = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def block_sparse_attention(
    q, k, v, plan, block_size=None, *, scale=None, backend="auto", skip=None, tile_stats=False, reverse=False,
    out=None, config=None,
):
    """(B, H, N, D) attention of q, k, v computed only on the (query, key) pairs ``plan`` lists.

    ``plan``: a BlockPlan, or a bool block mask (B, H, ceil(N/BM), ceil(N/BN)) over model order with
    ``block_size=(BM, BN)``. q, k, v: (B, H, N, D) bf16 / fp16 / fp32, any strides; v may have its own
    head dim Dv. ``backend``: "auto" (CUDA -> Triton kernel, CPU -> torch path), "triton" (on CPU only
    under TRITON_INTERPRET=1) or "torch" (each query tile's kept keys gathered into one softmax row;
    with ``config``, the tiled online-softmax path instead).
    ``skip``: (G, Sq, L) bool, plan entries not to compute. ``reverse``: scan each key list backwards.
    ``tile_stats``: also return stats (G, Sq, L) float32: per computed entry, its key segment's max
    scaled logit minus the row's running max after it (natural log, <= 0), max over the segment's
    rows; -inf for entries not computed (past kv_count, skipped, or an empty segment).
    ``out``: optional (B, H, N, Dv) buffer to write into. ``config``: tile sizes and launch settings
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} (default on CUDA: tuned and cached on disk, see
    autotune_cache.py; the torch path reads only the tile sizes and then always tiles).
    Returns out in the model's token order, or (out, stats) when ``tile_stats``.
    """
    _check_tensors(q, k, v)
    plan = _as_plan(plan, block_size, q)
    _check_plan(plan, q, skip)
    backend = _pick_backend(backend, q)
    _check_config(config)
    out = _output(out, q, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    options = dict(skip=skip, tile_stats=tile_stats, reverse=reverse, out=out)
    if backend == "triton":
        return block_sparse_attention_triton(q, k, v, plan, scale, config=config, **options)
    if config is not None:
        return cpu_path.block_sparse_attention_torch(q, k, v, plan, scale, block_m=config["BLOCK_M"], block_n=config["BLOCK_N"], **options)
    if not tile_stats and skip is None and _computes_every_pair(plan):
        # density 1.0: torch's fused attention is the fastest exact answer, and model order needs no permutation
        return out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale))
    if cpu_compiled.extension() is None and _mean_query_segment(plan) < SMALL_SEGMENT_ROWS:
        return cpu_masked.masked_rows_attention(q, k, v, plan, scale, **options)
    return cpu_gathered.gathered_attention(q, k, v, plan, scale, **options)


def _mean_query_segment(plan: BlockPlan) -> float:
    """Mean rows per non-empty query segment."""
    return plan.num_tokens * plan.groups / max(1, int((plan.q_offsets.diff(dim=1) > 0).sum()))


def _computes_every_pair(plan: BlockPlan) -> bool:
    """Whether every batch·head lists all N² pairs (segments are listed at most once per row)."""
    if plan.kv_index.shape[2] < plan.k_offsets.shape[1] - 1:
        # rows list fewer entries than there are key segments: answered without a sum or a sync (they could still
        # cover every pair with empty segments; then the gathered path runs, exact as well)
        return False
    return bool((plan.pairs() == float(plan.num_tokens) ** 2).all())


def _as_plan(plan, block_size, q) -> BlockPlan:
    if isinstance(plan, torch.Tensor):
        if block_size is None:
            raise ValueError("block_size: required with a block mask, e.g. block_size=(64, 64)")
        return from_block_mask(plan, tuple(block_size), q.shape[2])
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan: expected a BlockPlan or a bool block mask, got {type(plan).__name__}")
    return plan


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a (B, H, N, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported; allowed: bfloat16, float16, float32")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v: shapes must agree as (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}")


def _check_plan(plan: BlockPlan, q, skip) -> None:
    """Shape, dtype and device checks that need no device sync; plan.validate() checks the values."""
    B, H, N, _ = q.shape
    if (plan.batch, plan.heads) != (B, H):
        raise ValueError(f"plan: built for batch={plan.batch}, heads={plan.heads}, but q has B={B}, H={H}")
    if plan.num_tokens != N:
        raise ValueError(f"plan: built for num_tokens={plan.num_tokens}, but q has N={N}")
    G, Sq = plan.kv_count.shape
    for name in ("q_offsets", "k_offsets", "kv_count", "kv_index", "q_perm", "k_perm"):
        t = getattr(plan, name)
        if t is None:
            continue
        if t.dtype != torch.int32 or t.device != q.device or t.shape[0] != G:
            raise ValueError(f"plan.{name}: expected int32 on {q.device} with first dim {G}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    for name in ("q_perm", "k_perm"):
        t = getattr(plan, name)
        if t is not None and tuple(t.shape) != (G, N):
            raise ValueError(f"plan.{name}: expected shape ({G}, {N}) for N={N}, got {tuple(t.shape)}")
    if plan.q_offsets.shape[1] != Sq + 1 or plan.kv_index.shape[:2] != (G, Sq):
        shapes = f"q_offsets {tuple(plan.q_offsets.shape)}, kv_count {(G, Sq)}, kv_index {tuple(plan.kv_index.shape)}"
        raise ValueError(f"plan: {shapes} disagree on the number of query segments")
    if skip is not None and (skip.dtype != torch.bool or skip.shape != plan.kv_index.shape or skip.device != q.device):
        want = tuple(plan.kv_index.shape)
        raise ValueError(f"skip: expected bool {want} on {q.device} (like plan.kv_index), got {skip.dtype} {tuple(skip.shape)} on {skip.device}")


def _pick_backend(backend: str, q) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} not supported; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if q.is_cuda else "torch"
    return backend


def _check_config(config) -> None:
    if config is None:
        return
    sizes = (config.get("BLOCK_M"), config.get("BLOCK_N")) if isinstance(config, dict) else (None, None)
    if not all(isinstance(x, int) and x > 0 for x in sizes):
        raise ValueError(f"config: expected a dict with positive int BLOCK_M and BLOCK_N, got {config!r}")


def _output(out, q, v):
    """The (B, H, N, Dv) buffer to write: ``out`` once checked, else a new one."""
    want = q.shape[:3] + v.shape[3:]
    if out is None:
        return torch.empty(want, dtype=q.dtype, device=q.device)
    if out.shape != want or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out: expected {q.dtype} {tuple(want)} on {q.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out
