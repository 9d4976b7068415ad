"""Step-wise tile-skip caching: tiles found negligible at one step are not computed at later steps.

Which tiles of a head's attention are negligible barely changes between denoising steps
(LiteAttention). So while a plan runs, the kernel reports per computed tile (query segment ×
key segment) its largest logit relative to the row's running maximum; a tile more than
``threshold`` below it is marked, and marked tiles are dropped from the plans of later steps —
no QKᵀ, no softmax, no PV. The threshold is in log2 units, as LiteAttention publishes its
thresholds (-14.4 is -10 in natural log); the kernels report natural-log statistics, converted
once below. Every ``refresh_every`` calls of a (branch, layer)
the marks are rebuilt from a full run of the plan, so errors do not accumulate.

What is kept, per (branch, model, layer), on the accelerate handle: a (G, Sq, Sk) bool matrix of
marks, one byte per tile per head, plus each head's *segment identity*. Tiles are keyed by
(query segment, key segment): for dense and svg those are positional blocks; for svg2 they are
cluster pairs, whose identity persists through the centroid warm start. A method that changes
what a head's segments mean (svg re-classifying a head from spatial to temporal) reports a new
identity for it and that head's marks are dropped.

Stricter early: the threshold used at step t of T is ``threshold · (2 − t / T)``, twice as strict
(in log space) at the first step as at the last, because early steps shape the video most.
The scan direction over a query segment's key list alternates between calls: a mark depends on
the running maximum seen so far, so alternating keeps it from depending on one scan order.
Marks are conservative: the running maximum never exceeds the row's final maximum, so a tile's
relative logit against it is never below its relative logit against the final one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import BlockPlan

LOG2E = 1.4426950408889634  # natural-log statistics x LOG2E = log2 units


@dataclass
class TileMarks:
    marks: torch.Tensor  # (G, Sq, Sk) bool: negligible (query segment, key segment) pairs
    identity: torch.Tensor | None  # (G,) int64 segment identity per head, or None
    calls: int = 0  # calls since the marks were last rebuilt
    planned_pairs: torch.Tensor | float = 0.0  # running totals for the cumulative skipped share
    skipped_pairs: torch.Tensor | float = 0.0


def threshold_at(threshold: float, step: int, num_steps: int | None) -> float:
    """The log2-space bound at ``step``: twice as strict at the first step as at the last."""
    if not num_steps:
        return threshold
    return threshold * (2.0 - min(step, num_steps) / num_steps)


def run_with_tileskip(q, k, v, plan: BlockPlan, state: dict, *, step: int, num_steps: int | None,
                      threshold: float, refresh_every: int, identity: torch.Tensor | None = None):
    """Run ``plan`` minus the tiles marked at earlier calls; update the marks. Returns (out, computed plan, stats)."""
    from .kernels import block_sparse_attention

    G, Sq, Sk = plan.groups, plan.q_offsets.shape[1] - 1, plan.k_offsets.shape[1] - 1
    cached: TileMarks | None = state.get("tileskip")
    refresh = cached is None or cached.marks.shape != (G, Sq, Sk) or cached.calls % refresh_every == 0
    if refresh:
        marks = torch.zeros(G, Sq, Sk, dtype=torch.bool, device=plan.kv_index.device)
        totals = (cached.planned_pairs, cached.skipped_pairs) if cached is not None else (0.0, 0.0)
        cached = TileMarks(marks, identity, 0, *totals)
        state["tileskip"] = cached
    elif identity is not None and cached.identity is not None:
        changed = identity != cached.identity  # (G,) heads whose segments now mean other tokens
        cached.marks[changed] = False
    cached.identity = identity

    valid = plan.valid_entries()
    idx = plan.kv_index.long().clamp(0, Sk - 1)  # (G, Sq, L)
    skip = torch.gather(cached.marks, 2, idx) & valid  # marked tiles among this plan's entries
    out, tile_stats = block_sparse_attention(
        q, k, v, plan, skip=skip if not refresh else None, tile_stats=True, reverse=bool(step % 2)
    )
    negligible = (tile_stats * LOG2E < threshold_at(threshold, step, num_steps)) & valid & ~skip
    # entries past kv_count write into a spare column, so they cannot clear a real mark
    target = torch.where(valid, idx, Sk)
    extended = torch.cat([cached.marks, cached.marks.new_zeros(G, Sq, 1)], 2)
    extended.scatter_(2, target, torch.gather(extended, 2, target) | negligible)
    cached.marks = extended[..., :Sk].contiguous()
    cached.calls += 1

    # statistics stay tensors: reading them here would synchronise the GPU on every call
    planned, skipped = plan.pairs().sum(), plan.pairs(skip).sum()
    cached.planned_pairs = cached.planned_pairs + planned
    cached.skipped_pairs = cached.skipped_pairs + skipped
    stats = {
        "tiles_skipped": skip.sum() / valid.sum().clamp_min(1),
        "pairs_skipped": skipped / planned.clamp_min(1.0),
        "pairs_skipped_cumulative": cached.skipped_pairs / cached.planned_pairs.clamp_min(1.0),
        "tiles_marked": cached.marks.float().mean(),
        "refresh": float(refresh),
    }
    computed = plan.drop(skip) if not refresh else plan
    return out, computed, stats
