"""Block-sparse flash attention over a BlockPlan: one fused Triton launch.

Reads top to bottom like Triton's fused-attention tutorial: the inner loop over a tile's key list,
the kernel, the host-side work list and launch configs, then the wrapper that checks arguments and
dispatches (CUDA -> Triton; CPU -> the vectorised torch path in ``cpu_path.py``; the plain
reference in ``reference.py`` on request). Design notes and the reasons behind them: ``NOTES.md``.

One program computes one *query tile*: up to BLOCK_M plan rows of one query segment of one
batch·head ``g``. Rows are gathered through ``q_perm`` and keys/values through ``k_perm`` inside the
kernel, and the output is scattered back to the model's token order, so no permuted copy of q, k, v
or out exists. Softmax runs online in float32 with exp2 (log2 e folded into the scale).
"""

from __future__ import annotations

import math

import torch

from vdit_sparse.plan import BlockPlan, from_block_mask

from .reference import reference_attention, reference_tile_stats

try:  # Triton is a Linux-only dependency: elsewhere the torch paths still import and run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton

    class tl:  # noqa: N801 - stands in for triton.language so the decorated code below still defines
        constexpr = None

    class _NoTriton:
        @staticmethod
        def jit(fn):
            return fn

    triton = _NoTriton

LOG2E = 1.4426950408889634  # the kernel works in log2 units; statistics leave it in ln units (x ln 2)


@triton.jit
def _attend_key_list(
    acc, m_i, l_i, q, row_ok, t, g64, s,
    k_base, v_base, k_perm_row, k_offsets, kv_count, kv_index, skip, Stats, qk_scale, stats_width,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
    stride_kog, stride_kos, stride_cg, stride_cs, stride_ig, stride_is, stride_il, stride_sg, stride_ss, stride_sl,
    offs_n, offs_d, offs_dv,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_K_PERM: tl.constexpr, HAS_SKIP: tl.constexpr,
    EMIT_STATS: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Online softmax of one query tile over the key segments its query segment lists, BLOCK_N keys at a time."""
    count = tl.load(kv_count + g64 * stride_cg + s * stride_cs)
    for j in range(0, count):
        if REVERSE:  # the tile-skip cache alternates scan direction between steps
            e = count - 1 - j
        else:
            e = j
        seg = tl.load(kv_index + g64 * stride_ig + s * stride_is + e * stride_il)
        k_lo = tl.load(k_offsets + g64 * stride_kog + seg * stride_kos)
        k_hi = tl.load(k_offsets + g64 * stride_kog + (seg + 1) * stride_kos)
        if HAS_SKIP:  # a skipped entry gets an empty key range: no QK^T, softmax or PV
            skipped = tl.load(skip + g64 * stride_sg + s * stride_ss + e * stride_sl) != 0
            k_hi = tl.where(skipped, k_lo, k_hi)
        seg_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # this entry's max logit per row
        for start in range(k_lo, k_hi, BLOCK_N):
            pos = start + offs_n  # (BLOCK_N,) plan positions
            col_ok = pos < k_hi
            if HAS_K_PERM:  # gather: plan position -> model token
                rows = tl.load(k_perm_row + pos * stride_kpn, mask=col_ok, other=0).to(tl.int64)
            else:
                rows = pos.to(tl.int64)
            kt = tl.load(k_base + rows[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0)
            if UPCAST_DOT:
                kt = kt.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
            tile_max = tl.max(qk, 1)
            seg_max = tl.maximum(seg_max, tile_max)
            m_new = tl.maximum(m_i, tile_max)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: avoid -inf - -inf
            alpha = tl.math.exp2(m_i - m_ref)
            p = tl.math.exp2(qk - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
            p = p.to(v_base.dtype.element_ty)  # P in the input dtype, as flash attention's PV matmul takes it
            if UPCAST_DOT:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        if EMIT_STATS:  # entry max relative to the running max after it, worst row of the tile, in ln units
            m_seen = tl.where(m_i == float("-inf"), 0.0, m_i)  # keeps -inf - -inf (NaN) out even where masked
            rel = tl.where(seg_max == float("-inf"), float("-inf"), seg_max - m_seen)
            rel = tl.where(row_ok, rel, float("-inf"))
            tl.store(Stats + t * stats_width + e, tl.max(rel, 0) * 0.6931471805599453)
    return acc, m_i, l_i


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Stats,
    q_perm, k_perm, k_offsets, kv_count, kv_index, skip,
    tile_g, tile_s, tile_lo, tile_hi,
    qk_scale, heads, stats_width,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_qpg, stride_qpn, stride_kpg, stride_kpn,
    stride_kog, stride_kos, stride_cg, stride_cs,
    stride_ig, stride_is, stride_il, stride_sg, stride_ss, stride_sl,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Q_PERM: tl.constexpr, HAS_K_PERM: tl.constexpr, HAS_SKIP: tl.constexpr,
    EMIT_STATS: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    t = tl.program_id(0)  # one query tile of the work list
    g = tl.load(tile_g + t)
    s = tl.load(tile_s + t)
    lo = tl.load(tile_lo + t)
    hi = tl.load(tile_hi + t)
    b = (g // heads).to(tl.int64)
    h = (g % heads).to(tl.int64)
    g64 = g.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    pos = lo + offs_m  # (BLOCK_M,) plan positions of this tile
    row_ok = pos < hi
    if HAS_Q_PERM:
        q_rows = tl.load(q_perm + g64 * stride_qpg + pos * stride_qpn, mask=row_ok, other=0).to(tl.int64)
    else:
        q_rows = pos.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    acc, m_i, l_i = _attend_key_list(
        acc, m_i, l_i, q, row_ok, t, g64, s,
        K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, k_perm + g64 * stride_kpg,
        k_offsets, kv_count, kv_index, skip, Stats, qk_scale, stats_width,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn,
        stride_kog, stride_kos, stride_cg, stride_cs, stride_ig, stride_is, stride_il, stride_sg, stride_ss, stride_sl,
        offs_n, offs_d, offs_dv,
        BLOCK_M, BLOCK_N, HAS_K_PERM, HAS_SKIP, EMIT_STATS, REVERSE, DOT_PRECISION, UPCAST_DOT,
    )

    l_ref = tl.where(l_i > 0.0, l_i, 1.0)  # rows with no key give zeros, never NaN
    o = acc / l_ref[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])  # scatter back to model order


# ---------------------------------------------------------------- host side: work list and launch


def query_tiles(q_offsets: torch.Tensor, block_m: int, total: int | None = None):
    """The work list: every query segment cut into tiles of ``block_m`` plan rows (the last one short).

    Returns four (T,) int32 tensors: batch·head ``g``, segment ``s``, first and end plan position.
    Empty segments get no tile. Vectorised: no Python loop over segments. ``total``, the number of
    tiles when the caller already knows it, saves a device-to-host sync.
    """
    G, S1 = q_offsets.shape
    off = q_offsets.long()
    sizes = off.diff(dim=1).reshape(-1)  # (G * Sq,)
    ntiles = (sizes + block_m - 1) // block_m
    total = int(ntiles.sum()) if total is None else total
    seg_ids = torch.repeat_interleave(torch.arange(sizes.numel(), device=off.device), ntiles, output_size=total)
    first_tile = torch.cumsum(ntiles, 0) - ntiles  # (G * Sq,) index of each segment's first tile
    within = torch.arange(total, device=off.device) - first_tile[seg_ids]
    start = off[:, :-1].reshape(-1)[seg_ids] + within * block_m  # (T,)
    end = torch.minimum(start + block_m, off[:, 1:].reshape(-1)[seg_ids])
    g, s = seg_ids // (S1 - 1), seg_ids % (S1 - 1)
    return tuple(x.to(torch.int32).contiguous() for x in (g, s, start, end))


# Interpreter runs (CPU tests) use small tiles so that small N still gives multi-tile segments.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _launch(q, k, v, plan: BlockPlan, scale, skip, reverse, out, stats, cfg, total=None):
    """One kernel launch with config ``cfg``; writes ``out`` and, when given, the per-tile ``stats``."""
    tile_g, tile_s, tile_lo, tile_hi = query_tiles(plan.q_offsets, cfg["BLOCK_M"], total)
    num_tiles = tile_g.numel()
    L = plan.kv_index.shape[2]
    if stats is not None:
        stats.resize_(num_tiles, L).fill_(float("-inf"))  # (T, L) per query tile; reduced per segment later
    if num_tiles == 0:
        return tile_s, tile_g
    dummy = plan.kv_count  # never read: its flag is off
    q_perm = plan.q_perm if plan.q_perm is not None else dummy
    k_perm = plan.k_perm if plan.k_perm is not None else dummy
    skip_t = skip.view(torch.uint8) if skip is not None else dummy  # bool -> bytes: Triton has no bool loads
    stats_t = stats if stats is not None else out
    # Triton's CPU interpreter multiplies bf16 bit patterns as integers: there, bf16 dots run in fp32
    # on the same bf16 values (exact products, fp32 sums, as the GPU's bf16 MMA).
    upcast = q.dtype == torch.bfloat16 and _interpreted()
    _block_sparse_fwd[(num_tiles,)](
        q, k, v, out, stats_t,
        q_perm, k_perm, plan.k_offsets, plan.kv_count, plan.kv_index, skip_t,
        tile_g, tile_s, tile_lo, tile_hi,
        scale * LOG2E, plan.heads, L,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_perm.stride(0), q_perm.stride(-1), k_perm.stride(0), k_perm.stride(-1),
        *plan.k_offsets.stride(), *plan.kv_count.stride(),
        *plan.kv_index.stride(), *(skip_t.stride() if skip is not None else (0, 0, 0)),
        HEAD_DIM=q.shape[3], HEAD_DIM_V=v.shape[3], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_Q_PERM=plan.q_perm is not None, HAS_K_PERM=plan.k_perm is not None, HAS_SKIP=skip is not None,
        EMIT_STATS=stats is not None, REVERSE=bool(reverse),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else None, UPCAST_DOT=upcast,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return tile_s, tile_g


def _segment_stats(tile_stats, tile_g, tile_s, plan: BlockPlan):
    """(G, Sq, L) float32: per plan entry, the max over the query segment's tiles; -inf where none computed."""
    G, Sq, L = plan.kv_index.shape
    stats = torch.full((G * Sq, L), float("-inf"), dtype=torch.float32, device=tile_stats.device)
    seg = (tile_g.long() * Sq + tile_s.long())[:, None].expand(-1, L)
    stats.scatter_reduce_(0, seg, tile_stats, reduce="amax")
    return stats.view(G, Sq, L)


def _mean_density(plan: BlockPlan, n: int) -> torch.Tensor:
    """() float64 on the plan's device: BlockPlan.density() averaged, with N given (reading it would sync)."""
    G, Sq, L = plan.kv_index.shape
    q_sizes = plan.q_offsets.diff(dim=1).double()  # (G, Sq)
    k_sizes = plan.k_offsets.diff(dim=1).double()  # (G, Sk)
    valid = torch.arange(L, device=q_sizes.device) < plan.kv_count[..., None]  # (G, Sq, L)
    idx = plan.kv_index.long().clamp(0, max(k_sizes.shape[1] - 1, 0))
    kept = torch.gather(k_sizes[:, None, :].expand(-1, Sq, -1), 2, idx) * valid  # (G, Sq, L) keys per entry
    return (kept.sum(2) * q_sizes).sum() / (G * float(n) ** 2)


def _host_numbers(plan: BlockPlan, n: int, block_ms, with_density: bool):
    """Tile totals per BLOCK_M, and the mean density, in one device-to-host copy: a call's only sync."""
    sizes = plan.q_offsets.diff(dim=1).long()  # (G, Sq)
    values = [((sizes + bm - 1) // bm).sum().double() for bm in block_ms]
    if with_density:
        values.append(_mean_density(plan, n))
    numbers = torch.stack(values).tolist()
    return {bm: int(n) for bm, n in zip(block_ms, numbers)}, (numbers[-1] if with_density else None)


def _triton_forward(q, k, v, plan, scale, skip, tile_stats, reverse, out, config):
    from . import autotune_cache

    stats = torch.empty(0, dtype=torch.float32, device=q.device) if tile_stats else None
    tuning = config is None and q.device.type != "cpu"  # the interpreter runs a fixed small config
    config = INTERPRETER_CONFIG if config is None and not tuning else config
    block_ms = sorted({c["BLOCK_M"] for c in autotune_cache.CANDIDATES}) if tuning else [config["BLOCK_M"]]
    totals, density = _host_numbers(plan, q.shape[2], block_ms, with_density=tuning)

    def run(cfg, out_buf, stats_buf):
        return _launch(q, k, v, plan, scale, skip, reverse, out_buf, stats_buf, cfg, totals.get(cfg["BLOCK_M"]))

    if tuning:
        config = _tuned_config(q, v, plan, run, density)
    tile_s, tile_g = run(config, out, stats)
    if not tile_stats:
        return out
    return out, _segment_stats(stats, tile_g, tile_s, plan)


def _tuned_config(q, v, plan: BlockPlan, run, density: float | None = None):
    """The launch config for this (N, D, density band), tuned once and cached on disk."""
    from . import autotune_cache

    density = float(_mean_density(plan, q.shape[2])) if density is None else density
    key = autotune_cache.tuning_key(q, v.shape[3], density, has_perm=plan.q_perm is not None or plan.k_perm is not None)

    def measure(cfg):  # into scratch buffers; a config whose output is not finite is rejected
        scratch = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
        run(cfg, scratch, None)
        if not bool(torch.isfinite(scratch).all()):
            return float("inf")
        return triton.testing.do_bench(lambda: run(cfg, scratch, None), warmup=5, rep=20, return_mode="median")

    return autotune_cache.default_cache().pick(key, autotune_cache.CANDIDATES, measure)


# ---------------------------------------------------------------- public wrapper

BACKENDS = ("auto", "triton", "torch", "reference")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def block_sparse_attention(
    q, k, v, plan, block_size=None, *, scale=None, backend="auto", skip=None, tile_stats=False, reverse=False,
    out=None, config=None,
):
    """(B, H, N, D) attention of q, k, v computed only on the (query, key) pairs ``plan`` lists.

    ``plan``: a BlockPlan, or a bool block mask (B, H, ceil(N/BM), ceil(N/BN)) over model order with
    ``block_size=(BM, BN)``. q, k, v: (B, H, N, D) bf16 / fp16 (fp32 for reference runs), any strides.
    ``backend``: "auto" (CUDA -> Triton kernel, CPU -> vectorised torch path), "triton" (on CPU only
    under TRITON_INTERPRET=1), "torch", or "reference" (materialises N x N; small N only).
    ``skip``: (G, Sq, L) bool, plan entries not to compute. ``reverse``: scan each key list backwards.
    ``tile_stats``: also return stats (G, Sq, L) float32: per computed entry, its key segment's max
    scaled logit minus the row's running max after it (natural log, <= 0), max over the segment's
    rows; -inf for entries not computed (past kv_count, skipped, or an empty segment).
    ``out``: optional (B, H, N, Dv) buffer to write into. ``config``: tile sizes and launch settings
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} (default on CUDA: tuned and cached on disk, see
    autotune_cache.py; the torch path reads only the tile sizes).
    Returns out in the model's token order, or (out, stats) when ``tile_stats``.
    """
    _check_tensors(q, k, v)
    plan = _as_plan(plan, block_size, q)
    _check_plan(plan, q, skip)
    backend = _pick_backend(backend, q, v)
    _check_config(config, backend)
    if out is None:
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    elif out.shape != q.shape[:3] + v.shape[3:] or out.dtype != q.dtype or out.device != q.device:
        want = tuple(q.shape[:3] + v.shape[3:])
        raise ValueError(f"out: expected {q.dtype} {want} on {q.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    if backend == "triton":
        return _triton_forward(q, k, v, plan, scale, skip, tile_stats, reverse, out, config)
    if backend == "torch":
        return _torch_forward(q, k, v, plan, scale, skip, tile_stats, reverse, out, config)
    computed = plan.drop(skip) if skip is not None else plan
    out.copy_(reference_attention(q, k, v, computed, scale))
    if not tile_stats:
        return out
    return out, reference_tile_stats(q, k, plan, scale, skip=skip, reverse=reverse)


# The tiled torch path runs when its padded work is below this share of the masked-rows path's G·N²
# (measured on CPU, 1 thread: equal speed at density 1 with 64-blocks; 60x slower on 5-token clusters).
TILED_WORK_SHARE = 0.75


def _torch_forward(q, k, v, plan, scale, skip, tile_stats, reverse, out, config):
    """The CPU path: tiles (cost ~ density) unless padding small segments would cost more than dense rows."""
    from .cpu_path import block_sparse_attention_torch, padded_area

    options = dict(skip=skip, tile_stats=tile_stats, reverse=reverse, out=out)
    if config is not None:
        return block_sparse_attention_torch(q, k, v, plan, scale, block_m=config["BLOCK_M"], block_n=config["BLOCK_N"], **options)
    if padded_area(plan, skip) <= TILED_WORK_SHARE * plan.groups * q.shape[2] ** 2:
        return block_sparse_attention_torch(q, k, v, plan, scale, **options)
    from .cpu_masked import masked_rows_attention  # many small segments (svg2 clusters): dense rows, masked

    return masked_rows_attention(q, k, v, plan, scale, **options)


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


def _check_config(config, backend: str) -> None:
    if config is None:
        return
    sizes = (config.get("BLOCK_M"), config.get("BLOCK_N")) if isinstance(config, dict) else (None, None)
    if not all(isinstance(x, int) and x > 0 for x in sizes):
        raise ValueError(f"config: expected a dict with positive int BLOCK_M and BLOCK_N, got {config!r}")
    if backend == "triton" and not all(x >= 16 and x & (x - 1) == 0 for x in sizes):
        raise ValueError(f"config: the Triton kernel needs BLOCK_M and BLOCK_N powers of two >= 16, got {sizes}")


def _pick_backend(backend: str, q, v) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} not supported; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend != "triton":
        return backend
    for name, d in (("q", q.shape[3]), ("v", v.shape[3])):
        if d not in TRITON_HEAD_DIMS:
            raise ValueError(f"{name}: head dim {d} not supported by the Triton kernel; allowed: {TRITON_HEAD_DIMS} (or backend='torch')")
    if not hasattr(triton, "testing"):
        raise ValueError("backend: 'triton' needs the triton package, which is not installed; use 'torch'")
    if q.device.type == "cpu" and not _interpreted():
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before vdit_sparse.kernels is imported")
    return backend


def _interpreted() -> bool:
    """True when the kernel was decorated under TRITON_INTERPRET=1 (Triton decides at decoration time)."""
    return type(_block_sparse_fwd).__name__ == "InterpretedFunction"

