"""The side-by-side comparison video (dense | accelerated | difference) as H.264 mp4 bytes."""

from __future__ import annotations

import os
import tempfile

import numpy as np

DIFF_FULL_SCALE = 64  # a mean channel difference of 64/255 or more shows as the hottest colour
# a dark-to-bright heat scale (black, purple, orange, yellow, white): anchors at 0, .25, .5, .75, 1
_HEAT_ANCHORS = np.array([[0, 0, 0], [90, 20, 130], [220, 70, 50], [250, 200, 40], [255, 255, 255]], dtype=np.float64)
SEPARATOR = 2  # pixels of black between panels


def heat_colours(x: np.ndarray, anchors=_HEAT_ANCHORS) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB ``(..., 3)``, linear between evenly spaced anchor colours."""
    anchors = np.asarray(anchors, dtype=np.float64)
    pos = np.clip(np.nan_to_num(x), 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(pos.astype(np.int64), len(anchors) - 2)
    frac = (pos - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac + 0.5).astype(np.uint8)


def difference_heat_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``heat(mean_c |a - b| / 64)`` per pixel: uint8 ``(T, H, W, 3)`` from two uint8 videos."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1)  # (T, H, W)
    return heat_colours(diff / DIFF_FULL_SCALE)


def side_by_side(dense: np.ndarray, accelerated: np.ndarray) -> np.ndarray:
    """``dense | accelerated | difference`` as one uint8 video ``(T, H', W', 3)`` with even H', W'.

    H.264 in yuv420p halves the chroma resolution, so both sides must be even.
    """
    if dense.shape != accelerated.shape or dense.ndim != 4 or dense.dtype != np.uint8:
        raise ValueError(
            f"side_by_side needs two uint8 videos (T, H, W, C) of one shape; got {dense.shape} {dense.dtype} "
            f"and {accelerated.shape} {accelerated.dtype}"
        )
    if dense.shape[-1] == 1:
        dense, accelerated = np.repeat(dense, 3, -1), np.repeat(accelerated, 3, -1)
    t, h, w, _ = dense.shape
    gap = np.zeros((t, h, SEPARATOR, 3), dtype=np.uint8)
    row = np.concatenate([dense, gap, accelerated, gap, difference_heat_map(dense, accelerated)], axis=2)
    pad_h, pad_w = row.shape[1] % 2, row.shape[2] % 2
    return np.pad(row, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def encode_mp4(frames: np.ndarray, fps: float = 8.0) -> bytes:
    """H.264 (yuv420p, +faststart) mp4 of uint8 frames ``(T, H, W, 3)`` with even H and W."""
    import imageio_ffmpeg

    t, h, w, c = frames.shape
    if c != 3 or h % 2 or w % 2 or frames.dtype != np.uint8:
        raise ValueError(f"encode_mp4 needs uint8 RGB frames with even height and width; got {frames.shape} {frames.dtype}")
    with tempfile.TemporaryDirectory(prefix="vdit-sparse-video-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,  # sizes are already even; do not let it rescale
            output_params=["-movflags", "+faststart"],
        )
        writer.send(None)  # start the generator
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as f:
            return f.read()
