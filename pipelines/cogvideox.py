"""CogVideoX (1.0 and 1.5) adapter: joint attention over [text; video] in each block's ``attn1``.

CogVideoX has no text mask: its padded T5 tokens are ordinary keys in the dense model, so they stay
ordinary text tokens here. Latents arrive as (B, F, C, H, W); CogVideoX 1.5 also patches in time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .processor import Adapter, HandleProcessor


class CogVideoXJointAttnProcessor(HandleProcessor):
    """Replaces ``CogVideoXAttnProcessor2_0`` on ``attn1``; hands q, k, v to the accelerate handle."""

    text_position = "before"

    def __init__(self, attend, layer: int, original):
        super().__init__(attend, layer, original)
        # fuse_qkv_projections() before accelerate: the stock processor is the fused one, which projects q, k, v
        # with attn.to_qkv; so do we, and remove() puts it back
        self.fused = type(original).__name__ == "FusedCogVideoXAttnProcessor2_0"

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, T + V, C)
        B, N, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, N, B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        if self.fused:
            qkv = attn.to_qkv(hidden_states)  # (B, T + V, 3 C)
            q, k, v = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        # (B, H, N, D) strided views, exactly as the stock processor lays them out for SDPA
        q, k, v = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # rotary positions belong to the video part only
            q[:, :, text:] = apply_rotary_emb(q[:, :, text:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, text:] = apply_rotary_emb(k[:, :, text:], image_rotary_emb)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, N, H, D) views
        # a caller's mask is not something a block plan can express: the stock call, recorded
        out = self.attention(q, k, v, attention_mask, dense=attention_mask is not None, text=text)  # (B, N, H, D)
        out = out.reshape(B, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split([text, N - text], dim=1)
        return video_out, text_out

    def dense(self, attention_mask=None, parallel: bool = True):
        # never called on a shard: under Ulysses CogVideoX's calls always carry text, so they are exchanged first
        def dense_fn(q, k, v):  # (B, N, H, D) in and out; the stock processor calls SDPA itself, bit for bit
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask, dropout_p=0.0,
                is_causal=False,
            )
            return out.transpose(1, 2)

        return dense_fn


class CogVideoXAdapter(Adapter):
    family = "cogvideox"
    transformer_class = "CogVideoXTransformer3DModel"
    blocks = ("transformer_blocks",)
    attention = "attn1"
    latents = "BFCHW"
    forward_args = ("hidden_states", "encoder_hidden_states")
    text = "before"
    processor = CogVideoXJointAttnProcessor
    stock_processors = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")
    unsupported_caches = {
        "seacache": "diffusers' SeaCache (0.42) never reuses its residual on this family: measured, nothing skipped",
    }

    @classmethod
    def context_parallel_plan(cls) -> dict:
        """diffusers 0.42 gives CogVideoX no ``_cp_plan`` (and its stock processor ignores one): split the
        video entering the first block and the rotary embedding, keep the text whole, gather at the end."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        rotary = ContextParallelInput(split_dim=0, expected_dims=2)  # (V, D) cos and sin
        return {
            "": {"image_rotary_emb": [rotary, rotary]},
            "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},  # (B, V, C)
            "norm_final": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }
