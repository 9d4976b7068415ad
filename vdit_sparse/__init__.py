"""vdit-sparse: training-free sparse attention for video diffusion transformers.

    import vdit_sparse as vs
    pipe = vs.load_pipeline("tiny")
    acc = vs.accelerate(pipe, attention="svg2")
    frames = pipe(prompt="a red square moving right").frames
    acc.stats(); acc.remove()
"""

from .attention import sparse_attention
from .layout import VideoLayout
from .params import Params
from .plan import BlockPlan

__version__ = "0.1.0"

_LAZY = {  # these import diffusers, which takes seconds: load them on first use
    "accelerate": ("integration", "accelerate"),
    "AccelerateHandle": ("integration", "AccelerateHandle"),
    "load_pipeline": ("loading", "load_pipeline"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'vdit_sparse' has no attribute {name!r}")


__all__ = ["sparse_attention", "VideoLayout", "Params", "BlockPlan", "accelerate", "AccelerateHandle", "load_pipeline"]
