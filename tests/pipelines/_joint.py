"""Test-only methods for joint [video; text] attention: they plan the video part, then attach the text,
which is what real methods do."""

import torch

from vdit_sparse.methods import Method
from vdit_sparse.plan import attach_text, from_block_mask

VIDEO_BLOCK = 16


def _video_plan(q, layout, diagonal: bool):
    B, H = q.shape[:2]
    nb = -(-layout.video_tokens // VIDEO_BLOCK)
    mask = torch.eye(nb, dtype=torch.bool) if diagonal else torch.ones(nb, nb, dtype=torch.bool)
    mask = mask.expand(B, H, nb, nb).contiguous()
    return from_block_mask(mask, (VIDEO_BLOCK, VIDEO_BLOCK), layout.video_tokens)


class VideoDiagonalText(Method):
    """Each video block attends to itself and to all text; text rows attend to everything."""

    name = "video_diagonal"
    seen: list = []  # (sequence length, layout) of every call, for the tests to inspect

    def plan(self, q, k, ctx, params, v=None):
        ctx.layout.check(q.shape[2])
        VideoDiagonalText.seen.append((q.shape[2], ctx.layout))
        return attach_text(_video_plan(q, ctx.layout, True), ctx.layout, text_block=4), {}


class VideoFullText(Method):
    """Every block, through the sparse kernel and attach_text: density 1.0 on the plan path."""

    name = "video_full"

    def plan(self, q, k, ctx, params, v=None):
        ctx.layout.check(q.shape[2])
        return attach_text(_video_plan(q, ctx.layout, False), ctx.layout, text_block=4), {}


def register(monkeypatch):
    from vdit_sparse.methods import METHODS

    VideoDiagonalText.seen.clear()
    for method in (VideoDiagonalText, VideoFullText):
        monkeypatch.setitem(METHODS, method.name, method)


def full_density_methods():
    """(name, overrides) that make each registered method compute every block."""
    from vdit_sparse.methods import METHODS

    settings = {
        "dense": {},
        "svg": {"density": 1.0, "warmup_steps": 0},  # direct transformer calls announce no step count
        "svg2": {"density": 1.0, "num_q_clusters": 4, "num_k_clusters": 4, "kmeans_iters_first": 2, "warmup_steps": 0},
    }
    return [(name, settings[name]) for name in sorted(METHODS) if name in settings] + [("video_full", {})]


def capture_attention(module):
    """Record the (video, text) outputs of one attention module; returns (records, remove)."""
    records = []
    handle = module.register_forward_hook(lambda mod, args, out: records.append(tuple(o.detach().clone() for o in out)))
    return records, handle.remove


def run_accelerated(target, fn, attention: str, **settings):
    """``fn()`` with ``target`` (a pipeline or transformer) accelerated; returns (its result, the stats)."""
    import vdit_sparse as vs

    acc = vs.accelerate(target, attention=attention, **settings)
    try:
        out = fn()
        return out, acc.stats()
    finally:
        acc.remove()


def check_sparse_run_then_remove(target, generate, attention: str = "video_diagonal"):
    """A sparse run changes the output; after remove() it is the reference again, bit for bit. Returns the stats."""
    ref = generate()
    sparse, table = run_accelerated(target, generate, attention)
    assert (sparse - ref).abs().max() > 1e-3
    assert torch.equal(generate(), ref)
    return table
