"""HunyuanVideo adapter: joint attention over [video; text] in every double- and single-stream block.

The text part is padded to a fixed length and the padding keys are masked out. The processor cuts
the padding off before the sparse path, so a method sees only real tokens (its plan and its
statistics never meet padding), and computes the padding query rows densely on the side.
"""

from __future__ import annotations

import torch

from .processor import Adapter, HandleProcessor


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))  # (B, N, H, D)


def _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """q, k, v (B, V + T, H, D) over [video; text], computed as HunyuanVideoAttnProcessor2_0 does."""
    from diffusers.models.embeddings import apply_rotary_emb

    text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    single_stream = attn.add_q_proj is None
    if single_stream and text:  # single-stream blocks project video and text with the same weights
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if image_rotary_emb is not None:
        if single_stream and text:  # rotary positions belong to the video part only
            q = torch.cat([apply_rotary_emb(q[:, :-text], image_rotary_emb, sequence_dim=1), q[:, -text:]], dim=1)
            k = torch.cat([apply_rotary_emb(k[:, :-text], image_rotary_emb, sequence_dim=1), k[:, -text:]], dim=1)
        else:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    if not single_stream and text:  # double-stream blocks: text has its own projections
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        tq, tk, tv = (_heads(p(encoder_hidden_states), attn.heads) for p in projections)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        q, k, v = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
    return q, k, v


def real_text_lengths(attention_mask, text: int) -> list[int] | None:
    """Per batch item, how many text tokens are real; None when nothing is padding.

    HunyuanVideo's key mask (B, 1, 1, N) is True on a prefix: the video and then the real text.
    """
    if attention_mask is None or text == 0:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"attention_mask: expected HunyuanVideo's bool key mask, got dtype {attention_mask.dtype}")
    keys = attention_mask.reshape(attention_mask.shape[0], -1)  # (B, N)
    lengths = (keys[:, -text:].sum(1)).tolist()
    return None if all(n == text for n in lengths) else lengths


class HunyuanJointAttnProcessor(HandleProcessor):
    """Replaces ``HunyuanVideoAttnProcessor2_0`` on a joint-attention module; hands q, k, v to the accelerate handle."""

    text_position = "after"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)  # (B, V + T, H, D)
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        out = self.attention(q, k, v, attention_mask, text=text)  # (B, V + T, H, D)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out, None
        video, text_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video, text_out

    def whole_sequence_mask(self, attention_mask, exchange):
        # the key mask (B, 1, 1, V + T) is True on every video token; its text part is whole on every rank
        if attention_mask is None:
            return None
        video = attention_mask.new_ones(*attention_mask.shape[:-1], exchange.video_tokens)  # (B, 1, 1, V)
        return torch.cat([video, attention_mask[..., attention_mask.shape[-1] - exchange.text:]], -1)

    # under torch.compile, the one graph break of this call: reading the padding is data-dependent
    @torch.compiler.disable
    def handle_call(self, q, k, v, attention_mask, dense, dense_fn, text=0, heads=None):
        lengths = real_text_lengths(attention_mask, text)
        if lengths is None:
            return self.attend(self.layer, q, k, v, dense_fn, dense=dense, heads=heads)
        if len(set(lengths)) > 1:
            # prompts padded to different lengths in one batch: one layout cannot describe them, and a
            # plan over the padded sequence would let padding keys take attention; stay exact
            return self.attend(self.layer, q, k, v, dense_fn, dense=True, heads=heads)
        n = q.shape[1] - text + lengths[0]  # video + real text
        pad_q, pad_k, pad_v = q[:, n:], k[:, n:], v[:, n:]
        padding_rows = {}

        def dense_real(a, b, c):  # the dense path puts the padding back, so it is the stock call exactly
            out = dense_fn(torch.cat([a, pad_q], 1), torch.cat([b, pad_k], 1), torch.cat([c, pad_v], 1))
            padding_rows["out"] = out[:, n:]
            return out[:, :n]

        # (B, n, H, D): video and real text
        out = self.attend(self.layer, q[:, :n], k[:, :n], v[:, :n], dense_real, dense=dense, heads=heads)
        rows = padding_rows.get("out")
        if rows is None:  # padding queries attend every real key, as in the masked dense call
            rows = dense_fn(pad_q, k, v)
        return torch.cat([out, rows.to(out.dtype)], 1)


class HunyuanVideoAdapter(Adapter):
    family = "hunyuan"
    transformer_class = "HunyuanVideoTransformer3DModel"
    blocks = ("transformer_blocks", "single_transformer_blocks")  # the order the forward runs them in
    attention = "attn"
    forward_args = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")
    text = "after"
    processor = HunyuanJointAttnProcessor
    stock_processors = ("HunyuanVideoAttnProcessor2_0",)  # fuse_qkv_projections() leaves this family's modules alone (0.42)
    unsupported_caches = {
        **Adapter.unsupported_caches,
        "seacache": "diffusers' SeaCache (0.42) never reuses its residual on this family: measured, nothing skipped",
    }

    @classmethod
    def context_parallel_plan(cls) -> dict:
        """diffusers 0.42 gives HunyuanVideo no ``_cp_plan``: split the patched video and its rotary
        embedding, keep the text whole (its padding mask is built from local lengths), gather at the end.
        For our processors only: diffusers' stock one would count the whole text once per rank."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        rotary = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)  # (V, D) cos and sin
        return {
            "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},  # (B, V, C)
            "rope": {0: rotary, 1: rotary},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    @classmethod
    def text_tokens(cls, given: dict) -> int:
        tokens = super().text_tokens(given)
        mask = given.get("encoder_attention_mask")  # (B, T), real tokens first
        if mask is not None:
            lengths = mask.sum(1).tolist()
            if len(set(lengths)) == 1:  # the processor cuts uniform padding off; mixed padding runs dense
                tokens = int(lengths[0])
        return tokens
