"""HunyuanVideo adapter on tiny random configs of the real diffusers classes: [video; padded text]."""

import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.layout import VideoLayout
from vdit_sparse.pipelines import HunyuanVideoAdapter, adapter_for

from ._joint import (
    VideoDiagonalText, capture_attention, check_sparse_run_then_remove, full_density_methods, register, run_accelerated,
)

TEXT, REAL = 6, 4  # prompt tokens, of which the first REAL are not padding
VIDEO = 3 * 4 * 4  # latents (B, 4, 3, 8, 8) with patch 2: 3 frames of 4 × 4 tokens


def build_transformer(**overrides):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    config = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )
    return HunyuanVideoTransformer3DModel(**{**config, **overrides}).eval()


@pytest.fixture(scope="module")
def transformer():
    return build_transformer()


@pytest.fixture
def methods(monkeypatch):
    register(monkeypatch)


def inputs(batch=1, real=(REAL,), seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(TEXT)[None] < torch.tensor(real)[:, None]).long()  # (B, TEXT), real tokens first
    return dict(
        hidden_states=torch.randn(batch, 4, 3, 8, 8, generator=g), timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g), encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g), guidance=torch.tensor([6000.0] * batch),
    )


@torch.no_grad()
def run(transformer, **kw):
    return transformer(**kw, return_dict=False)[0]


def test_adapter_lists_double_then_single_blocks_and_reads_the_layout_from_the_config():
    t = build_transformer(num_layers=2, num_single_layers=1, patch_size_t=2)
    assert adapter_for(t) is HunyuanVideoAdapter
    layers = HunyuanVideoAdapter.self_attention(t)
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    assert [m for _, m in layers] == [b.attn for b in blocks]
    assert [i for i, _ in layers] == [0, 1, 2]
    x, text = torch.randn(2, 4, 4, 8, 12), torch.randn(2, TEXT, 16)
    padded = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
    layout = HunyuanVideoAdapter.layout(t, (x, None, text, padded), {})
    assert layout == VideoLayout(frames=2, height=4, width=6, text_tokens=3, text_position="after")
    # prompts padded to different lengths cannot share one cut: the layout keeps the padded text
    mixed = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    kw = dict(hidden_states=x, encoder_hidden_states=text, encoder_attention_mask=mixed)
    assert HunyuanVideoAdapter.layout(t, (), kw).text_tokens == TEXT


def test_dense_is_bit_identical_and_remove_restores_the_stock_processors(transformer):
    kw = inputs()
    ref = run(transformer, **kw)
    stock = [type(b.attn.processor) for b in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    dense, _ = run_accelerated(transformer, lambda: run(transformer, **kw), "dense")
    assert torch.equal(dense, ref)
    assert [type(b.attn.processor) for b in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)] == stock


@pytest.mark.parametrize("method,overrides", full_density_methods())
def test_every_method_at_full_density_matches_dense(transformer, methods, method, overrides):
    kw = inputs(batch=2, real=(REAL, REAL))
    ref = run(transformer, **kw)
    out, rows = run_accelerated(transformer, lambda: run(transformer, **kw), method, **overrides)
    densities = [r["density"] for r in rows]
    assert (out - ref).abs().max() <= 1e-4
    assert densities == [pytest.approx(1.0)] * 2


def test_sparse_text_rows_equal_dense_and_padding_takes_no_attention(transformer, methods):
    kw = inputs()
    first = transformer.transformer_blocks[0].attn  # its inputs are the same in both runs
    records, unhook = capture_attention(first)
    try:
        ref = run(transformer, **kw)
        acc = vs.accelerate(transformer, attention="video_diagonal")
        try:
            sparse = run(transformer, **kw)
            # other padding content: dense ignores it through the mask, so must the sparse path
            other = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
            other["encoder_hidden_states"][:, REAL:] = 100.0
            sparse_other = run(transformer, **other)
            density = acc.stats()[0]["density"]
        finally:
            acc.remove()
    finally:
        unhook()
    (ref_video, ref_text), (sp_video, sp_text) = records[0], records[1]
    assert (sp_video - ref_video).abs().max() > 1e-3  # the method really dropped video blocks
    assert torch.allclose(sp_text, ref_text, atol=1e-6, rtol=0)  # text rows attend densely
    assert (sparse - ref).abs().max() > 1e-3
    assert torch.equal(sparse_other, sparse)
    # the method saw the real tokens only: video + REAL text, never the padding
    assert {seen for seen in VideoDiagonalText.seen} == {
        (VIDEO + REAL, VideoLayout(frames=3, height=4, width=4, text_tokens=REAL, text_position="after"))
    }
    n = VIDEO + REAL  # 3 diagonal video blocks of 16, text rows and columns dense
    assert density == pytest.approx((3 * 16 * 16 + 2 * VIDEO * REAL + REAL * REAL) / n**2)


def test_prompts_padded_to_different_lengths_run_dense(transformer, methods):
    kw = inputs(batch=2, real=(REAL, 2))
    ref = run(transformer, **kw)
    out, _ = run_accelerated(transformer, lambda: run(transformer, **kw), "video_diagonal")
    assert torch.equal(out, ref)
    assert VideoDiagonalText.seen == []


def build_pipeline(transformer):
    """A HunyuanVideoPipeline around ``transformer`` with a tiny random VAE; prompts go in as embeddings."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_generate(pipe, steps: int = 2):
    """``generate()`` of one fixed prompt (embeddings), seed and size: latents out."""
    kw = inputs()
    prompt = dict(
        prompt_embeds=kw["encoder_hidden_states"], prompt_attention_mask=kw["encoder_attention_mask"],
        pooled_prompt_embeds=kw["pooled_projections"],
    )

    def generate():
        out = pipe(**prompt, height=64, width=64, num_frames=9, num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
        return out.frames

    return generate


def test_pipeline_sparse_run_then_remove_is_bit_identical(transformer, methods):
    pipe = build_pipeline(transformer)
    table = check_sparse_run_then_remove(pipe, pipeline_generate(pipe))
    assert {(r["step"], r["branch"], r["layer"]) for r in table} == {(s, "cond", l) for s in (0, 1) for l in (0, 1)}


def test_prompts_of_different_lengths_run_the_stock_call_and_are_recorded(transformer):
    kw = inputs(batch=2, real=(REAL, REAL - 1))
    ref = run(transformer, **kw)
    out, rows = run_accelerated(transformer, lambda: run(transformer, **kw), "svg", density=0.5, warmup_steps=0)
    assert torch.equal(out, ref)
    layers = len(HunyuanVideoAdapter.self_attention(transformer))
    assert len(rows) == layers and {r["method"] for r in rows} == {"dense"} and {r["density"] for r in rows} == {1.0}
