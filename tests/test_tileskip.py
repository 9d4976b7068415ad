"""Tile-skip caching on inputs whose negligible tiles are planted and fixed across steps."""

import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.kernels.reference import reference_attention
from vdit_sparse.plan import from_block_mask, full_plan
from vdit_sparse.tileskip import run_with_tileskip, threshold_at

from .conftest import run_tiny

NB, BS, D = 4, 32, 16  # 4 blocks of 32 tokens
N = NB * BS


def planted(important: torch.Tensor, gap: float = 40.0, seed: int = 0):
    """q, k, v (1, 1, N, D) whose block (i, j) logits sit near 0 when important[i, j], else about -gap.

    Query block i points along axis i; key block j holds -gap/scale on the axes of the query blocks
    it is negligible for, so logit(i, j) = -gap exactly there (plus small noise).
    """
    g = torch.Generator().manual_seed(seed)
    scale = D**-0.5
    q = torch.zeros(N, D)
    k = 0.05 * torch.randn(N, D, generator=g)
    for i in range(NB):
        q[i * BS:(i + 1) * BS, i] = 1.0
        for j in range(NB):
            if not important[i, j]:
                k[j * BS:(j + 1) * BS, i] -= gap / scale
    v = torch.randn(N, D, generator=g)
    return q[None, None], k[None, None], v[None, None]


IMPORTANT = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)  # column 0 first in scan


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def step(q, k, v, state, s, threshold=-10.0, refresh_every=5):
    plan = full_plan(1, 1, N, block=BS)
    return run_with_tileskip(q, k, v, plan, state, step=s, num_steps=None, threshold=threshold, refresh_every=refresh_every)


def test_marks_equal_the_planted_set_after_one_step_and_later_steps_skip_them():
    q, k, v = planted(IMPORTANT)
    state = {}
    out0, plan0, stats0 = step(q, k, v, state, 0)
    assert torch.equal(state["tileskip"].marks[0], ~IMPORTANT)
    assert float(stats0["tiles_skipped"]) == 0.0  # the first call computes everything
    dense = reference_attention(q, k, v, full_plan(1, 1, N, block=BS))
    out1, plan1, stats1 = step(q, k, v, state, 1)
    assert float(stats1["tiles_skipped"]) == pytest.approx(float((~IMPORTANT).float().mean()))
    assert float(plan1.density()) == pytest.approx(float(IMPORTANT.float().mean()))
    assert rel_err(out1, dense) < 1e-4 and rel_err(out0, dense) < 1e-5


def test_a_tile_that_becomes_important_is_restored_at_the_next_refresh():
    state = {}
    q, k, v = planted(IMPORTANT)
    step(q, k, v, state, 0, refresh_every=2)
    now = IMPORTANT.clone()
    now[0, 1] = True  # query block 0 starts attending to key block 1
    q2, k2, v2 = planted(now)
    dense2 = reference_attention(q2, k2, v2, full_plan(1, 1, N, block=BS))
    out1, _, _ = step(q2, k2, v2, state, 1, refresh_every=2)
    assert state["tileskip"].marks[0, 0, 1]  # still skipped between refreshes: the cost of caching
    assert rel_err(out1, dense2) > 0.05
    out2, _, stats2 = step(q2, k2, v2, state, 2, refresh_every=2)  # call 2: refresh
    assert float(stats2["refresh"]) == 1.0
    assert rel_err(out2, dense2) < 1e-5
    assert torch.equal(state["tileskip"].marks[0], ~now)


def test_a_reversed_scan_marks_only_tiles_the_forward_scan_marks():
    q, k, v = planted(IMPORTANT)
    forward, backward = {}, {}
    step(q, k, v, forward, 0)
    step(q, k, v, backward, 1)  # odd steps scan each key list backwards
    fwd, bwd = forward["tileskip"].marks[0], backward["tileskip"].marks[0]
    assert not (bwd & ~fwd).any()  # marks are conservative whatever the order
    assert not bwd[:, 3].any()  # the first tile scanned backwards has nothing to compare with


def test_marks_are_kept_per_state_and_dropped_for_heads_whose_segments_change():
    q, k, v = planted(IMPORTANT)
    a, b = {}, {}
    step(q, k, v, a, 0)
    other = IMPORTANT.clone()
    other[0, 1] = True
    step(*planted(other), b, 0)  # another state, other negligible tiles: its marks must not leak into a's
    assert torch.equal(a["tileskip"].marks[0], ~IMPORTANT) and torch.equal(b["tileskip"].marks[0], ~other)
    plan = full_plan(1, 1, N, block=BS)
    run_with_tileskip(q, k, v, plan, a, step=1, num_steps=None, threshold=-10.0, refresh_every=5,
                      identity=torch.tensor([7]))
    marks_before = a["tileskip"].marks.clone()
    assert marks_before.any()
    _, computed, stats = run_with_tileskip(q, k, v, plan, a, step=2, num_steps=None, threshold=-10.0,
                                           refresh_every=5, identity=torch.tensor([8]))
    assert float(stats["tiles_skipped"]) == 0.0  # the head's identity changed: nothing skipped from old marks
    assert torch.equal(a["tileskip"].marks, marks_before)  # and rebuilt from this call's statistics


def test_the_threshold_is_in_log2_units():
    """A tile 8 natural-log units below the row maximum is 11.5 log2 units below it: skipped at -10, kept at -12."""
    q, k, v = planted(IMPORTANT, gap=8.0)
    for threshold, marked in ((-10.0, True), (-12.0, False)):
        state = {}
        step(q, k, v, state, 0, threshold=threshold)
        assert torch.equal(state["tileskip"].marks[0], ~IMPORTANT if marked else torch.zeros_like(IMPORTANT)), threshold


def test_early_steps_use_a_stricter_threshold():
    assert threshold_at(-4.0, 0, 10) == -8.0
    assert threshold_at(-4.0, 10, 10) == -4.0
    assert threshold_at(-4.0, 5, None) == -4.0


def test_tileskip_composes_with_positional_plans():
    q, k, v = planted(IMPORTANT)
    mask = torch.ones(1, 1, NB, NB, dtype=torch.bool)
    mask[0, 0, 3, 2] = False
    plan = from_block_mask(mask, (BS, BS), N)
    state = {}
    run_with_tileskip(q, k, v, plan, state, step=0, num_steps=None, threshold=-10.0, refresh_every=5)
    _, computed, _ = run_with_tileskip(q, k, v, plan, state, step=1, num_steps=None, threshold=-10.0, refresh_every=5)
    expected = IMPORTANT.clone()
    expected[3, 2] = False
    assert torch.equal(computed.token_mask()[0, 0, ::BS, ::BS], expected)


def test_pipeline_keeps_marks_per_branch_and_layer_and_remove_releases_them(tiny_pipe):
    acc = vs.accelerate(tiny_pipe, attention="dense", cache="tileskip", threshold=-0.05, refresh_every=3, block_size=16)
    seen = {}

    def capture(pipe, i, t, kwargs):  # per-run state is gone once the pipeline returns: look mid-run
        seen.update({key: s["tileskip"].marks for key, s in acc.states.items()})
        return kwargs

    try:  # 17 frames -> 5 latent frames of 4x4 tokens: 80 tokens in 5 blocks of 16
        run_tiny(tiny_pipe, steps=3, frames=17, size=64, callback_on_step_end=capture)
        table = acc.stats()
        after_run = dict(acc.states.items())
    finally:
        acc.remove()
    state_keys, marks = set(seen), seen
    assert {(b, l) for b, _, l in state_keys} == {(b, l) for b in ("cond", "uncond") for l in range(len(tiny_pipe.transformer.blocks))}
    assert len({id(m) for m in marks.values()}) == len(marks)
    later = [r for r in table if r["step"] > 0]
    assert all(r["refresh"] == 0.0 for r in later)
    assert any(r["tiles_skipped"] > 0 for r in later)
    for r in later:  # the realised density counts the skipped tiles
        assert r["density"] == pytest.approx(1.0 - r["pairs_skipped"], abs=1e-6)
    assert after_run == {} and dict(acc.states.items()) == {}
