"""What the handle says is what runs: processors swapped behind it, fused projections, shared transformers.

On the tiny random Wan and CogVideoX pipelines of tests/pipelines: diffusers calls that replace a
self-attention processor after ``accelerate`` are refused at the next transformer call, naming the module;
fusing before ``accelerate`` runs through our processors (q, k, v from ``to_qkv``); a second pipeline over
the same transformer is refused, and its refused calls leave the first pipeline's record alone.
"""

import pytest
import torch

import vdit_sparse as vs
from vdit_sparse.ownership import ProcessorReplacedError, SharedTransformerError
from vdit_sparse.pipelines import CogVideoXAdapter, WanAdapter

from .pipelines._joint import register
from .pipelines.test_cogvideox import build_pipeline as cogvideox_pipeline
from .pipelines.test_cogvideox import pipeline_generate as cogvideox_generate
from .pipelines.test_hunyuan import build_transformer as hunyuan_transformer
from .pipelines.test_hunyuan import inputs as hunyuan_inputs
from .pipelines.test_hunyuan import run as hunyuan_run


@pytest.fixture
def methods(monkeypatch):
    register(monkeypatch)


def wan_pipeline():
    """A tiny random WanPipeline with 2 layers; prompts go in as embeddings."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from vdit_sparse.pipelines.tiny import TRANSFORMER_CONFIG, build_components

    comps = build_components()
    torch.manual_seed(3)
    comps["transformer"] = WanTransformer3DModel(**dict(TRANSFORMER_CONFIG, num_layers=2)).eval()
    pipe = WanPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_generate(pipe):
    """``generate()`` of one fixed prompt with guidance (cond and uncond calls), 2 steps, 2 × 4 × 4 tokens: latents."""
    g = torch.Generator().manual_seed(2)
    prompt = dict(prompt_embeds=torch.randn(1, 16, 32, generator=g), negative_prompt_embeds=torch.randn(1, 16, 32, generator=g))

    def generate():
        return pipe(**prompt, height=64, width=64, num_frames=5, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).frames

    return generate


FAMILIES = {
    "wan": (lambda: wan_pipeline(), wan_generate, WanAdapter),
    "cogvideox": (lambda: cogvideox_pipeline("1.0"), cogvideox_generate, CogVideoXAdapter),
}


def build(family):
    make, generate, adapter = FAMILIES[family]
    pipe = make()
    return pipe, generate(pipe), [m for _, m in adapter.self_attention(pipe.transformer)]


def count_projection_calls(modules):
    """Calls of the fused (to_qkv) and unfused (to_q) projections of ``modules``; returns (counts, remove)."""
    counts = {"to_qkv": 0, "to_q": 0}
    hooks = []
    for module in modules:
        for name in counts:
            if hasattr(module, name):
                def tick(*_, name=name):
                    counts[name] += 1
                hooks.append(getattr(module, name).register_forward_hook(tick))
    return counts, lambda: [h.remove() for h in hooks]


def run(pipe, generate, attention="dense", **settings):
    """(output, stats) of one accelerated run; the handle is removed afterwards."""
    acc = vs.accelerate(pipe, attention=attention, **settings)
    try:
        return generate(), acc.stats()
    finally:
        acc.remove()


def test_fuse_after_accelerate_is_refused_at_the_first_call_and_remove_keeps_the_fused_processors():
    pipe, generate, modules = build("cogvideox")
    ref = generate()
    acc = vs.accelerate(pipe, attention="dense")
    pipe.transformer.fuse_qkv_projections()
    fused = [m.processor for m in modules]
    with pytest.raises(ProcessorReplacedError) as error:
        generate()
    message = str(error.value)
    assert message.startswith("pipe.transformer.transformer_blocks.0.attn1: its attention processor is now "
                              "FusedCogVideoXAttnProcessor2_0, not vdit_sparse's (transformer.fuse_qkv_projections()")
    assert "call .remove() on the handle (it keeps the new processor), then accelerate again" in message
    assert "\n" not in message
    assert acc.stats() == [] and acc.computed() == []  # nothing was recorded as run
    acc.remove()
    assert all(m.processor is p for m, p in zip(modules, fused))
    assert torch.allclose(generate(), ref, atol=1e-5, rtol=0)
    # what fuse_qkv_projections saved for unfuse_qkv_projections is the stock processor, not our removed one
    pipe.transformer.unfuse_qkv_projections()
    assert {type(m.processor).__name__ for m in modules} == {"CogVideoXAttnProcessor2_0"}
    assert torch.equal(generate(), ref)


def test_unfuse_after_a_refused_fuse_puts_our_processors_back_and_runs_are_counted():
    pipe, generate, modules = build("cogvideox")
    ref = generate()
    acc = vs.accelerate(pipe, attention="dense")
    try:
        ours = [m.processor for m in modules]
        pipe.transformer.fuse_qkv_projections()
        with pytest.raises(ProcessorReplacedError):
            generate()
        pipe.transformer.unfuse_qkv_projections()  # diffusers puts back what it replaced: ours
        assert all(m.processor is p for m, p in zip(modules, ours))
        out, rows = generate(), acc.stats()
    finally:
        acc.remove()
    assert torch.equal(out, ref)
    assert {(r["step"], r["layer"]) for r in rows} == {(s, l) for s in (0, 1) for l in (0, 1)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuse_before_accelerate_projects_through_to_qkv_and_remove_restores_the_fused_processors(family, methods):
    pipe, generate, modules = build(family)
    ref = generate()
    sparse_ref, _ = run(pipe, generate, "video_diagonal")
    pipe.transformer.fuse_qkv_projections()
    stock = [m.processor for m in modules]
    fused_ref = generate()
    assert torch.allclose(fused_ref, ref, atol=1e-5, rtol=0)

    counts, unhook = count_projection_calls(modules)
    try:
        dense, rows = run(pipe, generate)
    finally:
        unhook()
    assert torch.equal(dense, fused_ref)
    assert counts == {"to_qkv": len(rows), "to_q": 0} and len(rows) > 0  # every recorded call used the fused weights
    sparse, rows = run(pipe, generate, "video_diagonal")
    assert {r["method"] for r in rows} == {"video_diagonal"}
    assert (sparse_ref - ref).abs().max() > 1e-3  # the method does drop blocks here
    assert torch.allclose(sparse, sparse_ref, atol=1e-5, rtol=0)
    assert all(m.processor is p for m, p in zip(modules, stock))
    assert torch.equal(generate(), fused_ref)


def test_unfuse_after_a_fused_accelerate_is_refused_naming_unfuse():
    pipe, generate, modules = build("cogvideox")
    pipe.transformer.fuse_qkv_projections()
    fused_ref = generate()
    acc = vs.accelerate(pipe, attention="dense")
    pipe.transformer.unfuse_qkv_projections()  # diffusers puts its stock unfused processors over ours
    with pytest.raises(ProcessorReplacedError, match=r"^pipe\.transformer\.transformer_blocks\.0\.attn1: its attention "
                       r"processor is now CogVideoXAttnProcessor2_0, not vdit_sparse's \(transformer\.unfuse_qkv_projections\(\)"):
        generate()
    acc.remove()
    assert {type(m.processor).__name__ for m in modules} == {"CogVideoXAttnProcessor2_0"}
    assert torch.allclose(generate(), fused_ref, atol=1e-5, rtol=0)


def test_fuse_after_accelerate_on_wan_keeps_our_processors_which_read_the_fused_projection():
    """Wan's fuse_qkv_projections changes the modules, not their processors: ours see attn.fused_projections."""
    pipe, generate, modules = build("wan")
    acc = vs.accelerate(pipe, attention="dense")
    try:
        pipe.transformer.fuse_qkv_projections()
        counts, unhook = count_projection_calls(modules)
        try:
            out, rows = generate(), acc.stats()
        finally:
            unhook()
    finally:
        acc.remove()
    assert counts == {"to_qkv": len(rows), "to_q": 0}
    assert len(rows) == 2 * 2 * len(modules)  # steps × branches × layers
    assert torch.equal(out, generate())


@pytest.mark.parametrize("how,named", [("model", "blocks.0.attn1"), ("one module", "blocks.1.attn1")])
def test_set_attn_processor_after_accelerate_is_refused_and_remove_keeps_the_new_processor(how, named):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe, generate, modules = build("wan")
    ref = generate()
    originals = [m.processor for m in modules]
    acc = vs.accelerate(pipe, attention="dense")
    mine = WanAttnProcessor()
    if how == "model":
        pipe.transformer.set_attn_processor(mine)
    else:
        modules[1].set_processor(mine)
    with pytest.raises(ProcessorReplacedError, match=rf"^pipe\.transformer\.{named}: its attention processor is now "
                       r"WanAttnProcessor, not vdit_sparse's \(transformer\.set_attn_processor\(\)"):
        generate()
    acc.remove()
    assert modules[1].processor is mine
    if how == "one module":
        assert modules[0].processor is originals[0]
    acc = vs.accelerate(pipe, attention="dense")  # the new processor is a stock one: wrapped, and put back after
    try:
        assert torch.equal(generate(), ref) and len(acc.stats()) == 2 * 2 * len(modules)
    finally:
        acc.remove()
    assert modules[1].processor is mine


def test_a_processor_swapped_in_a_single_stream_block_of_an_accelerated_hunyuan_transformer_is_named():
    """A transformer accelerated on its own: direct calls, two block lists, the module named by its own path."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    t, kw = hunyuan_transformer(), hunyuan_inputs()
    ref = hunyuan_run(t, **kw)
    acc = vs.accelerate(t, attention="dense")
    try:
        assert torch.equal(hunyuan_run(t, **kw), ref)
        t.single_transformer_blocks[0].attn.set_processor(HunyuanVideoAttnProcessor2_0())
        with pytest.raises(ProcessorReplacedError, match=r"^pipe\.transformer\.single_transformer_blocks\.0\.attn: its "
                           r"attention processor is now HunyuanVideoAttnProcessor2_0"):
            hunyuan_run(t, **kw)
    finally:
        acc.remove()
    assert torch.equal(hunyuan_run(t, **kw), ref)


def test_set_attention_backend_after_accelerate_reaches_our_processors_and_remove_hands_it_back():
    pipe, generate, modules = build("wan")
    ref = generate()
    acc = vs.accelerate(pipe, attention="dense")
    try:
        pipe.transformer.set_attention_backend("native")
        assert {str(m.processor._attention_backend) for m in modules} == {"AttentionBackendName.NATIVE"}
        out, rows = generate(), acc.stats()
    finally:
        acc.remove()
    assert torch.equal(out, ref) and len(rows) == 2 * 2 * len(modules)
    assert {str(m.processor._attention_backend) for m in modules} == {"AttentionBackendName.NATIVE"}
    pipe.transformer.reset_attention_backend()


def test_a_second_pipeline_over_the_same_components_is_refused_and_not_counted(methods):
    from diffusers import WanPipeline

    pipe, generate, _ = build("wan")
    twin = WanPipeline(**pipe.components)
    twin.set_progress_bar_config(disable=True)
    twin_generate = wan_generate(twin)
    ref = generate()
    acc = vs.accelerate(pipe, attention="video_diagonal")
    try:
        first, rows = generate(), acc.stats()
        with pytest.raises(ValueError, match=r"^pipe\.transformer: this WanTransformer3DModel is shared with another "
                           r"WanPipeline that is accelerated .*call \.remove\(\) on that pipeline's handle"):
            vs.accelerate(twin, attention="dense")
        with pytest.raises(SharedTransformerError, match=r"^pipe\.transformer: this WanTransformer3DModel was accelerated "
                           r"for another WanPipeline \(this WanPipeline shares it"):
            twin_generate()
        assert acc.stats() == rows  # the refused run added nothing to the accelerated pipeline's record
        assert torch.equal(generate(), first)
    finally:
        acc.remove()
    assert (first - ref).abs().max() > 1e-3
    # switching: remove, then accelerate the other one; the first is now the stranger
    acc = vs.accelerate(twin, attention="video_diagonal")
    try:
        assert torch.equal(twin_generate(), first)
        with pytest.raises(SharedTransformerError):
            generate()
    finally:
        acc.remove()
    # the transformer accelerated on its own serves every pipeline that uses it, and counts all their runs
    acc = vs.accelerate(pipe.transformer, attention="video_diagonal")
    try:
        assert torch.equal(generate(), first) and torch.equal(twin_generate(), first)
        assert len(acc.stats()) == len(rows)  # the latest run's: one pipeline run
    finally:
        acc.remove()
    assert torch.equal(twin_generate(), ref)


class LowRankProcessor:
    """What LoRA loaders installed before PEFT: the stock processor plus a low-rank update of its output."""

    def __init__(self, inner, dim: int, rank: int = 2):
        g = torch.Generator().manual_seed(5)
        self.inner = inner
        self.down, self.up = torch.randn(dim, rank, generator=g) * 0.1, torch.randn(rank, dim, generator=g) * 0.1

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs) + hidden_states @ self.down @ self.up


def test_a_lora_style_processor_is_refused_after_accelerate_and_before_it():
    pipe, generate, modules = build("wan")
    ref = generate()
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    acc = vs.accelerate(pipe, attention="dense")
    lora = LowRankProcessor(acc._wiring.installed[0][1][0].original, dim)
    modules[0].set_processor(lora)
    with pytest.raises(ProcessorReplacedError, match=r"^pipe\.transformer\.blocks\.0\.attn1: its attention processor is "
                       r"now LowRankProcessor.*call \.remove\(\) on the handle \(it keeps the new processor\), vdit_sparse "
                       r"cannot stand in for that processor$"):
        generate()
    acc.remove()
    assert modules[0].processor is lora
    with_lora = generate()
    assert (with_lora - ref).abs().max() > 1e-3
    # accelerating over it would silently drop the update: refused, and nothing is left installed
    before = [m.processor for m in modules]
    with pytest.raises(ValueError, match=r"^pipe\.transformer\.blocks\.0\.attn1: holds LowRankProcessor, which vdit_sparse "
                       r"cannot stand in for \(it reproduces WanAttnProcessor\)"):
        vs.accelerate(pipe, attention="dense")
    assert all(m.processor is p for m, p in zip(modules, before))
    assert torch.equal(generate(), with_lora)


def test_peft_lora_weights_added_after_accelerate_run_through_our_processors():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe, generate, modules = build("wan")
    ref = generate()
    acc = vs.accelerate(pipe, attention="dense")
    try:
        ours = [m.processor for m in modules]
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
        pipe.transformer.add_adapter(config)  # PEFT wraps the projections; the processors stay
        assert all(m.processor is p for m, p in zip(modules, ours))
        out, rows = generate(), acc.stats()
    finally:
        acc.remove()
    assert len(rows) == 2 * 2 * len(modules)
    assert (out - ref).abs().max() > 1e-3  # the adapter acts
    assert torch.equal(out, generate())  # as it does in the stock pipeline


def test_processors_of_a_removed_handle_put_back_by_hand_say_so():
    pipe, generate, _ = build("wan")
    acc = vs.accelerate(pipe, attention="dense")
    saved = pipe.transformer.attn_processors  # ours among them
    acc.remove()
    pipe.transformer.set_attn_processor(saved)
    with pytest.raises(RuntimeError, match=r"^vdit_sparse: a processor of a removed handle ran"):
        generate()
    with pytest.raises(ValueError, match=r"^pipe\.transformer\.blocks\.0\.attn1: holds WanSelfAttnProcessor of another "
                       r"vdit_sparse handle, which vdit_sparse cannot stand in for"):
        vs.accelerate(pipe, attention="dense")
