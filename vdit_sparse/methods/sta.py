"""sta: sliding tile attention, a static 3-D window of tiles around each query's tile; nothing is planned at run time.

The video's latent grid (frames × height × width tokens) is cut into tiles of ``tile = (tf, th, tw)``
tokens; tiles at the far edges are partial where a side does not divide (7 frames in tiles of 4: one
tile of 4, one of 3). Inside the kernel call the tokens are reordered so that each tile is one
contiguous segment of the plan (``q_perm`` / ``k_perm``, tile-major, frame-major inside a tile), as
svg's temporal heads are permuted, and query tile i computes the key tiles of its window:

    along each axis, the 2w + 1 tiles centred on the query's tile, slid inward at the edges of the video

with ``window = (wt, wh, ww)`` tiles each way along frames, height and width; (0, 0, 0) is the tile itself.
The published method counts the whole window in tiles: its (3, 3, 3) is (1, 1, 1) here. Sliding (the
published reference mask clamps the window's centre half a window from the edges, as neighbourhood
attention does) keeps every query at the same number of key tiles, 2w + 1 per axis or the whole axis when
it has fewer: a query at an edge sees the tiles next to the window it would have had, not fewer. The
published kernels need tiles that divide the grid; here edge tiles are partial (shorter segments).
Text rows and columns are computed densely.

The plan depends only on the layout, ``tile`` and ``window``: it is built at the first call of a
(branch, layer) and reused at every step (kept in ``ctx.state``), every head of a call sharing it.

Default window: the one whose plan density (dense text included) is closest to ``density`` (0.25, the
budget svg runs at) at the call's shape, so sta can be compared with svg and svg2 at a requested density; ties go to the window whose reach in tokens is most even across the
axes, then to the one that reaches further in time. The window is separable, so every candidate's
exact density is a product of per-axis sums: choosing costs O(tiles) arithmetic, once per shape.
``warmup_steps`` defaults to a quarter of the steps, as svg and svg2, so the three compare at equal budget.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..layout import VideoLayout
from ..plan import BlockPlan, attach_text
from ..settings import Settings, fraction, setting, warmup
from .base import AttentionContext, Method

DEFAULT_TILE = (4, 4, 4)
DEFAULT_DENSITY = 0.25  # what the default window aims at


def tile_shape(name, v):
    if not (isinstance(v, tuple) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
        raise ValueError(f"{name}={_shown(v)}: must be three positive integers [frames, height, width] of latent tokens")


def window_shape(name, v):
    if v is not None and not (
        isinstance(v, tuple) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    ):
        raise ValueError(f"{name}={_shown(v)}: must be three integers >= 0 [wt, wh, ww] (tiles each way), or null for "
                         f"the window of density closest to {DEFAULT_DENSITY}")


def _shown(v) -> str:
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


@dataclass(frozen=True)
class STASettings(Settings):
    method = "sta"

    tile: tuple = setting(DEFAULT_TILE, tile_shape, "latent tokens per tile [frames, height, width]; edge tiles may be partial")
    window: tuple | None = setting(
        None, window_shape,
        f"key tiles kept each way around the query's tile [wt, wh, ww]; null: the window of density closest to {DEFAULT_DENSITY}")
    density: float = setting(
        DEFAULT_DENSITY, fraction,
        "the plan density the default window aims at (used when window is null; the closest window wins)")
    warmup_steps: float = setting(0.25, warmup, "first steps run dense: a count, or a fraction of the steps when < 1")


class STA(Method):
    name = "sta"
    Settings = STASettings
    summary = "sliding tile attention: each query tile sees the key tiles of a fixed 3-D window around it (no planning)"
    # from the tile itself to 3 tiles each way, growing in time first (videos run longer than a tile grid is wide);
    # on a small grid several cover the whole video, and tune warns of those; --values gives a grid's own
    knobs = {"window": ((0, 0, 0), (1, 0, 0), (0, 1, 1), (2, 0, 0), (1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 3, 3))}

    def plan(self, q, k, ctx: AttentionContext, params: STASettings, v=None) -> tuple[BlockPlan | None, dict]:
        """q, k (B, H, N, D) -> (plan, info with ``window``: the window used, [wt, wh, ww])."""
        layout = ctx.layout
        layout.check(q.shape[2], "q sequence length")
        B, H = q.shape[:2]
        key = (layout, params.tile, params.window, params.density, B, H, str(q.device))
        cached = ctx.state.get("sta")
        if cached is None or cached[0] != key:  # the plan depends on shapes and settings only: once per layer
            window = params.window if params.window is not None else default_window(layout, params.tile, params.density)
            plan = build_plan(layout, params.tile, window, B, H, params.block_size, q.device)
            cached = ctx.state["sta"] = (key, plan, list(window))
        return cached[1], {"window": cached[2]}


# ----------------------------------------------------------------------------- tiles


def tile_counts(layout: VideoLayout, tile) -> tuple[int, int, int]:
    """Tiles along frames, height and width (the last one of an axis partial where ``tile`` does not divide it)."""
    return tuple(-(-size // t) for size, t in zip((layout.frames, layout.height, layout.width), tile))


def axis_sizes(size: int, tile: int) -> torch.Tensor:
    """(n,) int64 tokens of each tile along one axis of ``size`` tokens."""
    edges = torch.arange(0, size + tile, tile).clamp_max(size)[: -(-size // tile) + 1]
    return edges.diff()


def tile_of_token(layout: VideoLayout, tile, device=None) -> torch.Tensor:
    """(V,) int64 tile id (tile-major: frame tile, then height tile, then width tile) of each frame-major video token."""
    f = torch.arange(layout.frames, device=device)[:, None, None] // tile[0]
    y = torch.arange(layout.height, device=device)[None, :, None] // tile[1]
    x = torch.arange(layout.width, device=device)[None, None, :] // tile[2]
    _, nh, nw = tile_counts(layout, tile)
    return ((f * nh + y) * nw + x).reshape(-1)


def tile_order(layout: VideoLayout, tile, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm (V,) int64, sizes (tiles,) int64): plan position -> frame-major video token, tile after tile
    (frame-major inside a tile), and the tokens of each tile."""
    ids = tile_of_token(layout, tile, device)
    perm = torch.sort(ids, stable=True).indices
    sizes = torch.bincount(ids, minlength=math.prod(tile_counts(layout, tile)))
    return perm, sizes


# ----------------------------------------------------------------------------- window


def axis_window(n: int, w: int, device=None) -> torch.Tensor:
    """(n, n) bool over one axis's tiles: key tile j is in query tile i's window, the 2w + 1 tiles around i slid
    inside [0, n) (all n when there are fewer)."""
    i = torch.arange(n, device=device)
    if 2 * w + 1 >= n:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    centre = i.clamp(w, n - 1 - w)
    return (centre[:, None] - i[None, :]).abs() <= w


def tile_mask(layout: VideoLayout, tile, window, device=None) -> torch.Tensor:
    """(tiles, tiles) bool in tile-major order: the key tiles of each query tile, the product of the three axes' windows."""
    nt, nh, nw = tile_counts(layout, tile)
    mt, mh, mw = (axis_window(n, w, device) for n, w in zip((nt, nh, nw), window))
    full = mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
    return full.reshape(nt * nh * nw, nt * nh * nw)


def window_density(layout: VideoLayout, tile, window) -> float:
    """The exact density of the plan with ``window`` (text computed densely), from per-axis pair counts."""
    video = 1.0
    for size, t, w in zip((layout.frames, layout.height, layout.width), tile, window):
        sizes = axis_sizes(size, t).double()
        inside = axis_window(sizes.numel(), w).double()
        video *= float(sizes @ inside @ sizes)  # token pairs along this axis whose tiles are in one window
    N, V = layout.num_tokens, layout.video_tokens
    return (video + N * N - V * V) / (N * N)


def default_window(layout: VideoLayout, tile, density: float = DEFAULT_DENSITY) -> tuple[int, int, int]:
    """The window of plan density closest to ``density``; ties: the most even reach in tokens, then the furthest in time."""
    counts = tile_counts(layout, tile)

    def rank(window):
        reach = [w * t for w, t in zip(window, tile)]  # tokens each way the window spans beyond its tile
        return (round(abs(window_density(layout, tile, window) - density), 9), max(reach) - min(reach), -window[0], window)

    return min(itertools.product(*(range(n) for n in counts)), key=rank)


# ----------------------------------------------------------------------------- plan


def build_plan(layout: VideoLayout, tile, window, batch: int, heads: int, text_block: int = 64, device=None) -> BlockPlan:
    """The plan of every (batch, head): one segment per tile in tile-major order, each query tile listing the key
    tiles of its window (ascending), text attached densely."""
    perm, sizes = tile_order(layout, tile, device)
    mask = tile_mask(layout, tile, window, device)  # (S, S)
    G, V = batch * heads, layout.video_tokens
    counts = mask.sum(1)
    width = int(counts.max())
    index = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]  # listed tiles first, ascending
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).to(torch.int32)
    plan = BlockPlan(
        q_offsets=offsets.expand(G, -1).contiguous(),
        k_offsets=offsets.expand(G, -1).contiguous(),
        kv_count=counts.to(torch.int32).expand(G, -1).contiguous(),
        kv_index=index.to(torch.int32).expand(G, -1, -1).contiguous(),
        batch=batch,
        heads=heads,
        q_perm=perm.to(torch.int32).expand(G, V).contiguous(),
        k_perm=perm.to(torch.int32).expand(G, V).contiguous(),
        num_tokens=V,
    )
    return attach_text(plan, layout, text_block=text_block)
