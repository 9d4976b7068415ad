"""Launch configs for block_sparse_attention, tuned once per (N, D, density band) and kept on disk.

A first sparse step must not stall for minutes: the candidate list is short, each candidate is
timed on the real call, and the winner is written to a JSON file that later processes read.
Directory: $VDIT_SPARSE_CACHE_DIR, else $XDG_CACHE_HOME/vdit_sparse, else ~/.cache/vdit_sparse.
VDIT_SPARSE_AUTOTUNE=0 turns timing off (the first candidate is used, nothing is written).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

# Few on purpose (each costs a compile and a few timed runs). 128x64 / 8 warps / 3 stages is the
# plain-Triton config measured best at density 0.15 (RESEARCH.md); 64-row tiles waste less on small
# clusters; 128x128 helps dense-ish plans when its shared memory fits (a failing one is skipped).
CANDIDATES = (
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
)

# Upper edges of the density bands: kernels tuned at 0.12 serve 0.18, not 0.9.
BAND_EDGES = (0.1, 0.2, 0.4, 0.7, 1.0)

CACHE_FILE = "block_sparse_attention.json"


def cache_dir() -> Path:
    if os.environ.get("VDIT_SPARSE_CACHE_DIR"):
        return Path(os.environ["VDIT_SPARSE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vdit_sparse"


def density_band(density: float) -> str:
    """'<=0.1', '<=0.2', ... : the band a plan's mean density falls in."""
    if not 0.0 <= density <= 1.0 + 1e-6:
        raise ValueError(f"density: {density} outside [0, 1]")
    edge = next(e for e in BAND_EDGES if density <= e + 1e-9)
    return f"<={edge}"


def tuning_key(q: torch.Tensor, head_dim_v: int, density: float, has_perm: bool) -> str:
    """The cache key: device, Triton version, dtype, N, D, density band, and whether perms gather."""
    import triton

    device = torch.cuda.get_device_name(q.device) if q.is_cuda else q.device.type
    B, H, N, D = q.shape
    dtype = str(q.dtype).removeprefix("torch.")
    return f"{device}|triton {triton.__version__}|{dtype}|N={N}|D={D}|Dv={head_dim_v}|density {density_band(density)}|perm={int(has_perm)}"


class ConfigCache:
    """A JSON file of key -> chosen config, read once, rewritten atomically on each new entry."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None

    def get(self, key: str) -> dict | None:
        return self._load().get(key)

    def put(self, key: str, config: dict) -> None:
        entries = self._read_disk()  # merge: another process may have written since we read
        entries.update(self._load())
        entries[key] = config
        self._entries = entries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # readers never see a half-written file

    def pick(self, key: str, candidates, measure: Callable[[dict], float]) -> dict:
        """The cached config for ``key``, else the candidate with the lowest ``measure`` (ms), cached."""
        hit = self.get(key)
        if hit is not None:
            return hit
        if os.environ.get("VDIT_SPARSE_AUTOTUNE", "1") == "0":
            return dict(candidates[0])
        timings = []
        for cfg in candidates:
            try:
                ms = float(measure(cfg))
            except Exception:  # out of shared memory, compile failure: not a usable config here
                ms = math.inf
            timings.append(ms)
        best = min(range(len(candidates)), key=timings.__getitem__)
        if not math.isfinite(timings[best]):
            raise RuntimeError(f"block_sparse_attention: no launch config ran correctly for {key}; timings {timings}")
        chosen = dict(candidates[best], ms=timings[best])
        self.put(key, chosen)
        return chosen

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = self._read_disk()
        return self._entries

    def _read_disk(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # a corrupt cache is re-tuned, not fatal
            return {}


_CACHES: dict[Path, ConfigCache] = {}  # one per file: the process-wide view of the disk cache


def default_cache() -> ConfigCache:
    path = cache_dir() / CACHE_FILE
    if path not in _CACHES:
        _CACHES[path] = ConfigCache(path)
    return _CACHES[path]
