"""Writing the videos users asked for, atomically (vdit_sparse.atomicfile), and refusing to overwrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError

VIDEO_SUFFIXES = (".mp4", ".gif")


def check_output(path: Path, overwrite: bool) -> None:
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"out={str(path)!r}: the video must end in {' or '.join(VIDEO_SUFFIXES)}")
    for p in (path, sidecar_path(path)):
        if p.exists() and not overwrite:
            raise UserError(f"out={str(p)!r}: already exists; pass --overwrite to replace it")


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
