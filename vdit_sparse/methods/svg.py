"""svg: every head is spatial or temporal; a few sampled query rows decide which, at every call.

A *spatial* head attends to its own and nearby frames: a band of blocks around the diagonal in
frame-major order, plus (``first_frame_sink``) every key block of the first frame. A *temporal*
head attends to its own spatial position in other frames: the same band in spatial-major order,
reached by permuting that head's tokens, frame-major ``f * P + p`` to plan position ``p * F + f``,
through the plan's ``q_perm`` / ``k_perm`` (the kernel gathers and scatters; nothing is copied).
The sink belongs to the spatial pattern only: in spatial-major order the first frame is spread over
every block. Text tokens, where the layout has them, are computed densely (rows and columns).

Profiling, at every call (per layer and step once the policy's dense warm-up is over):
``num_sampled_rows`` video query rows, evenly spaced over the *whole* video with one offset drawn
from a generator seeded by (layer, step). With ``num_sampled_rows >= frames`` every frame holds a
sampled row; with fewer, the rows stay evenly spread and the offset moves them from step to step.
Each row's exact scores against all N keys are computed once; both patterns are evaluated at those
rows only (never as N×N masks), and each (batch, head) takes the pattern with the lower error. The
error is the relative L2 error of the rows' attention output when ``plan`` gets ``v``, else the
attention mass the pattern drops (v-free; it drives the output error:
o - o_pattern = dropped · (mean of dropped v - mean of kept v)).

Band width: blocks join the pattern in a fixed order (diagonal, sink, then ring after ring around
the diagonal, a ring's rows in bit-reversed order so a partly taken ring is spread evenly) and the
count is chosen so that the plan's exact density (BlockPlan.density(), dense text included) is
closest to the request: within one block (b²/N²) of it. A request below the floor (dense text
plus the diagonal) gets the floor.

Defaults. ``density`` 0.25 (the published method ran Wan at ~0.3 and showed artifacts below 0.2).
``dense_error`` None: off. Measured (16 frames × 8 × 8, block 32, density 0.25, dropped mass of
the better pattern): planted heads at logit 12 / 6 / 3: < 0.001 / 0.06-0.19 / 0.39-0.65, and
heads with no structure 0.75 (≈ 1 - density). The output error on the sampled rows was 1.3-1.5×
the dropped mass on planted heads and ~2.3× on structureless ones. Off by default because a dense
head costs 1 - density of budget: the request would no longer be the realised density, which the
tuner and the reports rely on. 0.5 (dropped mass; about 1.0 in the output-error units) sends only
heads that keep less than half of their attention mass dense: use it where quality matters more
than the budget; ``info["density"]`` reports the cost.

Published shortcomings fixed here: rows sampled over the whole sequence (not the first frames);
batch > 1, each batch element's heads classified on their own; the band sized from the exact plan
density (not 1 - (1 - w/N)²); no state outside ``ctx.state``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import VideoLayout
from ..settings import Settings, flag, fraction, optional_positive, positive_int, setting, warmup
from ..plan import BlockPlan, attach_text, from_head_patterns, uniform_offsets
from .base import AttentionContext, Method

DEFAULT_DENSITY = 0.25
PATTERNS = ("spatial", "temporal", "dense")
SPATIAL, TEMPORAL, DENSE = range(3)
_PROFILE_ELEMENTS = 1 << 25  # score entries per profiling chunk: bounds its memory at large N


@dataclass(frozen=True)
class SVGSettings(Settings):
    method = "svg"

    density: float = setting(DEFAULT_DENSITY, fraction, "fraction of the attention matrix computed, in (0, 1]")
    num_sampled_rows: int = setting(64, positive_int, "query rows profiled per head to classify it")
    first_frame_sink: bool = setting(True, flag, "spatial heads also attend to the whole first frame")
    dense_error: float | None = setting(
        None, optional_positive, "a head whose better pattern errs more than this runs dense (null: off)")
    warmup_steps: float = setting(0.25, warmup, "first steps run dense: a count, or a fraction of the steps when < 1")


class SVG(Method):
    name = "svg"
    Settings = SVGSettings
    summary = "each head profiled online as spatial or temporal; temporal heads permuted to a dense band"
    knobs = {"density": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)}

    def plan(self, q, k, ctx: AttentionContext, params: SVGSettings, v=None) -> tuple[BlockPlan | None, dict]:
        """q, k (B, H, N, D) -> (plan, info with head_pattern [B][H], stats, pattern_error, sampled_rows).

        ``v`` (B, H, N, Dv), optional: profile by the rows' output error instead of the dropped mass.
        """
        layout = ctx.layout
        layout.check(q.shape[2], "q sequence length")
        if v is not None and v.shape[:3] != q.shape[:3]:
            raise ValueError(f"v: expected shape (B, H, N, Dv) with (B, H, N) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
        B, H = q.shape[:2]
        density = params.density
        if density >= 1.0:  # every block: run dense, exactly
            classes = torch.full((B, H), DENSE, dtype=torch.long)
            return None, _info(classes, None, None)
        masks = _cached_masks(ctx, layout, params.block_size, density, params.first_frame_sink, q.device)
        rows = sample_rows(layout, params.num_sampled_rows, ctx.layer, ctx.step).to(q.device)  # (R,) video-local
        allowed = row_patterns(masks, layout, params.block_size, rows)  # (2, R, N)
        errors = pattern_errors(q, k, rows + layout.video_start, allowed, v)  # (B, H, 2)
        classes = classify(errors, params.dense_error)  # (B, H)
        plan = build_plan(classes.to(q.device), masks, layout, params.block_size)
        info = _info(classes, errors, rows + layout.video_start)
        info["segment_identity"] = classes.flatten().to(q.device)  # (B·H,) a re-classified head's tiles mean other tokens
        return plan, info


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
    order = _block_priority(nb, sink_blocks, device).flatten().argsort()
    sizes = uniform_offsets(num_tokens, block, 1, device)[0].diff().long()  # (nb,) the last block may be short
    pairs = (sizes[:, None] * sizes[None, :]).flatten()[order].cumsum(0)  # (nb²,) after taking 1, 2, ... blocks
    take = int((pairs.double() - target_pairs).abs().argmin()) + 1
    take = max(take, nb)  # never below the diagonal: every query sees its own block
    keep = torch.zeros(nb * nb, dtype=torch.bool, device=device)
    keep[order[:take]] = True
    return keep.view(nb, nb)


def _block_priority(nb: int, sink_blocks: int, device=None) -> torch.Tensor:
    """(nb, nb) int64, unique: the order in which blocks join the pattern, lowest first.

    Diagonal, then the sink columns, then ring d = 1, 2, ... around the diagonal. Inside a ring the
    rows come in bit-reversed order, so a partly taken ring is spread evenly over the sequence; a
    band block (i, j) comes with its mirror (j, i), a sink row with all its sink columns.
    """
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    dist = (i - j).abs()
    sink = (j < sink_blocks) & (dist > 0)
    ring = torch.where(dist == 0, 0, torch.where(sink, 1, dist + 1))  # (nb, nb)
    row = torch.where(sink, i, torch.minimum(i, j))
    spread = _bit_reverse(row) * 2 + (j > i)  # < 4 nb
    return ((ring * 4 * nb + spread) * nb + i) * nb + j


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
        exact = torch.matmul(probs.to(v.dtype), v[:, h]).float()  # (B, h, R, Dv)
        norm = exact.flatten(-2).norm(dim=-1).clamp_min(1e-12)  # (B, h)
        errs = []
        for pattern in keep:  # (R, N) each: one masked copy of the probabilities at a time
            kept = probs * pattern
            kept = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            approx = torch.matmul(kept.to(v.dtype), v[:, h]).float()  # (B, h, R, Dv)
            errs.append((approx - exact).flatten(-2).norm(dim=-1) / norm)
        out.append(torch.stack(errs, -1))
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
    table = torch.cat([masks, torch.ones_like(masks[:1])])  # (3, nb, nb) by class: spatial, temporal, dense
    orders = [None] * len(PATTERNS)
    orders[TEMPORAL] = layout.spatial_major_order(classes.device)  # plan position -> frame-major token
    plan = from_head_patterns(table, classes, block, layout.video_tokens, orders)
    return attach_text(plan, layout, text_block=block)
