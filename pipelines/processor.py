"""What every processor of ours shares: the handle's entry, the layer index, the stock processor."""

from __future__ import annotations


class HandleProcessor:
    """Base of the processors installed by ``accelerate``; subclasses compute q, k, v the stock way
    and call ``self.attend(self.layer, q, k, v, dense_fn, dense=False)`` with (B, N, H, D) tensors."""

    # diffusers' set_attention_backend / enable_parallelism set these on processors
    _attention_backend = None
    _parallel_config = None

    def __init__(self, attend, layer: int, original):
        self.attend = attend
        self.layer = layer
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
