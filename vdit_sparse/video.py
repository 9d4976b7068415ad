"""Writing videos and sidecars atomically: a temp file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
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


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_video(path, frames, fps: int = 8) -> None:
    """Write (T, H, W, 3) frames as H.264 mp4 (yuv420p, plays in browsers) or gif, atomically."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = to_uint8(frames)

    def write(tmp: Path):
        if path.suffix.lower() == ".gif":
            imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
        else:  # yuv420p needs even sizes: pad by edge replication
            h, w = frames.shape[1:3]
            padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                    macro_block_size=1, ffmpeg_log_level="error") as writer:
                for frame in padded:
                    writer.append_data(frame)

    _atomic(path, write)


def write_json(path, data) -> None:
    path = Path(path)
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
