"""What every model family shares: the adapter base (facts as data) and the processor base.

Adding a model family: one module in pipelines/ with its processor (how the stock processor
computes q, k, v and what it does after attention) and an ``Adapter`` subclass that states the
family's facts as class attributes; then one line in ``ADAPTERS`` (pipelines/__init__.py).
"""

from __future__ import annotations

import itertools
import re

import torch

from vdit_sparse.layout import VideoLayout

from .ulysses import SequenceExchange, check_supported, context_parallel


class HandleProcessor:
    """Base of the processors installed by ``accelerate``; subclasses compute q, k, v the stock way
    and call ``self.attention(q, k, v, attention_mask)`` with (B, N, H, D) tensors."""

    # diffusers' set_attention_backend / enable_parallelism set these on processors
    _attention_backend = None
    _parallel_config = None
    text_position = "none"  # where this processor puts joint-attention text in q, k, v: none, before, after

    def __init__(self, attend, layer: int, original):
        self.attend = attend
        self.layer = layer
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def dense(self, attention_mask=None, parallel: bool = True):
        """The stock dense call, (B, N, H, D) in and out: diffusers' dispatcher with the module's backend
        (and its context parallelism, unless ``parallel`` is False: q, k, v already hold the whole sequence)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def dense_fn(q, k, v):
            return dispatch_attention_fn(
                q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config if parallel else None,
            )

        return dense_fn

    def attention(self, q, k, v, attention_mask=None, dense: bool = False, text: int = 0):
        """(B, N, H, D): the handle's attention of q, k, v; ``dense`` asks for the stock call (recorded).

        ``text``: joint-attention tokens at ``text_position``. Under Ulysses context parallelism q, k, v
        hold this rank's shard of the video (and all of the text): the call is exchanged to the whole
        sequence of this rank's heads and back (pipelines/ulysses.py), except a dense call without text,
        which stays diffusers' own: its dispatcher does the same exchange.
        """
        cp = context_parallel(self._parallel_config)
        if cp is None or (text == 0 and not self.attend.needs_full_sequence(self.layer)):
            return self.handle_call(q, k, v, attention_mask, dense, self.dense(attention_mask), text)
        check_supported(cp, q.shape[2])
        exchange = SequenceExchange(cp, q.shape, text, self.text_position)
        q, k, v = (exchange.to_heads(t) for t in (q, k, v))  # (B, N_all, H_local, D)
        mask = self.whole_sequence_mask(attention_mask, exchange)
        out = self.handle_call(q, k, v, mask, dense, self.dense(mask, parallel=False), text, exchange.head_range)
        return exchange.to_sequence(out)  # (B, N_local, H, D)

    def handle_call(self, q, k, v, attention_mask, dense: bool, dense_fn, text: int = 0, heads=None):
        """One call of the handle on q, k, v as they are; families that cut padding off override it.
        ``heads``: (first, total) of this rank's heads under Ulysses, else None."""
        return self.attend(self.layer, q, k, v, dense_fn, dense=dense, heads=heads)

    def whole_sequence_mask(self, attention_mask, exchange):
        """This rank's key mask extended to the whole sequence; families with a mask of their own override it."""
        if attention_mask is not None:
            raise ValueError(
                f"attention_mask: {type(self).__name__} takes no caller's mask under Ulysses context parallelism; "
                "run without the mask or on one device"
            )
        return None


class Adapter:
    """A model family's facts, as class attributes; the methods below read them.

    ``transformer_class``: the diffusers class name; ``blocks``: the transformer's block lists in
    forward order; ``attention``: the self-attention module of a block; ``latents``: the order of the
    hidden-state axes ("BCFHW" or "BFCHW"); ``forward_args``: the transformer's positional arguments;
    ``text``: where joint-attention text sits ("none", "before", "after"); ``processor``: ours.
    """

    family: str = ""
    transformer_class: str = ""
    blocks: tuple[str, ...] = ()
    attention: str = "attn1"
    latents: str = "BCFHW"
    forward_args: tuple[str, ...] = ("hidden_states", "timestep", "encoder_hidden_states")
    text: str = "none"
    # step-level caches (vdit_sparse.caches) that do not work with this family, and why
    unsupported_caches: dict[str, str] = {
        "fastercache": "its pipeline runs the guidance branches apart, and FasterCache reuses the unconditional half of "
                       "one batched call (CogVideoX)",
    }
    processor: type[HandleProcessor] = HandleProcessor
    # diffusers' processors (class names) that ours reproduces, the default first: accelerate replaces only these
    stock_processors: tuple[str, ...] = ()

    @classmethod
    def stands_in_for(cls, processor) -> bool:
        """Whether our processor computes what ``processor`` does (a stock processor or a subclass of one)."""
        return any(c.__name__ in cls.stock_processors for c in type(processor).__mro__)

    @classmethod
    def matches(cls, transformer) -> bool:
        import diffusers

        return isinstance(transformer, getattr(diffusers, cls.transformer_class))

    @classmethod
    def self_attention(cls, transformer) -> list[tuple[int, torch.nn.Module]]:
        blocks = itertools.chain.from_iterable(getattr(transformer, name) for name in cls.blocks)
        return [(i, getattr(block, cls.attention)) for i, block in enumerate(blocks)]

    @classmethod
    def context_parallel_plan(cls) -> dict | None:
        """The ``cp_plan`` for diffusers' ``enable_parallelism``: None keeps the model's own ``_cp_plan``.

        A plan of ours splits the video tokens only (joint text stays whole on every rank, see
        pipelines/ulysses.py) and never the transformer's ``hidden_states`` argument, so the step hook
        reads the whole video's layout there, whichever hook runs first.
        """
        return None

    @classmethod
    def self_attention_patterns(cls) -> list[str]:
        """Regular expressions of the self-attention modules' names in the transformer (diffusers' cache hooks)."""
        return [rf"{re.escape(name)}\.\d+\.{re.escape(cls.attention)}" for name in cls.blocks]

    @classmethod
    def output_latents(cls, transformer, args, kwargs) -> list:
        """The visual latents of one transformer call, each (C, F, H, W): what diffusers' SeaCache measures."""
        given = dict(zip(cls.forward_args, args)) | kwargs
        hidden = given["hidden_states"]
        return list(hidden if cls.latents == "BCFHW" else hidden.transpose(1, 2))

    @staticmethod
    def patch(config) -> tuple[int, int, int]:
        """(frames, height, width) of one token's patch."""
        p = config.patch_size
        return tuple(p) if isinstance(p, (tuple, list)) else (getattr(config, "patch_size_t", None) or 1, p, p)

    @classmethod
    def text_tokens(cls, given: dict) -> int:
        """Joint-attention text tokens of one call (0 where text sits in cross-attention)."""
        text = given.get("encoder_hidden_states")
        return 0 if cls.text == "none" or text is None else text.shape[1]

    @classmethod
    def layout(cls, transformer, args, kwargs) -> VideoLayout:
        given = dict(zip(cls.forward_args, args)) | kwargs
        shape = dict(zip(cls.latents, given["hidden_states"].shape))
        p_t, p_h, p_w = cls.patch(transformer.config)
        if shape["F"] % p_t:
            raise ValueError(f"hidden_states: {shape['F']} latent frames, not a multiple of the transformer's patch_size_t={p_t}")
        tokens = cls.text_tokens(given)
        return VideoLayout(
            frames=shape["F"] // p_t, height=shape["H"] // p_h, width=shape["W"] // p_w,
            text_tokens=tokens, text_position=cls.text if tokens else "none",
        )

    @classmethod
    def size_rule(cls, pipe) -> tuple[int, int]:
        """(t, s): the pipeline takes t·k + 1 frames and heights and widths that are multiples of s."""
        p_t, p_h, _ = cls.patch(pipe.transformer.config)
        t = getattr(pipe, "vae_scale_factor_temporal", 1)
        return t, getattr(pipe, "vae_scale_factor_spatial", 8) * p_h
