"""Block-sparse attention on the CPU in time proportional to density: each query tile's kept keys
gathered into one softmax row, nothing else computed.

A query tile (up to ``block_m`` rows of one query segment) attends to the concatenation of its
computed key segments, in scan order: ``K_t`` keys. k and v are put in plan order once (O(N·D)), so a
segment is a run of rows. The tiles then run either through the compiled loop (``cpu_compiled.py``:
flash attention over the kept keys, the default wherever a C++ compiler exists; it builds the work list
itself and reads q through the permutation) or, as a fallback,
through PyTorch chunks: tiles sorted by ``K_t``, batched into chunks of equal (or nearly equal,
padded and masked) key count whose scores fit in the L2 cache (``SCORE_ELEMENTS``), each chunk one
gather, bmm, max, exp, sum and bmm. Both give the same outputs and the same tile statistics.

Why not online softmax over 64-key tiles (``cpu_path.py``): its small matmuls and per-step rescaling
cost as much as dense SDPA at density 0.25. Why not SDPA on the gathered keys: torch's CPU flash
kernel cuts a 64-row query into 32-row pieces and runs 1.5-2x slower per pair than on a whole
sequence. Why not FlexAttention: compiled per shape, and 1.7-1.8x at density 0.26 where the compiled
loop gives about 2.5x (kernels/NOTES.md, BENCHMARKS.md "CPU kernel").

The tile statistics come from the same scores: the max of each slot's columns, the running max in
scan order (``reverse`` flips the key list), their difference, max over the tile's rows. In the
chunks, padded query rows repeat the tile's last row (same token, same keys), so they write the
same output and the same statistics and need no mask.
"""

from __future__ import annotations

import torch

from vdit_sparse.plan import BlockPlan

from . import cpu_compiled
from .tiles import query_tiles

# Scores of one chunk: 256 Ki floats (1 MiB) stay in a core's L2 cache through bmm, exp and bmm.
SCORE_ELEMENTS = 1 << 18
# Largest share of a chunk's padded area that may be padding (key or query rows) before a new chunk starts,
# once the chunk holds more than FREE_PADDING scores: below that, padding costs less than another chunk's
# dozen small ops (about 0.2 ms on one core; 64 Ki scores compute in about as long).
MAX_PADDING = 0.2
FREE_PADDING = 1 << 16


def gathered_attention(q, k, v, plan: BlockPlan, scale: float, *, skip=None, tile_stats=False, reverse=False,
                       out=None, block_m: int = 64, compiled: bool | None = None):
    """(B, H, N, Dv) attention over ``plan`` (and (out, stats (G, Sq, L)) with ``tile_stats``); see block_sparse_attention.

    ``compiled``: run the tiles through the C++ loop (cpu_compiled.py); None: when it builds, False: never."""
    module = cpu_compiled.extension() if compiled is not False else None
    if compiled and module is None:
        raise RuntimeError("compiled=True: the CPU extension is not available on this machine (see the notice above)")
    if out is None:
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    G, N = plan.groups, plan.num_tokens
    Sq, L = plan.kv_index.shape[1], plan.kv_index.shape[2]
    stats = torch.full((G * Sq * L,), float("-inf"), device=q.device) if tile_stats else None
    if module is not None:
        _compiled(q, k, v, plan, scale, (skip, reverse, block_m), out, stats, module)
    else:
        _chunked(q, k, v, plan, scale, work_list(plan, skip, reverse, block_m), out, stats)
    return (out, stats.view(G, Sq, L)) if tile_stats else out


def _compiled(q, k, v, plan: BlockPlan, scale: float, options: tuple, out, stats, module) -> None:
    """The plan through the C++ loop, which builds the work list itself (tens of small torch ops here cost
    more than the attention at a few hundred tokens) and reads q and writes out in model order (through the
    query permutation itself, scale folded in), so neither is copied when they are float32 and contiguous.
    ``options``: (skip, reverse, block_m)."""
    B, H, N, D = q.shape
    G, Dv = plan.groups, v.shape[3]
    q_model = q.reshape(G * N, D).float().contiguous()
    kp, vp = (_plan_rows(x, plan.k_perm).contiguous() for x in (k, v))
    direct = out.dtype == torch.float32 and out.is_contiguous()
    result = out.view(G * N, Dv) if direct else torch.empty(G * N, Dv, device=q.device)
    cpu_compiled.run_plan(q_model, kp, vp, _model_rows(plan), plan, *options, result, stats, scale, module)
    if not direct:
        out.copy_(result.view(B, H, N, Dv))


def _chunked(q, k, v, plan: BlockPlan, scale: float, work: dict, out, stats) -> None:
    """The tiles through PyTorch chunks (no C++ compiler): in plan order, permuted back at the end."""
    B, H, N, D = q.shape
    G, Dv = plan.groups, v.shape[3]
    # (G·N, ·) float32 rows in plan order, scale folded into q: permuted once here, O(N·D), so every
    # segment is a run of consecutive rows and a block of keys is gathered as one piece
    qp = _plan_rows(q, plan.q_perm) * scale
    kp, vp = _plan_rows(k, plan.k_perm), _plan_rows(v, plan.k_perm)
    result = torch.zeros(G * N, Dv, dtype=torch.float32, device=q.device)  # plan order; tiles with no key stay zero
    widths, rows, blocks = work["host"]
    for c0, c1 in chunks(widths, rows, blocks):
        exact = widths[c0] == widths[c1 - 1]  # widths ascend: equal ends, no padded key column
        block = blocks[c0] if exact and blocks[c0] and len(set(blocks[c0:c1])) == 1 else 0
        _run_chunk(qp, kp, vp, work, slice(c0, c1), (widths[c1 - 1], max(rows[c0:c1]), block, exact), result, stats)
    if plan.q_perm is not None:  # plan order back to model order: a gather through the inverse permutation
        rows = _model_rows(plan)
        inverse = torch.empty_like(rows).scatter_(0, rows, torch.arange(G * N, device=q.device))
        result = result.index_select(0, inverse)  # index_copy_ of rows was 50x slower than this (torch 2.13)
    out.copy_(result.view(B, H, N, Dv))


def _model_rows(plan: BlockPlan):
    """(G·N,) int64: the model row of each plan row, or None without a query permutation."""
    if plan.q_perm is None:
        return None
    G, N = plan.groups, plan.num_tokens
    return (torch.arange(G, device=plan.q_perm.device)[:, None] * N + plan.q_perm.long()).view(-1)


def _plan_rows(x, perm):
    """(G·N, D) float32 rows of x (B, H, N, D) in plan order: row g·N + i holds token perm[g, i]."""
    B, H, N, D = x.shape
    rows = x.reshape(B * H * N, D).float()
    if perm is None:
        return rows
    # index_select of whole rows: torch.gather with an index expanded over D was 10x slower (torch 2.13)
    return rows.index_select(0, (torch.arange(B * H, device=x.device)[:, None] * N + perm.long()).view(-1))


def key_lists(plan: BlockPlan, skip, reverse: bool) -> dict:
    """Per (g, query segment) row (G·Sq rows): its computed key segments in scan order, compacted to the front.

    Returns (G·Sq, L) int64 ``lo`` (first plan position), ``size``, ``ends`` (cumulative key count after
    each slot: a slot's columns in the gathered row are ``ends - size .. ends``), ``entry`` (the kv_index
    position it came from), and (G·Sq,) ``total`` keys. Unused slots have size 0 and sit at the end.
    """
    G, Sq, L = plan.kv_index.shape
    Sk = plan.k_offsets.shape[1] - 1
    computed = plan.valid_entries() if skip is None else plan.valid_entries() & ~skip
    seg = plan.kv_index.long().clamp(0, max(Sk - 1, 0)).view(G, Sq * L)
    k_off = plan.k_offsets.long()  # (G, Sk + 1)
    lo = torch.gather(k_off, 1, seg).view(G, Sq, L)
    size = torch.where(computed, torch.gather(k_off, 1, seg + 1).view(G, Sq, L) - lo, 0)  # (G, Sq, L)
    entry = torch.arange(L, device=seg.device).expand(G, Sq, L)
    if reverse:
        lo, size, entry = lo.flip(2), size.flip(2), entry.flip(2)
    # stable: computed slots first, in scan order
    slot = torch.sort((size == 0).to(torch.int8), dim=2, stable=True).indices
    lo, size, entry = (torch.gather(t, 2, slot).reshape(G * Sq, L) for t in (lo, size, entry))
    ends = size.cumsum(1)
    return {"lo": lo, "ends": ends, "size": size, "entry": entry, "total": ends[:, -1]}


def work_list(plan: BlockPlan, skip, reverse: bool, block_m: int) -> dict:
    """Query tiles sorted by key count, with everything a chunk needs precomputed, so a chunk only slices.

    Per tile (T rows, sorted): ``q_rows`` (T, block_m) rows of the (G·N, ·) tensors (a short tile
    repeats its last row), ``q_first`` / ``q_end`` (T,) its first and end row, and per key-list slot (T, L): ``lo`` (first row), ``size``, ``ends``, and
    ``flat`` (its index in the (G·Sq·L,) statistics). ``host``: three lists, each tile's key count, query
    rows and slot size when all its slots share one (else 0), read in one device-to-host copy.
    """
    N, Sq, L = plan.num_tokens, plan.kv_index.shape[1], plan.kv_index.shape[2]
    keys = key_lists(plan, skip, reverse)
    tile_g, tile_s, tile_lo, tile_hi = (t.long() for t in query_tiles(plan.q_offsets, block_m))
    row = tile_g * Sq + tile_s  # (T,) the (g, query segment) of each tile
    order = torch.argsort(keys["total"][row], stable=True)
    row, base, lo, hi = row[order], tile_g[order] * N, tile_lo[order], tile_hi[order]
    size = keys["size"][row]  # (T, L)
    first = size[:, 0]
    equal = ((size == first[:, None]) | (size == 0)).all(1)
    host = torch.stack([keys["total"][row], hi - lo, torch.where(equal, first, 0)]).tolist()
    dev = plan.kv_index.device
    return {
        "q_rows": base[:, None] + torch.minimum(lo[:, None] + torch.arange(block_m, device=dev), hi[:, None] - 1),
        "q_first": base + lo,
        "q_end": base + hi,
        "lo": base[:, None] + keys["lo"][row],
        "size": size,
        "ends": keys["ends"][row],
        "flat": row[:, None] * L + keys["entry"][row],
        "host": host,
    }


def chunks(widths: list[int], rows: list[int], blocks: list[int]):
    """(start, end) runs of tiles (sorted by key count ``widths``) batched together: padded scores within
    SCORE_ELEMENTS (a single tile may exceed it), padding at most MAX_PADDING of the padded area (any
    padding in chunks of up to FREE_PADDING scores). A tile
    of whole blocks (``blocks`` > 0) takes no padding: block gathers beat padded row gathers.
    Tiles with no key get no chunk."""
    start, n = 0, len(widths)
    while start < n and widths[start] == 0:
        start += 1
    while start < n:
        end, area, top_rows = start + 1, widths[start] * rows[start], rows[start]
        while end < n:
            r = max(top_rows, rows[end])
            padded = (end + 1 - start) * r * widths[end]  # widths ascend: the new tile sets the width
            wasteful = padded > FREE_PADDING and area + widths[end] * rows[end] < (1 - MAX_PADDING) * padded
            if padded > SCORE_ELEMENTS or wasteful:
                break
            if widths[end] != widths[start] and (blocks[start] or blocks[end]):
                break
            area, top_rows, end = area + widths[end] * rows[end], r, end + 1
        yield start, end
        start = end


def _run_chunk(qp, kp, vp, work, tiles: slice, shape, result, stats):
    """One chunk of tiles: gather their query rows and kept keys, softmax over whole rows, write outputs.

    ``shape``: (W keys, M rows, the slot size when every slot is one such block else 0, whether every
    tile has exactly W keys)."""
    width, rows, block, exact = shape
    q_rows = work["q_rows"][tiles, :rows].reshape(-1)
    C, D = work["lo"][tiles].shape[0], qp.shape[1]
    qt = qp.index_select(0, q_rows).view(C, rows, D)
    col_slot = None
    if block:  # every slot one whole block: gather blocks, not rows
        starts = work["lo"][tiles, : width // block].reshape(-1)
        kt, vt = (_windows(x, block).index_select(0, starts).view(C, width, -1) for x in (kp, vp))
    else:
        ends, size = work["ends"][tiles], work["size"][tiles]  # (C, L)
        cols = torch.arange(width, device=qp.device)
        col_slot = torch.searchsorted(ends, cols.expand(C, -1).contiguous(), right=True)  # (C, W) each column's slot; L: padding
        slot = col_slot.clamp_max(ends.shape[1] - 1)
        k_rows = torch.gather(work["lo"][tiles] + size - ends, 1, slot) + cols  # slot's first row + column - slot's first column
        k_rows = k_rows.clamp_max(kp.shape[0] - 1).view(-1)  # padding columns read any row: masked below
        kt, vt = (x.index_select(0, k_rows).view(C, width, -1) for x in (kp, vp))
    scores = torch.bmm(qt, kt.transpose(1, 2))  # (C, M, W)
    if not exact:
        scores.masked_fill_((col_slot == ends.shape[1])[:, None, :], float("-inf"))
    if stats is None:
        row_max = scores.amax(2, keepdim=True)  # every tile here has a key: no row is all -inf
    else:  # the statistics' per-slot maxima give the row max without another pass over the scores
        row_max = _record_stats(stats, scores, block, col_slot, work["flat"][tiles])
    p = scores.sub_(row_max).exp_()  # in place; torch.softmax was 3x slower here (torch 2.13, 1 thread)
    o = torch.bmm(p, vt).div_(p.sum(2, keepdim=True))
    result.index_copy_(0, q_rows, o.view(C * rows, -1))  # padded rows write their twin's value


def _windows(x, size: int):
    """(R - size + 1, size, D) view of x (R, D): window i is rows i .. i + size - 1 (no copy)."""
    return x.as_strided((x.shape[0] - size + 1, size, x.shape[1]), (x.stride(0), x.stride(0), x.stride(1)))


def _record_stats(stats, scores, block, col_slot, flat):
    """Fold a chunk's scores into the flat (G·Sq·L,) statistics: per slot, max over rows of (the slot's
    max column) − (the running max after it). Slots are equal blocks of ``block`` columns, or (``block``
    0) given per column by ``col_slot`` (C, W), L for padding. ``flat`` (C, L): each slot's stats index.
    Returns the (C, M, 1) row maxima."""
    C, M, W = scores.shape
    L = flat.shape[1]
    if block:
        seg_max = scores.view(C, M, W // block, block).amax(3)
        seg_max = torch.cat([seg_max, seg_max.new_full((C, M, L - W // block), float("-inf"))], 2)
    else:  # clusters: a scatter, several times slower than the reshape
        seg_max = scores.new_full((C, M, L + 1), float("-inf"))
        seg_max = seg_max.scatter_reduce_(2, col_slot[:, None, :].expand(C, M, W), scores, reduce="amax")[..., :L]
    running = torch.cummax(seg_max, dim=2).values  # (C, M, L) in scan order; unused slots stay -inf
    rel = torch.where(seg_max == float("-inf"), float("-inf"), seg_max - running).amax(1)  # (C, L)
    stats.scatter_reduce_(0, flat.reshape(-1), rel.view(-1), reduce="amax")
    return running[..., -1:]
