"""The shapes world: captioned clips of coloured shapes, the training data of the embedded model.

A clip shows one or two objects of one colour and shape, all moving the same way (left, right, up,
down, or staying still), on a plain or textured (checkered) grey background:

    "two cyan triangles moving up on a textured background"

Everything is deterministic: clip ``i`` of the stream seeded ``seed`` depends only on
``(seed, i)``. A fixed set of ``HELDOUT_SIZE`` (colour, shape, motion, count, background)
combinations never appears in the training split: the ones whose caption has the smallest SHA-256
digest (a rule that does not depend on any random generator's version).

    clip = make_clip(seed=0, index=7)              # Clip: video (T, H, W, 3) uint8, caption, masks
    video, captions = render_batch(0, step, 8)     # (B, 3, T, H, W) float in [-1, 1] for training

Backgrounds are grey and object colours saturated, so an object is found from pixels by its
saturation (see ``vdit_sparse.quality.prompt_following``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch

# Saturated colours with well separated hues; RGB in [0, 1].
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.80, 0.20),
    "cyan": (0.10, 0.80, 0.88),
    "blue": (0.15, 0.30, 0.95),
    "magenta": (0.88, 0.15, 0.85),
}
SHAPES = ("square", "circle", "triangle")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}
MOTIONS = ("left", "right", "up", "down", "still")
COUNTS = (1, 2)
BACKGROUNDS = ("plain", "textured")
SPLITS = ("train", "heldout", "all")
HELDOUT_SIZE = 36  # 10% of the 360 combinations

# Unit displacement per motion in image coordinates (x right, y down).
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}

RADIUS_RANGE = (0.09, 0.13)  # object radius, fraction of min(H, W)
TRAVEL_RANGE = (0.30, 0.45)  # distance travelled over the clip, fraction of the frame side
COLOUR_JITTER = 0.05  # per-channel jitter of an object's colour


@dataclass(frozen=True)
class Combo:
    """What a caption says: one cell of the (colour, shape, motion, count, background) grid."""

    colour: str
    shape: str
    motion: str
    count: int
    background: str

    def caption(self) -> str:
        noun = PLURALS[self.shape] if self.count == 2 else self.shape
        article = "two" if self.count == 2 else "a"
        motion = "staying still" if self.motion == "still" else f"moving {self.motion}"
        return f"{article} {self.colour} {noun} {motion} on a {self.background} background"


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; positions in pixels, (x, y) with y down."""

    combo: Combo
    starts: tuple  # per object (x, y) centre at frame 0
    velocity: tuple  # (dx, dy) pixels per frame, shared by all objects
    radius: float
    rgb: tuple  # object colour after jitter
    background_levels: tuple  # (grey_a, grey_b); equal for a plain background
    cell: int  # checker cell side in pixels
    phase: tuple  # (x, y) checker offset in pixels


@dataclass
class Clip:
    video: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    combo: Combo
    masks: np.ndarray  # (count, T, H, W) bool, each object's pixels
    spec: ClipSpec


def all_combos() -> list[Combo]:
    grid = itertools.product(COLOURS, SHAPES, MOTIONS, COUNTS, BACKGROUNDS)
    return [Combo(*cell) for cell in grid]


def heldout_combos() -> list[Combo]:
    """The ``HELDOUT_SIZE`` combinations whose caption has the smallest SHA-256 digest."""
    return list(_split_combos("heldout"))


def heldout_prompts() -> list[str]:
    return [c.caption() for c in heldout_combos()]


def combos(split: str = "train") -> list[Combo]:
    """The combinations a split draws from: train excludes the held-out ones."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: unknown; use one of {', '.join(SPLITS)}")
    return list(_split_combos(split))


@functools.cache
def _split_combos(split: str) -> tuple[Combo, ...]:
    if split == "all":
        return tuple(all_combos())
    digest = lambda c: hashlib.sha256(c.caption().encode()).hexdigest()  # noqa: E731
    held = set(sorted(all_combos(), key=digest)[:HELDOUT_SIZE])
    return tuple(c for c in all_combos() if (c in held) == (split == "heldout"))


def sample_spec(rng: np.random.Generator, combo: Combo, frames: int, height: int, width: int) -> ClipSpec:
    """Random size, colour jitter, background and a path that keeps every object inside the frame."""
    side = min(height, width)
    radius = rng.uniform(*RADIUS_RANGE) * side
    margin = 1.3 * radius + 1.0  # the triangle's circumradius is 1.25 r
    ux, uy = DIRECTIONS[combo.motion]
    travel = rng.uniform(*TRAVEL_RANGE) * (width if ux else height) if combo.motion != "still" else 0.0
    velocity = (ux * travel / max(frames - 1, 1), uy * travel / max(frames - 1, 1))
    vertical = combo.motion in ("up", "down")  # objects share lanes across the motion axis
    lanes = _lanes(combo.count, width if vertical else height, radius, margin)
    starts = []
    for lo, hi in lanes:
        across = rng.uniform(lo, hi)
        along_size = height if vertical else width
        path_lo = margin + max(0.0, -(uy if vertical else ux)) * travel
        path_hi = along_size - margin - max(0.0, (uy if vertical else ux)) * travel
        along = rng.uniform(path_lo, path_hi)
        starts.append((across, along) if vertical else (along, across))
    rgb = np.clip(np.array(COLOURS[combo.colour]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1)
    grey = rng.uniform(0.2, 0.5)
    levels = (grey, grey + rng.uniform(0.1, 0.2)) if combo.background == "textured" else (grey, grey)
    cell = int(rng.integers(max(2, side // 16), max(3, side // 8) + 1))
    phase = (int(rng.integers(0, 2 * cell)), int(rng.integers(0, 2 * cell)))
    return ClipSpec(combo, tuple(starts), velocity, radius, tuple(rgb), levels, cell, phase)


def _lanes(count: int, size: float, radius: float, margin: float) -> list[tuple]:
    """Ranges of the coordinate across the motion, one per object, far enough apart not to touch."""
    if count == 1:
        return [(margin, size - margin)]
    gap = 1.3 * radius + 2.0
    lanes = [(margin, size / 2 - gap), (size / 2 + gap, size - margin)]
    if lanes[0][1] < lanes[0][0]:
        raise ValueError(f"frame side {size}: too small for two objects of radius {radius:.1f}")
    return lanes


def render(spec: ClipSpec, frames: int, height: int, width: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Video (T, H, W, 3) float in [0, 1] and object masks (count, T, H, W) bool of one clip."""
    video, masks = render_specs([spec], frames, height, width, device)
    return video[0], masks[0, : spec.combo.count]


def render_specs(specs, frames: int, height: int, width: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Videos (B, T, H, W, 3) float in [0, 1] and masks (B, 2, T, H, W) bool, all clips at once.

    Each shape is drawn from a signed distance d (negative inside) with a one-pixel soft edge:
    alpha = clamp(0.5 - d, 0, 1); the mask is alpha > 0.5. A clip of one object has an empty second
    mask. One batch costs a fixed number of tensor operations, whatever its size (the GPU path).
    """
    with _one_thread_on_cpu(device):
        table = lambda rows: torch.tensor(rows, device=device, dtype=torch.float32)  # noqa: E731
        present = table([[k < s.combo.count for k in range(2)] for s in specs])  # (B, 2)
        starts = table([[s.starts[min(k, len(s.starts) - 1)] for k in range(2)] for s in specs])  # (B, 2, 2)
        velocity = table([s.velocity for s in specs])  # (B, 2)
        radius = table([s.radius for s in specs]).view(-1, 1, 1, 1, 1)
        shape = torch.tensor([SHAPES.index(s.combo.shape) for s in specs], device=device).view(-1, 1, 1, 1, 1)
        rgb = table([s.rgb for s in specs]).view(-1, 1, 1, 1, 3)
        t = torch.arange(frames, device=device, dtype=torch.float32).view(1, 1, frames, 1, 1)
        y = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, 1, height, 1) + 0.5
        x = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, 1, width) + 0.5
        centre_x = starts[..., 0, None, None, None] + velocity[:, None, 0, None, None, None] * t  # (B, 2, T, 1, 1)
        centre_y = starts[..., 1, None, None, None] + velocity[:, None, 1, None, None, None] * t
        distance = _signed_distance(shape, x - centre_x, y - centre_y, radius)  # (B, 2, T, H, W)
        alpha = (0.5 - distance).clamp(0, 1) * present[..., None, None, None]
        video = _background(specs, height, width, device)[:, None].expand(-1, frames, -1, -1, -1)  # (B, T, H, W, 3)
        for k in range(2):
            a = alpha[:, k, ..., None]  # (B, T, H, W, 1)
            video = video * (1 - a) + rgb * a
        return video, alpha > 0.5


@contextlib.contextmanager
def _one_thread_on_cpu(device):
    """Run on one CPU thread: a clip is too small to split, and on a busy CPU torch's pool thrashes (30x)."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _signed_distance(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Distance to the edge of shape SHAPES[shape], negative inside; shapes have about equal areas.

    square: max(|dx|, |dy|) - 0.886 r (the circle's area); circle: |(dx, dy)| - r; triangle: upward
    equilateral of circumradius R = 1.25 r, the max over its three edges' half-planes minus R / 2.
    """
    square = torch.maximum(dx.abs(), dy.abs()) - 0.886 * r
    circle = torch.sqrt(dx * dx + dy * dy) - r
    sides = torch.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy)  # outward normals (+-0.866, -0.5)
    triangle = torch.maximum(dy, sides) - 0.625 * r  # the bottom edge's normal is (0, 1)
    return torch.where(shape == 0, square, torch.where(shape == 1, circle, triangle))


def _background(specs, height: int, width: int, device) -> torch.Tensor:
    """Grey (B, H, W, 3): uniform, or a checkerboard of two greys with cells of ``spec.cell`` pixels."""
    as_column = lambda rows: torch.tensor(rows, device=device).view(-1, 1, 1)  # noqa: E731
    cell = as_column([s.cell for s in specs])
    y = torch.arange(height, device=device).view(1, height, 1) + as_column([s.phase[1] for s in specs])
    x = torch.arange(width, device=device).view(1, 1, width) + as_column([s.phase[0] for s in specs])
    checker = ((x // cell + y // cell) % 2).float()  # (B, H, W)
    low = as_column([s.background_levels[0] for s in specs]).float()
    high = as_column([s.background_levels[1] for s in specs]).float()
    return (low + (high - low) * checker)[..., None].expand(-1, -1, -1, 3)


def clip_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def sample_clip_spec(seed: int, index: int, frames: int, height: int, width: int, split: str = "train") -> ClipSpec:
    """The spec of clip ``index`` of the stream ``seed``: a uniform draw from the split's combos."""
    _check_size(frames, height, width)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: unknown; use one of {', '.join(SPLITS)}")
    pool = _split_combos(split)
    rng = clip_rng(seed, index)
    combo = pool[int(rng.integers(len(pool)))]
    return sample_spec(rng, combo, frames, height, width)


def make_clip(
    seed: int, index: int = 0, frames: int = 25, height: int = 128, width: int = 128, split: str = "train"
) -> Clip:
    spec = sample_clip_spec(seed, index, frames, height, width, split)
    video, masks = render(spec, frames, height, width)
    video_u8 = (video * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)
    return Clip(video_u8, spec.combo.caption(), spec.combo, masks.numpy(), spec)


def render_batch(
    seed: int, step: int, batch_size: int, frames: int = 25, height: int = 128, width: int = 128,
    split: str = "train", device="cpu",
) -> tuple[torch.Tensor, list[str]]:
    """Clips ``step * batch_size ...`` of the stream, as (B, 3, T, H, W) float in [-1, 1], and captions."""
    indices = range(step * batch_size, (step + 1) * batch_size)
    specs = [sample_clip_spec(seed, i, frames, height, width, split) for i in indices]
    video, _ = render_specs(specs, frames, height, width, device)  # (B, T, H, W, 3)
    return video.permute(0, 4, 1, 2, 3) * 2 - 1, [s.combo.caption() for s in specs]


def _check_size(frames: int, height: int, width: int) -> None:
    if frames < 2:
        raise ValueError(f"frames={frames}: need at least 2 to show motion")
    if min(height, width) < 32:
        raise ValueError(f"height, width = {height}, {width}: need at least 32 pixels each")
