"""``load_pipeline``: the embedded default, a local directory, or a hub id through diffusers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device={device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r}: CUDA is not available on this machine; use cpu")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_pipeline(name_or_path: str = "tiny", device=None, dtype=None, random_weights: bool = False):
    """A diffusers pipeline on ``device`` in ``dtype``.

    ``"tiny"`` (the default) and ``"tiny-long"`` are the embedded models, shipped trained
    (``random_weights=True`` builds them with random weights instead: they draw noise). Anything else goes
    through diffusers' ``DiffusionPipeline.from_pretrained``: a local directory, or a hub id found in the
    local cache (or downloaded where the hub is reachable).
    """
    from .pipelines.tiny import EMBEDDED

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name_or_path in EMBEDDED:
        from .pipelines.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(name_or_path, random_weights=random_weights)
    else:
        pipe = _from_pretrained(str(name_or_path), dt)
    pipe = pipe.to(device=dev)
    if any(p.dtype != dt for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()):
        pipe = pipe.to(dtype=dt)
    return pipe


def model_fingerprint(name_or_path: str) -> str:
    """What identifies a model's weights cheaply: for the embedded models and local directories the names, sizes and
    modification times of their files (a retrained or re-exported model changes it); a hub id as given."""
    import hashlib

    from .pipelines.tiny import EMBEDDED, packaged_weights_dir

    if name_or_path in EMBEDDED:
        path = packaged_weights_dir(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"id:{name_or_path}"
    files = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file())
    return "files:" + hashlib.sha256(repr(files).encode()).hexdigest()[:16]


def _from_pretrained(name: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    from . import pipelines  # noqa: F401  registers our autoencoder class, so saved tiny pipelines load

    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not (path / "model_index.json").is_file():
        raise UserError(f"model {name!r}: not a diffusers pipeline directory (no model_index.json there)")
    if looks_local:
        return DiffusionPipeline.from_pretrained(path, dtype=dtype)
    try:  # the local cache first, so an offline machine answers at once
        return DiffusionPipeline.from_pretrained(name, dtype=dtype, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise UserError(f"model {name!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
    try:
        return DiffusionPipeline.from_pretrained(name, dtype=dtype)
    except Exception as e:
        raise UserError(
            f"model {name!r}: not in the local Hugging Face cache, and the hub did not provide it "
            f"({_short_reason(e)}); give 'tiny', 'tiny-long', a local pipeline directory, or a hub id reachable from here"
        ) from None


def _short_reason(error: Exception, limit: int = 160) -> str:
    """The first line of ``error``, cut at a word boundary (never mid-word) when longer than ``limit``."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " ..."
