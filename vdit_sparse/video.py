"""Writing the videos users asked for, atomically (vdit_sparse.atomicfile), and refusing to overwrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError

VIDEO_SUFFIXES = (".mp4", ".gif")


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is not a video name, exists (without ``overwrite``), or cannot be written."""
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"out={str(path)!r}: the video must end in {' or '.join(VIDEO_SUFFIXES)}")
    for p in (path, sidecar_path(path)):
        if p.is_dir():  # --overwrite replaces files, never folders
            raise UserError(f"out={str(path)!r}: {str(p)!r} is a folder; give a file name")
        if p.exists() and not overwrite:
            raise UserError(f"out={str(p)!r}: already exists; pass --overwrite to replace it")
    check_writable(path, "out")


def check_writable(path: Path, name: str) -> None:
    """Refuse, before any work, a file path whose folder could not be made or written.

    Nothing is created: the nearest folder that exists must be a folder, and a probe file must be creatable
    in it (made and removed at once); the folders below it are made only when the output is written.
    """
    import tempfile

    folder = Path(path).absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{name}={str(path)!r}: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{name}={str(path)!r}: the folder {str(existing)!r} cannot be written ({e.strerror})") from None


def sidecar_path(video: Path) -> Path:
    return video.with_suffix(".json")


def to_uint8(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from float frames in [0, 1] (or uint8 unchanged)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_video(path, frames, fps: int = 8) -> None:
    """Write (T, H, W, 3) frames as H.264 mp4 (yuv420p, plays in browsers) or gif, atomically."""
    import io

    import imageio.v2 as imageio

    from .atomicfile import atomic_write
    from .quality.video import encode_mp4

    path = Path(path)
    frames = to_uint8(frames)
    if path.suffix.lower() == ".gif":
        buffer = io.BytesIO()
        imageio.mimwrite(buffer, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
        atomic_write(path, buffer.getvalue())
    else:  # yuv420p needs even sizes: pad by edge replication
        h, w = frames.shape[1:3]
        atomic_write(path, encode_mp4(np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge"), fps=fps))
