"""Write files so that a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import json
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
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, indent=2)``; serialising fails before any file is touched.

    Non-finite floats are written as ``Infinity`` / ``NaN`` (what Python's json reads back).
    """
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")
