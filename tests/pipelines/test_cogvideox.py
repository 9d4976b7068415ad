"""CogVideoX adapter on tiny random configs of the real diffusers classes: [text; video], (B, F, C, H, W) input."""

import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.layout import VideoLayout
from vdit_sparse.pipelines import CogVideoXAdapter, adapter_for

from ._joint import (
    VideoDiagonalText, capture_attention, check_sparse_run_then_remove, full_density_methods, register, run_accelerated,
)

TEXT = 5
VERSIONS = {"1.0": {}, "1.5": {"patch_size_t": 2, "patch_bias": False}}  # 1.5 also patches in time


def build_pipeline(version: str):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
        **VERSIONS[version],
    ).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=CogVideoXDDIMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("1.0")


@pytest.fixture
def methods(monkeypatch):
    register(monkeypatch)


def inputs(pipe, batch=2, frames=3, seed=1):
    """Direct transformer inputs for 3 latent frames of 8 × 8 (4 × 4 tokens each), rotary included."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, frames, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
        timestep=torch.tensor([500] * batch),
        image_rotary_emb=pipe._prepare_rotary_positional_embeddings(64, 64, frames, "cpu"),
    )


@torch.no_grad()
def run(transformer, **kw):
    return transformer(**kw, return_dict=False)[0]


def test_adapter_finds_attn1_and_reads_the_layout_from_the_config():
    t10, t15 = build_pipeline("1.0").transformer, build_pipeline("1.5").transformer
    assert adapter_for(t10) is CogVideoXAdapter and adapter_for(t15) is CogVideoXAdapter
    expected = [(i, b.attn1) for i, b in enumerate(t10.transformer_blocks)]
    assert CogVideoXAdapter.self_attention(t10) == expected
    x, text = torch.randn(1, 4, 4, 8, 12), torch.randn(1, TEXT, 16)  # (B, F, C, H, W)
    assert CogVideoXAdapter.layout(t10, (x, text), {}) == VideoLayout(4, 4, 6, text_tokens=TEXT, text_position="before")
    assert CogVideoXAdapter.layout(t15, (), dict(hidden_states=x, encoder_hidden_states=text)) == VideoLayout(
        2, 4, 6, text_tokens=TEXT, text_position="before"
    )
    with pytest.raises(ValueError, match="3 latent frames, not a multiple of the transformer's patch_size_t=2"):
        CogVideoXAdapter.layout(t15, (x[:, :3], text), {})


def test_dense_is_bit_identical_and_remove_restores_the_stock_processors(pipe):
    t, kw = pipe.transformer, inputs(pipe)
    ref = run(t, **kw)
    acc = vs.accelerate(t, attention="dense")
    try:
        dense = run(t, **kw)
        ours = {type(b.attn1.processor).__name__ for b in t.transformer_blocks}
    finally:
        acc.remove()
    assert ours == {"CogVideoXJointAttnProcessor"}
    assert torch.equal(dense, ref)
    assert {type(b.attn1.processor).__name__ for b in t.transformer_blocks} == {"CogVideoXAttnProcessor2_0"}


@pytest.mark.parametrize("method,overrides", full_density_methods())
def test_every_method_at_full_density_matches_dense(pipe, methods, method, overrides):
    t, kw = pipe.transformer, inputs(pipe)
    ref = run(t, **kw)
    out, rows = run_accelerated(t, lambda: run(t, **kw), method, **overrides)
    densities = [r["density"] for r in rows]
    assert (out - ref).abs().max() <= 1e-4
    assert densities == [pytest.approx(1.0)] * len(t.transformer_blocks)


def test_sparse_text_rows_equal_dense_rows(pipe, methods):
    t, kw = pipe.transformer, inputs(pipe)
    records, unhook = capture_attention(t.transformer_blocks[0].attn1)  # same inputs in both runs
    try:
        ref = run(t, **kw)
        acc = vs.accelerate(t, attention="video_diagonal")
        try:
            sparse = run(t, **kw)
        finally:
            acc.remove()
    finally:
        unhook()
    (ref_video, ref_text), (sp_video, sp_text) = records
    assert (sp_video - ref_video).abs().max() > 1e-3  # the method really dropped video blocks
    assert torch.allclose(sp_text, ref_text, atol=1e-6, rtol=0)  # text rows attend densely
    assert (sparse - ref).abs().max() > 1e-3
    n, layout = VideoDiagonalText.seen[0]
    assert (n, layout) == (TEXT + 48, VideoLayout(3, 4, 4, text_tokens=TEXT, text_position="before"))


def pipeline_generate(pipe, steps: int = 2):
    """``generate()`` of one fixed prompt (embeddings, with guidance: one batched call per step): latents out."""
    g = torch.Generator().manual_seed(2)
    prompt = dict(
        prompt_embeds=torch.randn(1, TEXT, 16, generator=g), negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g)
    )

    def generate():
        return pipe(**prompt, height=64, width=64, num_frames=9, num_inference_steps=steps, guidance_scale=6.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    return generate


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_pipeline_cfg_batch_sparse_run_then_remove_is_bit_identical(version, methods):
    pipe = build_pipeline(version)
    generate = pipeline_generate(pipe)

    table = check_sparse_run_then_remove(pipe, generate)
    # cond and uncond run as one batch: one branch, counted steps
    assert {(r["step"], r["branch"], r["layer"]) for r in table} == {(s, "cond_uncond", l) for s in (0, 1) for l in (0, 1)}
    frames = 3 if version == "1.0" else 2  # 1.5 pads 3 latent frames to 4, then patches pairs
    assert {layout.frames for _, layout in VideoDiagonalText.seen} == {frames}


def test_fractional_warmup_reads_the_step_count_from_the_scheduler(methods):
    """CogVideoX announces no step count: a fractional warm-up must count the scheduler's steps."""
    pipe = build_pipeline("1.0")
    g = torch.Generator().manual_seed(2)
    embeds = dict(prompt_embeds=torch.randn(1, TEXT, 16, generator=g), negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g))
    acc = vs.accelerate(pipe, attention="video_diagonal", warmup_steps=0.5)
    try:
        pipe(**embeds, height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=6.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
        by_step = {r["step"]: r["method"] for r in acc.stats()}
    finally:
        acc.remove()
    assert by_step == {0: "dense", 1: "dense", 2: "video_diagonal", 3: "video_diagonal"}
