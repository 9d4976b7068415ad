"""Finished runs on disk: the reference cache that comparisons share, and a comparison's own runs.

A run is one generated video with its timings and statistics, stored whole or not at all under a key:
``GenerateRequest.key()`` for accelerated runs, :func:`reference_key` (the request, the model's files and
this package's version) for cached references. An accelerated run keeps the timing of the reference
run made just before it in the same process (``timing_reference``): a speed-up divides only those two.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .atomicfile import metrics_json
from .generate import GenerateRequest, GenerationResult

STAT_KEYS = ("step", "layer", "branch", "model", "method", "density", "ms")  # what a stored run keeps per call


class RunStore:
    """Finished runs on disk, one directory per ``GenerateRequest.key()``.

    A run is written into a temp directory and renamed into place, so a directory named
    by a key always holds a whole run. Float frames are kept as float16 (error < 2.5e-4,
    under a tenth of one uint8 step) to halve the disk a long video takes.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def has(self, key: str) -> bool:
        return (self.root / key / "result.json").is_file()

    def save(self, key: str, req: GenerateRequest, result, timing_reference: dict | None = None) -> None:
        """Store a run; ``timing_reference``: the reference timed just before it in this process (accelerated runs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}."))
        try:
            np.save(tmp / "frames.npy", np.asarray(result.frames, dtype=np.uint8))
            np.save(tmp / "frames_float.npy", np.asarray(result.frames_float).astype(np.float16))
            meta = {
                "request": _request_json(req), "wall_s": float(result.wall_s), "attention_ms": float(result.attention_ms),
                "density": None if result.density is None else float(result.density),
                "stats": [{k: r[k] for k in STAT_KEYS if k in r} for r in result.stats],
                "config": result.config, "timing_reference": timing_reference,
                "computed": getattr(result, "computed", []) or [],
            }
            (tmp / "result.json").write_text(metrics_json(meta), encoding="utf-8")
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # stored meanwhile by another comparison: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, key: str) -> GenerationResult:
        """The stored run; frames are memory-mapped, so a report over many runs stays small in RAM."""
        d = self.root / key
        meta = json.loads((d / "result.json").read_text(encoding="utf-8"))
        result = GenerationResult(
            frames=np.load(d / "frames.npy", mmap_mode="r"),
            frames_float=np.load(d / "frames_float.npy", mmap_mode="r"),
            wall_s=meta["wall_s"], attention_ms=meta["attention_ms"], density=meta["density"],
            stats=meta["stats"], config=meta["config"], computed=meta.get("computed") or [],
        )
        result.timing_reference = meta.get("timing_reference")
        return result


def _request_json(req: GenerateRequest) -> dict:
    return json.loads(json.dumps(req.__dict__, default=str))


def reference_key(req: GenerateRequest) -> str:
    """The cache key of a reference run: the request, the model's files and this package's version."""
    import hashlib

    from . import __version__
    from .loading import model_fingerprint

    blob = json.dumps([req.key(), model_fingerprint(req.model), __version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    if os.environ.get("VDIT_SPARSE_CACHE"):
        return Path(os.environ["VDIT_SPARSE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vdit-sparse" / "runs"
