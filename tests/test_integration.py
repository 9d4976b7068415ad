"""accelerate() through diffusers' hooks on the real tiny WanPipeline."""

import numpy as np
import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.methods import METHODS, Method
from vdit_sparse.plan import from_block_mask

from .conftest import run_tiny


class DiagonalBlocks(Method):
    """A test method: each query block attends to its own key block (density 1/blocks)."""

    name = "diagonal"

    def plan(self, q, k, ctx, params, v=None):
        B, H, N, _ = q.shape
        nb = -(-N // 16)
        mask = torch.eye(nb, dtype=torch.bool).expand(B, H, nb, nb).contiguous()
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        return from_block_mask(mask, (16, 16), N), {"stats": {"state_calls": float(ctx.state["calls"])}}


@pytest.fixture
def diagonal_method(monkeypatch):
    monkeypatch.setitem(METHODS, "diagonal", DiagonalBlocks)


def test_dense_matches_plain_pipeline_and_remove_is_bit_identical(tiny_pipe):
    ref = run_tiny(tiny_pipe)
    acc = vs.accelerate(tiny_pipe, attention="dense")
    try:
        dense = run_tiny(tiny_pipe)
    finally:
        acc.remove()
    assert np.abs(dense - ref).max() <= 1e-5
    assert np.array_equal(run_tiny(tiny_pipe), ref)


def test_sparse_run_then_remove_restores_bit_identical_output(tiny_pipe, diagonal_method):
    ref = run_tiny(tiny_pipe)
    acc = vs.accelerate(tiny_pipe, attention="diagonal")
    sparse = run_tiny(tiny_pipe)
    acc.remove()
    assert np.abs(sparse - ref).max() > 1e-3  # the method really changed attention
    assert np.array_equal(run_tiny(tiny_pipe), ref)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tiny_pipe.transformer.blocks)


def test_stats_cover_every_step_layer_and_branch(tiny_pipe, diagonal_method):
    acc = vs.accelerate(tiny_pipe, attention="diagonal", warmup_steps=1, dense_layers=1)
    try:
        run_tiny(tiny_pipe, steps=3)
        table = acc.stats()
    finally:
        acc.remove()
    layers = len(tiny_pipe.transformer.blocks)
    assert len(table) == 3 * 2 * layers  # steps × (cond, uncond) × layers
    seen = {(r["step"], r["branch"], r["layer"]) for r in table}
    assert seen == {(s, b, l) for s in range(3) for b in ("cond", "uncond") for l in range(layers)}
    for r in table:
        dense = r["step"] == 0 or r["layer"] == 0
        assert r["method"] == ("dense" if dense else "diagonal")
        # 9 frames -> 3 latent frames of 4x4 tokens = 48 tokens in 3 blocks of 16
        assert r["density"] == pytest.approx(1.0 if dense else 1 / 3)
        assert r["ms"] >= 0
    # method state is per (branch, layer): each saw its own calls, steps 1 and 2
    assert {r["state_calls"] for r in table if r["method"] == "diagonal"} == {1.0, 2.0}
    assert acc.summary()["calls"] == len(table)


def test_state_resets_between_runs_and_handles_do_not_share(tiny_pipe, diagonal_method):
    from vdit_sparse.pipelines.tiny import build_tiny_pipeline

    other = build_tiny_pipeline()
    other.set_progress_bar_config(disable=True)
    a = vs.accelerate(tiny_pipe, attention="diagonal")
    b = vs.accelerate(other, attention="dense")
    try:
        run_tiny(tiny_pipe, steps=2)
        run_tiny(tiny_pipe, steps=2)  # a second run starts from fresh per-run state
        run_tiny(other, steps=1)
        ta, tb = a.stats(), b.stats()
    finally:
        a.remove()
        b.remove()
    assert max(r["state_calls"] for r in ta) == 2.0
    assert {r["step"] for r in ta} == {0, 1}
    assert {r["method"] for r in tb} == {"dense"} and len(tb) == 2 * len(other.transformer.blocks)


def test_direct_transformer_calls_count_steps_without_a_cache_context(tiny_pipe, diagonal_method):
    t = tiny_pipe.transformer
    acc = vs.accelerate(t, attention="diagonal", warmup_steps=1)
    try:
        x = torch.randn(1, 16, 3, 8, 8)
        text = torch.randn(1, 16, 32)
        for _ in range(2):
            t(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text)
        table = acc.stats()
    finally:
        acc.remove()
    assert [r["method"] for r in table if r["layer"] == 1] == ["dense", "diagonal"]
    assert {r["branch"] for r in table} == {"default"}


def test_both_experts_of_a_two_transformer_pipeline(tiny_pipe):
    import copy

    from diffusers import WanPipeline

    comps = dict(tiny_pipe.components)
    comps["transformer_2"] = copy.deepcopy(tiny_pipe.transformer)
    pipe = WanPipeline(**comps, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    acc = vs.accelerate(pipe, attention="dense")
    try:
        run_tiny(pipe, steps=4)
        models = {r["model"] for r in acc.stats()}
    finally:
        acc.remove()
    assert models == {"transformer", "transformer_2"}


def test_bad_arguments_are_named(tiny_pipe):
    with pytest.raises(ValueError, match="attention='fast': unknown method; known methods are dense"):
        vs.accelerate(tiny_pipe, attention="fast")
    with pytest.raises(ValueError, match="cache='lru'"):
        vs.accelerate(tiny_pipe, cache="lru")
    with pytest.raises(ValueError, match="density=2"):
        vs.accelerate(tiny_pipe, attention="svg", density=2)
    with pytest.raises(ValueError, match="density: not a setting of attention='dense'"):
        vs.accelerate(tiny_pipe, attention="dense", density=0.5)
    with pytest.raises(ValueError, match="top_p: not a setting of attention='svg'; its settings are"):
        vs.accelerate(tiny_pipe, attention="svg", top_p=0.5)
    acc = vs.accelerate(tiny_pipe)
    try:
        with pytest.raises(ValueError, match="already accelerated"):
            vs.accelerate(tiny_pipe)
    finally:
        acc.remove()
    with pytest.raises(ValueError, match="has no transformer"):
        vs.accelerate(object())


def test_tuned_table_overrides_one_layer(tiny_pipe, diagonal_method):
    acc = vs.accelerate(tiny_pipe, attention="dense", tuned={2: {"attention": "diagonal"}})
    try:
        run_tiny(tiny_pipe, steps=1)
        methods = {r["layer"]: r["method"] for r in acc.stats()}
    finally:
        acc.remove()
    assert methods == {i: "diagonal" if i == 2 else "dense" for i in range(len(tiny_pipe.transformer.blocks))}


def test_compiled_and_eager_accelerated_pipelines_agree_without_recompiling_per_step(tiny_pipe, diagonal_method):
    from torch._dynamo.utils import counters

    plain = run_tiny(tiny_pipe, steps=4)  # before anything is installed: the reference for remove()
    acc = vs.accelerate(tiny_pipe, attention="diagonal", warmup_steps=1)
    try:
        eager = run_tiny(tiny_pipe, steps=4)
    finally:
        acc.remove()
    torch._dynamo.reset()
    counters.clear()
    acc = vs.accelerate(tiny_pipe, attention="diagonal", warmup_steps=1, compile="aot_eager")
    try:
        compiled = run_tiny(tiny_pipe, steps=4)
        methods = {r["method"] for r in acc.stats()}
    finally:
        acc.remove()
    assert np.abs(compiled - eager).max() <= 1e-4
    assert methods == {"dense", "diagonal"}
    # 4 steps × 2 branches: the frames compile once each, not once per step
    assert counters["stats"]["unique_graphs"] <= 12, dict(counters["stats"])
    assert tiny_pipe.transformer._compiled_call_impl is None
    assert np.array_equal(run_tiny(tiny_pipe, steps=4), plain)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("cache", ["none", "tileskip"])
def test_python_and_cli_resolve_the_same_settings(tiny_pipe, method, cache):
    """accelerate(pipe, attention=m) and `generate --attention m` resolve one RunSpec, defaults included."""
    import dataclasses

    from vdit_sparse.cli import build_parser
    from vdit_sparse.flags import parse_generation_args, request_from_args
    from vdit_sparse.generate import prepare
    from vdit_sparse.runspec import Shape

    args = parse_generation_args(build_parser(), ["generate", "p", "--attention", method, "--cache", cache])
    _, cli = prepare(request_from_args(args, "p"))
    acc = vs.accelerate(tiny_pipe, attention=method, cache=cache)
    acc.remove()
    assert cli.model == "tiny" and cli.shape.steps is not None  # what only the CLI knows: its model and shape
    assert acc.spec == dataclasses.replace(cli, model=None, shape=Shape())  # everything else, equal
    assert type(cli.settings) is METHODS[method].Settings and (cli.tileskip is not None) == (cache == "tileskip")
    assert cli.settings.warmup_steps == METHODS[method].Settings().warmup_steps


def test_python_and_cli_make_the_same_video(tiny_pipe):
    from vdit_sparse.cli import build_parser
    from vdit_sparse.flags import parse_generation_args, request_from_args
    from vdit_sparse.generate import run_generation

    argv = ["generate", "a red square moving right", "--attention", "svg", "--steps", "4", "--frames", "9",
            "--height", "64", "--width", "64", "--density", "0.4"]
    req = request_from_args(parse_generation_args(build_parser(), argv), argv[1])
    cli = run_generation(req, pipe=tiny_pipe, progress=False)
    acc = vs.accelerate(tiny_pipe, attention="svg", density=0.4)
    try:
        py = run_tiny(tiny_pipe, steps=4, guidance_scale=cli.config["model"]["guidance_scale"])
        methods = [r["method"] for r in acc.stats()]
    finally:
        acc.remove()
    assert methods.count("dense") == 2 * len(tiny_pipe.transformer.blocks)  # svg's default warm-up: 1 of 4 steps, 2 branches
    assert np.array_equal(cli.frames_float, py)
