"""vdit-sparse: training-free sparse attention for video diffusion transformers.

    import vdit_sparse as vs
    pipe = vs.load_pipeline("tiny")
    acc = vs.accelerate(pipe, attention="svg2")
    frames = pipe(prompt="a red square moving right").frames
    acc.stats(); acc.remove()
"""

from pathlib import Path as _Path

# In a source checkout kernels/, pipelines/ and configs/ sit beside this folder, while an install puts
# them inside it. Python run from the checkout's root imports this folder even when the package is
# installed, so let vdit_sparse.kernels (and the others) resolve there too.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "kernels").is_dir() and (_checkout / "kernels" / "block_sparse_attention.py").is_file():
    __path__.append(str(_checkout))

__version__ = "0.2.0"

# Loaded on first use: torch and diffusers take seconds to import, and the CLI must answer (and take a Ctrl-C)
# before they load.
_LAZY = {
    "sparse_attention": ("attention", "sparse_attention"),
    "VideoLayout": ("layout", "VideoLayout"),
    "BlockPlan": ("plan", "BlockPlan"),
    "accelerate": ("integration", "accelerate"),
    "AccelerateHandle": ("integration", "AccelerateHandle"),
    "load_pipeline": ("loading", "load_pipeline"),
    "RunSpec": ("runspec", "RunSpec"),
    "TileSkip": ("caches", "TileSkip"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'vdit_sparse' has no attribute {name!r}")


__all__ = ["sparse_attention", "VideoLayout", "BlockPlan", "accelerate", "AccelerateHandle", "load_pipeline", "RunSpec",
           "TileSkip"]
