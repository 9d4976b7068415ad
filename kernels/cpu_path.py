"""Vectorised PyTorch block-sparse attention: runs any BlockPlan where no GPU is, in O(N·D) memory.

The same algorithm as the Triton kernel, batched over query tiles instead of launched per tile:
query segments are cut into tiles of ``block_m`` rows (the kernel's work list), each tile's listed
key segments into key tiles of ``block_n`` positions, and step ``j`` of the loop runs the j-th key
tile of every tile that still has one (one gather, two batched matmuls). Tiles are sorted by their number of key
tiles, so the tiles active at step j are a prefix: cost follows the computed tiles, i.e. the density.
Query tiles are processed in chunks, so memory stays bounded whatever N is; nothing is N x N.

Padding is the weak spot: a 5-token cluster still costs a full tile. ``padded_area`` measures that
cost, and the dispatcher (``dispatch.py``) sends such plans to the masked-rows path
(``cpu_masked.py``) instead.
"""

from __future__ import annotations

import torch

from vdit_sparse.plan import BlockPlan

from .tiles import query_tiles, tile_counts

# Scores, keys and the accumulator of one chunk hold at most about this many floats.
MAX_CHUNK_ELEMENTS = 1 << 22


def block_sparse_attention_torch(
    q, k, v, plan: BlockPlan, scale: float, *, skip=None, tile_stats=False, reverse=False, out=None,
    block_m: int = 64, block_n: int = 64,
):
    """(B, H, N, Dv) attention over ``plan`` (and (out, stats) when ``tile_stats``); see block_sparse_attention."""
    B, H, N, D = q.shape
    Dv, G = v.shape[3], plan.groups
    Sq, L = plan.kv_index.shape[1], plan.kv_index.shape[2]
    qg = q.reshape(G, N, D).float()  # (G, N, D) model order; float32 math like the kernel's accumulators
    kvg = torch.cat([k.reshape(G, N, D), v.reshape(G, N, Dv)], 2).float()  # (G, N, D + Dv): one gather per step
    tile_g, tile_s, tile_lo, tile_hi = (t.long() for t in query_tiles(plan.q_offsets, block_m))
    keys = _key_tiles(plan, skip, reverse, block_n)
    tile_row = tile_g * Sq + tile_s  # (T,) which (g, query segment) each tile belongs to
    width = keys["row_len"][tile_row]  # (T,) key tiles per query tile
    order = torch.argsort(width, descending=True, stable=True)  # active tiles at step j form a prefix
    result = torch.empty(G * N, Dv, dtype=torch.float32, device=q.device)  # (G·N, Dv) model order
    stats = torch.full((G * Sq, L), float("-inf"), device=q.device) if tile_stats else None
    chunk = max(1, MAX_CHUNK_ELEMENTS // (block_m * max(block_n, D + Dv)))
    for c0 in range(0, order.numel(), chunk):
        idx = order[c0 : c0 + chunk]
        tiles = (tile_g[idx], tile_lo[idx], tile_hi[idx], tile_row[idx], width[idx])
        _run_chunk(qg, kvg, plan, scale, tiles, keys, block_m, block_n, result, stats)
    if out is None:
        out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    out.copy_(result.view(B, H, N, Dv))
    return (out, stats.view(G, Sq, L)) if tile_stats else out


def _key_tiles(plan: BlockPlan, skip, reverse: bool, block_n: int) -> dict:
    """Every (g, query segment)'s key tiles in scan order, flattened: a row's tiles are contiguous.

    Returns (K,) tensors ``lo``, ``hi`` (plan positions), ``entry`` (the kv_index position l it comes
    from), ``first`` / ``last`` (first / last key tile of its entry), and per row (G·Sq,) ``row_first``
    and ``row_len``. Skipped entries, entries past kv_count and empty key segments get no tile.
    """
    G, Sq, L = plan.kv_index.shape
    dev = plan.kv_index.device
    seg_lo, seg_hi, count = _entry_key_tiles(plan, skip, block_n)
    entry = torch.arange(L, device=dev).expand(G, Sq, L)
    if reverse:
        seg_lo, seg_hi, count, entry = (t.flip(2) for t in (seg_lo, seg_hi, count, entry))
    count = count.reshape(-1)  # (G·Sq·L,) in scan order within each row
    total = int(count.sum())
    owner = torch.repeat_interleave(torch.arange(count.numel(), device=dev), count, output_size=total)  # (K,)
    within = torch.arange(total, device=dev) - (torch.cumsum(count, 0) - count)[owner]
    lo = seg_lo.reshape(-1)[owner] + within * block_n
    row_len = count.view(G * Sq, L).sum(1)  # (G·Sq,)
    return {
        "lo": lo,
        "hi": torch.minimum(lo + block_n, seg_hi.reshape(-1)[owner]),
        "entry": entry.reshape(-1)[owner],
        "first": within == 0,
        "last": within == count[owner] - 1,
        "row_first": torch.cumsum(row_len, 0) - row_len,
        "row_len": row_len,
    }


def _entry_key_tiles(plan: BlockPlan, skip, block_n: int):
    """Per plan entry (G, Sq, L): its key segment's first and end plan position, and its number of
    key tiles (0 for entries not computed: past kv_count, skipped, or an empty segment)."""
    G, Sq, L = plan.kv_index.shape
    Sk = plan.k_offsets.shape[1] - 1
    valid = torch.arange(L, device=plan.kv_index.device) < plan.kv_count[..., None]  # (G, Sq, L)
    if skip is not None:
        valid = valid & ~skip
    seg = plan.kv_index.long().clamp(0, max(Sk - 1, 0))
    k_off = plan.k_offsets.long()[:, None, :].expand(-1, Sq, -1)  # (G, Sq, Sk + 1)
    seg_lo = torch.gather(k_off, 2, seg)  # (G, Sq, L)
    seg_hi = torch.gather(k_off, 2, seg + 1)
    return seg_lo, seg_hi, torch.where(valid, (seg_hi - seg_lo + block_n - 1) // block_n, 0)


def padded_area(plan: BlockPlan, skip=None, block_m: int = 64, block_n: int = 64) -> int:
    """(query, key) pairs this path computes, tile padding included: its cost, to compare with G·N²."""
    q_tiles = tile_counts(plan.q_offsets, block_m)  # (G, Sq)
    key_tiles = _entry_key_tiles(plan, skip, block_n)[2].sum(2)  # (G, Sq)
    return int((q_tiles * key_tiles).sum()) * block_m * block_n


def _gather_rows(x, g, pos, perm):
    """(C, R, D) rows of x (G, N, D) at plan positions ``pos`` (C, R) of batch·heads ``g`` (C,)."""
    rows = pos if perm is None else perm.long()[g[:, None], pos]  # plan position -> model token
    return x[g[:, None], rows], rows


def _run_chunk(qg, kvg, plan, scale, tiles, keys, block_m, block_n, result, stats):
    """Attention of one chunk of query tiles (sorted by key-tile count, descending) into ``result``."""
    g, lo, hi, row, width = tiles
    N, D, dev = qg.shape[1], qg.shape[2], qg.device
    pos = lo[:, None] + torch.arange(block_m, device=dev)  # (C, BM) plan positions
    row_ok = pos < hi[:, None]
    qt, q_rows = _gather_rows(qg, g, pos.clamp_max(N - 1), plan.q_perm)  # (C, BM, D)
    qt.mul_(scale)  # fold the scale into q once instead of into every score tile
    C = g.numel()
    m = torch.full((C, block_m), float("-inf"), device=dev)  # running row max
    denom = torch.zeros(C, block_m, device=dev)
    acc = torch.zeros(C, block_m, kvg.shape[2] - D, device=dev)  # (C, BM, Dv)
    seg_max = torch.full((C, block_m), float("-inf"), device=dev) if stats is not None else None
    steps = int(width[0]) if C else 0
    active_at = (width[None, :] > torch.arange(steps, device=dev)[:, None]).sum(1).tolist()  # prefix sizes
    for j, n in enumerate(active_at):
        kt_id = keys["row_first"][row[:n]] + j  # (n,) this step's key tile of each active query tile
        kpos = keys["lo"][kt_id][:, None] + torch.arange(block_n, device=dev)  # (n, BN)
        col_ok = kpos < keys["hi"][kt_id][:, None]
        kv, _ = _gather_rows(kvg, g[:n], kpos.clamp_max(N - 1), plan.k_perm)  # (n, BN, D + Dv): one gather for both
        scores = torch.bmm(qt[:n], kv[..., :D].transpose(1, 2))  # (n, BM, BN)
        if not bool(col_ok.all()):
            scores.masked_fill_(~col_ok[:, None, :], float("-inf"))
        tile_max = scores.amax(2)  # (n, BM)
        m_new = torch.maximum(m[:n], tile_max)
        m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: avoid inf - inf
        alpha = torch.exp(m[:n] - m_ref)
        p = scores.sub_(m_ref[..., None]).exp_()  # in place: the scores are not needed again
        denom[:n].mul_(alpha).add_(p.sum(2))
        acc[:n].mul_(alpha[..., None]).add_(torch.bmm(p, kv[..., D:]))
        m[:n] = m_new
        if stats is not None:
            first = keys["first"][kt_id][:, None]
            seg_max[:n] = torch.where(first, tile_max, torch.maximum(seg_max[:n], tile_max))
            _record_stats(stats, seg_max[:n], m_new, row_ok[:n], row[:n], keys["entry"][kt_id], keys["last"][kt_id])
    o = acc / torch.where(denom > 0, denom, 1.0)[..., None]  # rows with no key give zeros
    flat_rows = g[:, None] * N + q_rows  # (C, BM) rows of result
    result[flat_rows[row_ok]] = o[row_ok]


def _record_stats(stats, seg_max, m, row_ok, row, entry, last):
    """At an entry's last key tile: its max over valid rows of (segment max - running max), into stats."""
    rel = torch.where(seg_max == float("-inf"), float("-inf"), seg_max - m)
    rel = torch.where(row_ok, rel, float("-inf")).amax(1)  # (n,)
    flat = row[last] * stats.shape[1] + entry[last]
    stats.view(-1).scatter_reduce_(0, flat, rel[last], reduce="amax")
