"""Write files so that a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to a temp file in ``path``'s directory, fsync it, then ``os.replace`` it.

    The temp file lives in the same directory because ``os.replace`` is atomic only
    within one file system; on any failure it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def finite(obj):
    """``obj`` with every non-finite float (inf, nan) as None, recursively: strict JSON has no Infinity.

    Writers that mean something by an infinite value say it in a key of their own (``"identical": true``
    beside a null PSNR)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return finite(obj.item())
    return obj


def metrics_json(obj) -> str:
    """Strict JSON (no NaN or Infinity: see :func:`finite`), indented; values JSON has no type for (paths,
    dtypes) are written as their text."""
    return json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """:func:`atomic_write` of :func:`metrics_json`; serialising fails before any file is touched."""
    return atomic_write(path, metrics_json(obj))
