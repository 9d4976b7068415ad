"""Model adapters (installed as ``vdit_sparse.pipelines``): per family, the token layout and which
modules are self-attention. Adding a family: its module (see processor.py) and one line in ADAPTERS."""

from __future__ import annotations

from . import patch_vae  # noqa: F401  diffusers loads a saved tiny pipeline's vae only once its module is imported
from .cogvideox import CogVideoXAdapter
from .hunyuan import HunyuanVideoAdapter
from .processor import Adapter
from .wan import WanAdapter

ADAPTERS = [WanAdapter, HunyuanVideoAdapter, CogVideoXAdapter]


def adapter_for(transformer):
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise ValueError(f"transformer {type(transformer).__name__}: no adapter; supported families: {families}")


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "CogVideoXAdapter", "HunyuanVideoAdapter", "WanAdapter"]
