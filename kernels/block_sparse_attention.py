"""Block-sparse flash attention over a BlockPlan: one fused Triton launch.

Reads top to bottom like Triton's fused-attention tutorial: the inner loop over a tile's key list,
the kernel, the host-side launch and configs, then ``block_sparse_attention_triton``, the wrapper
that checks what only the Triton kernel needs and runs it. The public entry, which checks the
arguments and picks this kernel or a torch path, is ``dispatch.py``; the tests compare both with
``reference.py``. Design notes and the reasons behind them: ``NOTES.md``.

One program computes one *query tile*: up to BLOCK_M plan rows of one query segment of one
batch·head ``g``. Rows are gathered through ``q_perm`` and keys/values through ``k_perm`` inside the
kernel, and the output is scattered back to the model's token order, so no permuted copy of q, k, v
or out exists. Softmax runs online in float32 with exp2 (log2 e folded into the scale).
"""

from __future__ import annotations

import torch

from vdit_sparse.plan import BlockPlan

from . import autotune_cache
from .tiles import query_tiles, tile_counts

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


# ---------------------------------------------------------------- host side: launch and configs


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


def _host_numbers(plan: BlockPlan, block_ms, with_density: bool):
    """Tile totals per BLOCK_M, and the mean density, in one device-to-host copy: a call's only sync."""
    values = [tile_counts(plan.q_offsets, bm).sum().double() for bm in block_ms]
    if with_density:
        values.append(plan.density().mean().double())
    numbers = torch.stack(values).tolist()
    return {bm: int(n) for bm, n in zip(block_ms, numbers)}, (numbers[-1] if with_density else None)


def _tuned_config(q, v, plan: BlockPlan, run, density: float | None = None):
    """The launch config for this (N, D, density band), tuned once and cached on disk."""
    density = float(plan.density().mean()) if density is None else density
    key = autotune_cache.tuning_key(q, v.shape[3], density, has_perm=plan.q_perm is not None or plan.k_perm is not None)

    def measure(cfg):  # into scratch buffers; a config whose output is not finite is rejected
        scratch = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
        run(cfg, scratch, None)
        if not bool(torch.isfinite(scratch).all()):
            return float("inf")
        return triton.testing.do_bench(lambda: run(cfg, scratch, None), warmup=5, rep=20, return_mode="median")

    return autotune_cache.default_cache().pick(key, autotune_cache.CANDIDATES, measure)


HEAD_DIMS = (16, 32, 64, 128)  # powers of two for tl.arange, >= 16 for tl.dot


def check_supported(q, v, config) -> None:
    """Raise ValueError for a call the Triton kernel cannot run: head dims, tile sizes, no triton, no GPU."""
    for name, d in (("q", q.shape[3]), ("v", v.shape[3])):
        if d not in HEAD_DIMS:
            raise ValueError(f"{name}: head dim {d} not supported by the Triton kernel; allowed: {HEAD_DIMS} (or backend='torch')")
    sizes = (config["BLOCK_M"], config["BLOCK_N"]) if config is not None else ()
    if not all(x >= 16 and x & (x - 1) == 0 for x in sizes):
        raise ValueError(f"config: the Triton kernel needs BLOCK_M and BLOCK_N powers of two >= 16, got {sizes}")
    if not hasattr(triton, "testing"):
        raise ValueError("backend: 'triton' needs the triton package, which is not installed; use 'torch'")
    if q.device.type == "cpu" and not _interpreted():
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before vdit_sparse.kernels is imported")


def _interpreted() -> bool:
    """True when the kernel was decorated under TRITON_INTERPRET=1 (Triton decides at decoration time)."""
    return type(_block_sparse_fwd).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------- wrapper


def block_sparse_attention_triton(
    q, k, v, plan: BlockPlan, scale: float, *, skip=None, tile_stats=False, reverse=False, out=None, config=None,
):
    """(B, H, N, Dv) attention over ``plan`` by the Triton kernel (and (out, stats) when ``tile_stats``).

    Arguments as for ``vdit_sparse.kernels.block_sparse_attention``, already checked there, except
    what only this kernel needs (``check_supported``). ``config``: None tunes on CUDA (cached on disk,
    autotune_cache.py) and takes INTERPRETER_CONFIG under the interpreter.
    """
    check_supported(q, v, config)
    if out is None:
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)  # (B, H, N, Dv)
    stats = torch.empty(0, dtype=torch.float32, device=q.device) if tile_stats else None
    tuning = config is None and q.device.type != "cpu"  # the interpreter runs a fixed small config
    config = INTERPRETER_CONFIG if config is None and not tuning else config
    block_ms = sorted({c["BLOCK_M"] for c in autotune_cache.CANDIDATES}) if tuning else [config["BLOCK_M"]]
    totals, density = _host_numbers(plan, block_ms, with_density=tuning)

    def run(cfg, out_buf, stats_buf):
        return _launch(q, k, v, plan, scale, skip, reverse, out_buf, stats_buf, cfg, totals.get(cfg["BLOCK_M"]))

    if tuning:
        config = _tuned_config(q, v, plan, run, density)
    tile_s, tile_g = run(config, out, stats)
    if not tile_stats:
        return out
    return out, _segment_stats(stats, tile_g, tile_s, plan)
