"""Wan2.1 / Wan2.2 adapter: frame-major video tokens, text in cross-attention, self-attention in ``attn1``."""

from __future__ import annotations

import torch

from .processor import Adapter, HandleProcessor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved rotary embedding; the same operations as diffusers' processor, so the
    # dense path stays bit-identical to the stock one.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttnProcessor(HandleProcessor):
    """Replaces ``WanAttnProcessor`` on a self-attention module; hands q, k, v to the accelerate handle."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # to_qkv after fuse_qkv_projections()
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # (B, N, H, D)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)
        out = self.attention(query, key, value, attention_mask)  # (B, N, H, D)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class WanAdapter(Adapter):
    family = "wan"
    transformer_class = "WanTransformer3DModel"
    blocks = ("blocks",)
    attention = "attn1"
    processor = WanSelfAttnProcessor
    stock_processors = ("WanAttnProcessor",)  # fused or not: both read attn.fused_projections
