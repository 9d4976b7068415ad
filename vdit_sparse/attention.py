"""One attention call: plan with a method, run the plan (minus tile-skip marks), report the density."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .caches import TileSkip
from .layout import VideoLayout
from .methods import AttentionContext, Method, get_method, settings_for
from .plan import full_plan
from .settings import Settings
from .tileskip import run_with_tileskip


def check_qkv(q, k, v, layout: VideoLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a (B, H, N, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v: shapes must agree as (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    layout.check(q.shape[2], "q sequence length")


def run_method(q, k, v, ctx: AttentionContext, method: Method, settings: Settings, tileskip: TileSkip | None = None):
    """Plan and compute one call of q, k, v (B, H, N, D). Returns (out, info), ``info["density"]`` (B, H).

    This is the one way from a method to the kernel. ``out`` is None when the method planned nothing (dense)
    and no tile-skip cache runs: the caller makes its own dense call (the stock one, in a pipeline). With
    ``tileskip`` (the run's or the layer's TileSkip) the plan (every block, for dense) runs minus the tiles
    marked negligible at earlier calls of this (branch, layer), and the marks are updated (vdit_sparse.tileskip).
    """
    from .kernels.ops import run_plan

    if tileskip is True:  # before 0.3 a flag: the default cache
        tileskip = TileSkip()
    plan, info = method.plan(q, k, ctx, settings, v=v)
    out = None
    if tileskip:
        if plan is None:
            plan = full_plan(q.shape[0], q.shape[1], q.shape[2], tileskip.tile(settings), q.device)
        out, plan, stats = run_with_tileskip(
            q, k, v, plan, ctx.state, step=ctx.step, num_steps=ctx.num_steps, threshold=tileskip.threshold,
            refresh_every=tileskip.refresh_every, identity=info.get("segment_identity"),
        )
        info["stats"] = {**info.get("stats", {}), **stats}
    elif plan is not None:  # through the custom op, so torch.compile sees one opaque call with the plan as inputs
        out = run_plan(q, k, v, plan, 1.0 / math.sqrt(q.shape[-1]))
    info["density"] = plan.density() if plan is not None else torch.ones(q.shape[0], q.shape[1])
    info["plan"] = plan
    return out, info


def sparse_attention(q, k, v, layout: VideoLayout, method: str = "dense", **settings):
    """(out, info): attention of q, k, v (B, H, N, D) with ``method`` (one call, no cache).

    ``settings`` are the method's (``density``, ``top_p``, ...; see ``vdit_sparse.settings``).
    ``info["density"]`` is the realised density (mean over batch and heads, a float);
    ``info["density_per_head"]`` the (B, H) tensor. Methods add their own keys (DESIGN.md).
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout: expected a VideoLayout, got {type(layout).__name__}")
    check_qkv(q, k, v, layout)
    resolved = settings_for(method, settings)
    out, info = run_method(q, k, v, AttentionContext(layout=layout), get_method(method)(), resolved)
    if out is None:
        out = F.scaled_dot_product_attention(q, k, v)
    per_head = info.pop("density")
    info.pop("plan", None)
    info["density_per_head"] = per_head.cpu()
    info["density"] = float(per_head.mean())
    return out, info
