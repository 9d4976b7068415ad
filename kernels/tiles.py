"""The work list shared by the Triton kernel and the torch path: query segments cut into tiles."""

from __future__ import annotations

import torch


def query_tiles(q_offsets: torch.Tensor, block_m: int, total: int | None = None):
    """The work list: every query segment cut into tiles of ``block_m`` plan rows (the last one short).

    Returns four (T,) int32 tensors: batch·head ``g``, segment ``s``, first and end plan position.
    Empty segments get no tile. Vectorised: no Python loop over segments. ``total``, the number of
    tiles when the caller already knows it, saves a device-to-host sync.
    """
    G, S1 = q_offsets.shape
    off = q_offsets.long()
    ntiles = tile_counts(q_offsets, block_m).reshape(-1)  # (G * Sq,)
    total = int(ntiles.sum()) if total is None else total
    seg_ids = torch.repeat_interleave(torch.arange(ntiles.numel(), device=off.device), ntiles, output_size=total)
    first_tile = torch.cumsum(ntiles, 0) - ntiles  # (G * Sq,) index of each segment's first tile
    within = torch.arange(total, device=off.device) - first_tile[seg_ids]
    start = off[:, :-1].reshape(-1)[seg_ids] + within * block_m  # (T,)
    end = torch.minimum(start + block_m, off[:, 1:].reshape(-1)[seg_ids])
    g, s = seg_ids // (S1 - 1), seg_ids % (S1 - 1)
    return tuple(x.to(torch.int32).contiguous() for x in (g, s, start, end))


def tile_counts(q_offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """(G, Sq) int64: tiles of ``block_m`` rows per query segment (the work list's length, per segment)."""
    return (q_offsets.diff(dim=1).long() + block_m - 1) // block_m
