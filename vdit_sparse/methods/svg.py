"""svg: every head is spatial or temporal; a few sampled query rows decide which, at every call.

A *spatial* head attends to its own and nearby frames: a band of blocks around the diagonal in
frame-major order, plus (optionally) every key block of the first frame as an attention sink. A
*temporal* head attends to its own spatial position in other frames: the same band in
spatial-major order, reached by permuting that head's tokens, frame-major token ``f * P + p`` to
plan position ``p * F + f``, through the plan's ``q_perm`` / ``k_perm`` (the kernel gathers and
scatters; nothing is copied here). Text tokens, where the layout has them, are computed densely.

Profiling (each call, i.e. per layer and step past the policy's dense warm-up): ``num_sampled_rows``
video query rows, evenly spaced over the *whole* video sequence with an offset drawn from a
generator seeded by (layer, step). When ``num_sampled_rows >= frames`` every frame holds at least
one sampled row; with fewer rows, the rows stay evenly spread and the per-step offset moves them, so
successive steps see different frames. For each row the exact score row (all N keys) is computed
once; the spatial and temporal patterns are evaluated only at those rows (never as N×N masks), and
each (batch, head) takes the pattern with the lower error. The error is the relative L2 error of
the sampled rows' attention output when ``v`` is given, else the attention mass the pattern drops
(v-free, and it bounds the output error: o - o_pattern = dropped · (mean v dropped - mean v kept)).

Band width: the blocks are ranked (diagonal, then the sink, then ring after ring around the
diagonal, each ring's rows in bit-reversed order so a partly filled ring is spread evenly), and the
first k are kept, k chosen so the plan's exact density (BlockPlan.density(), text included) is
closest to the request: the realised density is within one block of it (±b²/N²), unless the
request lies below the dense text part plus the diagonal, which is then the floor.

Defaults: ``density`` 0.25 (the published method ran Wan at ~0.3 and showed artifacts below 0.2).
``dense_error`` None (off): measured on planted heads the best pattern drops < 0.01 of the mass,
on structureless random heads ~1 - density, and the realised density must stay the request's;
a head that runs dense costs 1 - density extra. Set it (e.g. 0.3) to let unclassifiable heads run
dense, at the price of density above the request (reported in ``info["density"]``).

Published shortcomings fixed here: rows sampled over the whole sequence (not the first frames);
batch > 1 with each batch element's heads classified independently; the band sized from the exact
plan density (not 1 - (1 - w/N)²); no state outside ``ctx.state``.
"""

from __future__ import annotations

import math

import torch

from ..layout import VideoLayout
from ..params import Params
from ..plan import BlockPlan, attach_text, uniform_offsets
from .base import AttentionContext, Method

DEFAULT_DENSITY = 0.25
PATTERNS = ("spatial", "temporal", "dense")
SPATIAL, TEMPORAL, DENSE = range(3)
_PROFILE_ELEMENTS = 1 << 25  # score entries per profiling chunk: bounds its memory at large N


class SVG(Method):
    name = "svg"

    def plan(self, q, k, ctx: AttentionContext, params: Params, v=None) -> tuple[BlockPlan | None, dict]:
        layout = ctx.layout
        layout.check(q.shape[2], "q sequence length")
        if v is not None and v.shape[:3] != q.shape[:3]:
            raise ValueError(f"v: expected shape (B, H, N, Dv) with (B, H, N) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
        B, H = q.shape[:2]
        density = DEFAULT_DENSITY if params.density is None else params.density
        if density >= 1.0:  # every block: run dense, exactly
            classes = torch.full((B, H), DENSE, dtype=torch.long)
            return None, _info(classes, None, None)
        masks = _cached_masks(ctx, layout, params.block_size, density, params.first_frame_sink, q.device)
        rows = sample_rows(layout, params.num_sampled_rows, ctx.layer, ctx.step).to(q.device)  # (R,) video-local
        allowed = row_patterns(masks, layout, params.block_size, rows)  # (2, R, N)
        errors = pattern_errors(q, k, rows + layout.video_start, allowed, v)  # (B, H, 2)
        classes = classify(errors, params.dense_error)  # (B, H)
        plan = build_plan(classes.to(q.device), masks, layout, params.block_size)
        return plan, _info(classes, errors, rows + layout.video_start)


def _info(classes, errors, rows) -> dict:
    flat = classes.flatten().cpu()
    info = {
        "head_pattern": [[PATTERNS[c] for c in row] for row in classes.cpu().tolist()],
        "stats": {name: float((flat == i).float().mean()) for i, name in enumerate(PATTERNS)},
    }
    if errors is not None:
        info["pattern_error"] = {"spatial": errors[..., SPATIAL].cpu(), "temporal": errors[..., TEMPORAL].cpu()}
        info["sampled_rows"] = rows.cpu()
    return info


# ----------------------------------------------------------------------------- masks


def band_mask(num_tokens: int, block: int, sink_blocks: int, target_pairs: float, device=None) -> torch.Tensor:
    """(nb, nb) bool block mask over ``num_tokens`` tokens: the diagonal, the first ``sink_blocks``
    key blocks, then rings around the diagonal, until the computed pairs are closest to ``target_pairs``."""
    nb = -(-num_tokens // block)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    dist = (i - j).abs()  # (nb, nb)
    ring = torch.where(dist == 0, 0, torch.where(j < sink_blocks, 1, dist + 1))
    spread = _bit_reverse(i.expand(nb, nb)) * 2 + (j > i)  # a row's two ring blocks are taken together
    priority = (ring * (2 * nb * 2) + spread) * nb + j  # unique, lower first; bit reversal < 2 nb
    order = priority.flatten().argsort()
    sizes = uniform_offsets(num_tokens, block, 1, device)[0].diff().long()  # (nb,) the last block may be short
    pairs = (sizes[:, None] * sizes[None, :]).flatten()[order].cumsum(0)  # (nb²,) after taking 1, 2, ... blocks
    take = int((pairs.double() - target_pairs).abs().argmin()) + 1
    take = max(take, nb)  # never below the diagonal: every query sees its own block
    keep = torch.zeros(nb * nb, dtype=torch.bool, device=device)
    keep[order[:take]] = True
    return keep.view(nb, nb)


def _bit_reverse(x: torch.Tensor) -> torch.Tensor:
    """Bit-reversed x over enough bits for x.max(): the first m of them are spread evenly over the range."""
    bits = max(1, int(x.max()).bit_length())
    out = torch.zeros_like(x)
    for b in range(bits):
        out |= ((x >> b) & 1) << (bits - 1 - b)
    return out


def video_masks(layout: VideoLayout, block: int, density: float, sink: bool, device=None) -> torch.Tensor:
    """(2, nb, nb) bool: spatial (frame-major, with sink) and temporal (spatial-major) block masks over the
    video tokens, each sized so the whole plan, dense text included, has ``density``."""
    V, N = layout.video_tokens, layout.num_tokens
    target = density * N * N - (N * N - V * V)  # text rows and columns are always computed
    sink_blocks = -(-layout.frame_tokens // block) if sink else 0
    spatial = band_mask(V, block, sink_blocks, target, device)
    temporal = band_mask(V, block, 0, target, device)
    return torch.stack([spatial, temporal])


def _cached_masks(ctx, layout, block, density, sink, device) -> torch.Tensor:
    # the masks depend only on shapes and knobs: build once per (branch, layer), reuse every step
    key = (layout, block, density, sink, str(device))
    cached = ctx.state.get("svg_masks")
    if cached is None or cached[0] != key:
        cached = (key, video_masks(layout, block, density, sink, device))
        ctx.state["svg_masks"] = cached
    return cached[1]


def spatial_major_position(layout: VideoLayout, tokens: torch.Tensor) -> torch.Tensor:
    """Plan position of frame-major video tokens in spatial-major order: (f, p) -> p * F + f."""
    return (tokens % layout.frame_tokens) * layout.frames + tokens // layout.frame_tokens


# ----------------------------------------------------------------------------- profiling


def sample_rows(layout: VideoLayout, num: int, layer: int, step: int) -> torch.Tensor:
    """(R,) int64 video-local query rows, R = min(num, video tokens), evenly spaced over the whole video
    with one offset drawn from (layer, step): with R >= frames, every frame holds a row."""
    V = layout.video_tokens
    R = min(num, V)
    gen = torch.Generator().manual_seed(layer * 1_000_003 + step)
    offset = torch.rand((), generator=gen, dtype=torch.float64)
    return ((torch.arange(R, dtype=torch.float64) + offset) * (V / R)).floor().long().clamp_max(V - 1)


def row_patterns(masks: torch.Tensor, layout: VideoLayout, block: int, rows: torch.Tensor) -> torch.Tensor:
    """(2, R, N) bool: which keys (model order) the sampled video rows see under each pattern."""
    V, dev = layout.video_tokens, masks.device
    keys = torch.arange(V, device=dev)
    spatial = masks[SPATIAL][rows // block][:, keys // block]  # (R, V)
    kpos = spatial_major_position(layout, keys)
    temporal = masks[TEMPORAL][spatial_major_position(layout, rows) // block][:, kpos // block]  # (R, V)
    allowed = torch.ones(2, rows.numel(), layout.num_tokens, dtype=torch.bool, device=dev)  # text columns: kept
    allowed[:, :, layout.video_start : layout.video_start + V] = torch.stack([spatial, temporal])
    return allowed


def pattern_errors(q, k, rows, allowed, v=None) -> torch.Tensor:
    """(B, H, 2) float32 error of each pattern on the sampled rows (model order): relative L2 error of the
    rows' output if ``v`` is given, else the mean attention mass the pattern drops."""
    B, H, N, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    chunk = max(1, _PROFILE_ELEMENTS // max(1, B * rows.numel() * N))  # heads per chunk
    keep = allowed.float()  # (2, R, N)
    out = []
    for h0 in range(0, H, chunk):  # chunks of heads bound memory; each chunk is one batched op
        h = slice(h0, h0 + chunk)
        scores = torch.matmul(q[:, h, rows], k[:, h].transpose(-1, -2)).float() * scale  # (B, h, R, N)
        probs = scores.softmax(-1)
        if v is None:
            kept = torch.einsum("bhrn,prn->bhpr", probs, keep)  # (B, h, 2, R)
            out.append((1 - kept).mean(-1))
            continue
        vh = v[:, h]
        exact = torch.matmul(probs.to(v.dtype), vh).float()  # (B, h, R, Dv)
        masked = probs[:, :, None] * keep  # (B, h, 2, R, N)
        masked = masked / masked.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        approx = torch.matmul(masked.to(v.dtype), vh[:, :, None]).float()  # (B, h, 2, R, Dv)
        err = (approx - exact[:, :, None]).flatten(-2).norm(dim=-1)
        out.append(err / exact.flatten(-2).norm(dim=-1)[..., None].clamp_min(1e-12))
    return torch.cat(out, 1)


def classify(errors: torch.Tensor, dense_error: float | None) -> torch.Tensor:
    """(B, H) long class per head: the pattern with the lower error, or dense when even that exceeds ``dense_error``."""
    best = errors.argmin(-1)
    if dense_error is not None:
        best = torch.where(errors.min(-1).values > dense_error, DENSE, best)
    return best


# ----------------------------------------------------------------------------- plan


def build_plan(classes: torch.Tensor, masks: torch.Tensor, layout: VideoLayout, block: int) -> BlockPlan:
    """The plan for heads of ``classes`` (B, H): band blocks over the video part in each head's own
    order, spatial-major through q_perm/k_perm for temporal heads, dense text attached."""
    B, H = classes.shape
    G, V, dev = B * H, layout.video_tokens, classes.device
    nb = masks.shape[-1]
    table = torch.cat([masks, torch.ones(1, nb, nb, dtype=torch.bool, device=dev)])  # (3, nb, nb) by class
    counts = table.sum(-1).to(torch.int32)  # (3, nb)
    present = torch.zeros(3, dtype=torch.bool, device=dev)
    present[classes.flatten()] = True
    width = max(1, int(counts[present].max()))
    # listed key blocks first, ascending; only as wide as the widest class in use needs
    index = torch.sort((~table).to(torch.int8), dim=-1, stable=True).indices[..., :width].to(torch.int32)  # (3, nb, width)
    cls = classes.flatten()  # (G,)
    perm = None
    if bool((cls == TEMPORAL).any()):
        identity = torch.arange(V, device=dev, dtype=torch.int32)
        spatial_major = layout.spatial_major_order(dev).to(torch.int32)  # plan position -> frame-major token
        perm = torch.where((cls == TEMPORAL)[:, None], spatial_major, identity).contiguous()  # (G, V)
    plan = BlockPlan(
        q_offsets=uniform_offsets(V, block, G, dev),
        k_offsets=uniform_offsets(V, block, G, dev),
        kv_count=counts[cls].contiguous(),
        kv_index=index[cls].contiguous(),
        batch=B,
        heads=H,
        q_perm=perm,
        k_perm=perm,
    )
    return attach_text(plan, layout, text_block=block)
