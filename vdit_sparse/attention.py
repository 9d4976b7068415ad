"""One attention call without a pipeline: plan with a method, run the plan, report the density."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import VideoLayout
from .methods import AttentionContext, get_method
from .params import Params
from .plan import full_plan
from .tileskip import run_with_tileskip

DENSE_BACKENDS = ("sdpa", "xformers", "reference")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def dense_attention(q, k, v, backend: str = "sdpa") -> torch.Tensor:
    """(B, H, N, D) full attention through torch SDPA, xformers, or the float32 reference."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        if not xformers_available():
            raise ValueError("backend='xformers': xformers is not installed (pip install 'vdit-sparse[xformers]')")
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "reference":
        scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) / math.sqrt(q.shape[-1])
        return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v.float()).to(q.dtype)
    raise ValueError(f"backend={backend!r}: unknown dense backend; known: {', '.join(DENSE_BACKENDS)}")


def check_qkv(q, k, v, layout: VideoLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a (B, H, N, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v: shapes must agree as (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    layout.check(q.shape[2], "q sequence length")


def run_method(q, k, v, ctx: AttentionContext, method: str, params: Params, dense_fn=None, cache: str = "none"):
    """Plan and compute one call. Returns (out (B, H, N, D), info) with ``info["density"]`` (B, H).

    With ``cache="tileskip"`` the plan (all blocks for dense) runs minus the tiles marked negligible
    at earlier calls of this (branch, layer), and the marks are updated (vdit_sparse.tileskip).
    """
    from .kernels.ops import run_plan

    plan, info = get_method(method).plan(q, k, ctx, params, v=v)
    if cache == "tileskip":
        if plan is None:
            plan = full_plan(q.shape[0], q.shape[1], q.shape[2], params.block_size, q.device)
        out, plan, stats = run_with_tileskip(
            q, k, v, plan, ctx.state, step=ctx.step, num_steps=ctx.num_steps, threshold=params.threshold,
            refresh_every=params.refresh_every, identity=info.get("segment_identity"),
        )
        info["stats"] = {**info.get("stats", {}), **stats}
    elif plan is None:
        out = dense_fn(q, k, v) if dense_fn is not None else dense_attention(q, k, v)
    else:  # through the custom op, so torch.compile sees one opaque call with the plan as inputs
        out = run_plan(q, k, v, plan, 1.0 / math.sqrt(q.shape[-1]))
    info["density"] = plan.density() if plan is not None else torch.ones(q.shape[0], q.shape[1])
    info["plan"] = plan
    return out, info


def sparse_attention(q, k, v, layout: VideoLayout, method: str = "dense", **params):
    """(out, info): attention of q, k, v (B, H, N, D) with ``method`` (one call, no cache).

    ``info["density"]`` is the realised density (mean over batch and heads, a float);
    ``info["density_per_head"]`` the (B, H) tensor. Methods add their own keys (DESIGN.md).
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout: expected a VideoLayout, got {type(layout).__name__}")
    check_qkv(q, k, v, layout)
    p = Params().updated(**params)
    out, info = run_method(q, k, v, AttentionContext(layout=layout), method, p)
    per_head = info.pop("density")
    info.pop("plan", None)
    info["density_per_head"] = per_head.cpu()
    info["density"] = float(per_head.mean())
    return out, info
