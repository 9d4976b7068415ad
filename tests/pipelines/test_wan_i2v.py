"""Wan image-to-video: image tokens live in cross-attention (attn2), which acceleration must leave alone."""

import numpy as np
import PIL.Image
import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.layout import VideoLayout
from vdit_sparse.pipelines import WanAdapter, adapter_for

from ._joint import register

IMAGE_DIM = 24


@pytest.fixture(scope="module")
def pipe():
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from vdit_sparse.pipelines.tiny import TRANSFORMER_CONFIG, build_components

    comps = build_components()  # prompts go in as embeddings: Wan I2V's prompt cleaning needs ftfy
    torch.manual_seed(3)
    vision = CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16,
    )
    comps["image_encoder"] = CLIPVisionModel(vision).eval()  # 2 × 2 patches + class token = 5 image tokens
    comps["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # Wan2.1 I2V: latents + mask + encoded image (16 + 4 + 16 channels), CLIP image tokens in attn2
    inner = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    config = dict(TRANSFORMER_CONFIG, in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=inner, num_layers=2)
    comps["transformer"] = WanTransformer3DModel(**config).eval()
    pipe = WanImageToVideoPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(pipe):
    return generate(pipe)


@pytest.fixture
def methods(monkeypatch):
    register(monkeypatch)


def generate(pipe):
    g = torch.Generator().manual_seed(0)
    image = PIL.Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    out = pipe(
        image=image,
        prompt_embeds=torch.randn(1, 16, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
        height=64, width=64, num_frames=5, num_inference_steps=2, max_sequence_length=16, output_type="latent",
        generator=torch.Generator().manual_seed(1),
    )
    return out.frames


def test_i2v_transformer_layout_counts_video_tokens_only(pipe):
    t = pipe.transformer
    assert adapter_for(t) is WanAdapter
    x = torch.randn(1, 36, 2, 8, 8)  # (B, latents + mask + image latents, F, H, W)
    assert WanAdapter.layout(t, (x,), {}) == VideoLayout(frames=2, height=4, width=4)
    assert [m for _, m in WanAdapter.self_attention(t)] == [b.attn1 for b in t.blocks]


def test_i2v_sparse_run_leaves_cross_attention_alone_and_remove_is_bit_identical(pipe, reference, methods):
    ref = reference
    cross = [b.attn2.processor for b in pipe.transformer.blocks]
    acc = vs.accelerate(pipe, attention="video_diagonal")
    try:
        assert [b.attn2.processor for b in pipe.transformer.blocks] == cross  # the same objects
        sparse = generate(pipe)
        table = acc.stats()
    finally:
        acc.remove()
    assert (sparse - ref).abs().max() > 1e-3
    assert torch.equal(generate(pipe), ref)
    assert {(r["branch"], r["layer"]) for r in table} == {(b, l) for b in ("cond", "uncond") for l in (0, 1)}
    assert {r["step"] for r in table} == {0, 1}


def test_i2v_dense_matches_the_plain_pipeline(pipe, reference):
    ref = reference
    acc = vs.accelerate(pipe, attention="dense")
    try:
        dense = generate(pipe)
    finally:
        acc.remove()
    assert np.abs((dense - ref).numpy()).max() <= 1e-5
