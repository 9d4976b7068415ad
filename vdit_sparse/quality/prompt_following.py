"""Does a generated shapes-world clip show what its prompt asks? Measured from pixels alone.

    parse_prompt("two red circles moving left on a plain background")
    # {"colour": "red", "shape": "circle", "motion": "left", "count": 2, "background": "plain"}
    prompt_following(frames, prompt)              # frames (T, H, W, 3) uint8
    # {"colour_ok": True, "motion_ok": True, "count_ok": False, "detected_colour": "red", ...}
    prompt_following_accuracy([(frames, prompt), ...])   # rates over the clips

Objects are the saturated pixels: the world's backgrounds are grey (saturation 0) and its objects
saturated, so saturation = (max - min) / 255 over the channels > ``SATURATION_MIN`` finds them.
Colour: hue of the mean object pixel, nearest world colour. Motion: least-squares slope of the
object centroid over time. Count: connected components per frame, the most common count.
Flicker: mean absolute change of the background between consecutive frames.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from ..shapes_world import COLOURS, PLURALS

SATURATION_MIN = 0.3
STILL_MAX_TRAVEL = 0.1  # a centroid travelling less than this fraction of the frame side is "still"
MIN_OBJECT_FRACTION = 0.002  # components smaller than this fraction of the frame are noise
MIN_OBJECT_RELATIVE = 0.25  # ... or smaller than this fraction of the frame's largest component
COUNT_FRAMES = 8  # frames sampled for the count

COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2}
MOTION_WORDS = {"left": "left", "right": "right", "up": "up", "down": "down", "still": "still", "static": "still"}
SHAPE_WORDS = {**{s: s for s in PLURALS}, **{p: s for s, p in PLURALS.items()}}
BACKGROUND_WORDS = ("plain", "textured")


def parse_prompt(prompt: str) -> dict:
    """The world's attributes a prompt names; each is None when the prompt does not say.

    The count comes from a number word before the shape word ("a", "one", "two"), else from the
    shape word's plural (2) or singular (1); without a shape word it is None.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
    words = re.findall(r"[a-z]+", prompt.lower())
    first = lambda table: next((table[w] for w in words if w in table), None)  # noqa: E731
    shape_word = next((w for w in words if w in SHAPE_WORDS), None)
    count = None
    if shape_word is not None:  # a count without a shape is an article, not a count ("a cat")
        count = next((COUNT_WORDS[w] for w in words[: words.index(shape_word)] if w in COUNT_WORDS), None)
        count = count if count is not None else (1 if shape_word in PLURALS else 2)
    return {
        "colour": first({c: c for c in COLOURS}),
        "shape": SHAPE_WORDS.get(shape_word),
        "motion": first(MOTION_WORDS),
        "count": count,
        "background": first({b: b for b in BACKGROUND_WORDS}),
    }


def prompt_following(frames: np.ndarray, prompt: str) -> dict:
    """Colour, motion and count of the clip's object(s) against the prompt, and flicker.

    ``*_ok`` is None when the prompt does not name that attribute. ``flicker`` is
    mean_t mean_{p in background} |f_{t+1}(p) - f_t(p)| / 255 over pixels that are background in
    both frames (0 for a still background).
    """
    frames = _check_frames(frames)
    wanted = parse_prompt(prompt)
    mask = object_mask(frames)  # (T, H, W)
    detected = {
        "detected_colour": detect_colour(frames, mask),
        "detected_motion": detect_motion(mask),
        "detected_count": detect_count(mask),
    }
    result = {}
    for key in ("colour", "motion", "count"):
        result[f"{key}_ok"] = None if wanted[key] is None else detected[f"detected_{key}"] == wanted[key]
    return {**result, **detected, "flicker": flicker(frames, mask)}


def prompt_following_accuracy(samples) -> dict:
    """Rates over (frames, prompt) pairs: :func:`accuracy_of` their :func:`prompt_following` results."""
    return accuracy_of([prompt_following(frames, prompt) for frames, prompt in samples])


def accuracy_of(results: list[dict]) -> dict:
    """Rates over :func:`prompt_following` results: each ``*_accuracy`` counts only prompts naming that attribute.

    ``all_accuracy``: clips whose every named attribute is right. Rates are None with no clip to count.
    """
    if not results:
        raise ValueError("samples: empty; give at least one (frames, prompt) pair")
    rates = {}
    for key in ("colour", "motion", "count"):
        judged = [r[f"{key}_ok"] for r in results if r[f"{key}_ok"] is not None]
        rates[f"{key}_accuracy"] = float(np.mean(judged)) if judged else None
    every = [all(r[f"{k}_ok"] is not False for k in ("colour", "motion", "count")) for r in results]
    rates["all_accuracy"] = float(np.mean(every))
    rates["mean_flicker"] = float(np.mean([r["flicker"] for r in results]))
    rates["n"] = len(results)
    return rates


def object_mask(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: pixels whose saturation (max - min) / 255 exceeds ``SATURATION_MIN``."""
    spread = frames.max(axis=-1).astype(np.int16) - frames.min(axis=-1).astype(np.int16)
    return spread > SATURATION_MIN * 255


def detect_colour(frames: np.ndarray, mask: np.ndarray) -> str | None:
    """The world colour whose hue is nearest the hue of the mean object pixel; None with no object."""
    if mask.sum() < _min_pixels(mask.shape[1:]):
        return None
    mean_rgb = frames[mask].astype(np.float64).mean(axis=0) / 255
    hue = _hue(mean_rgb)
    distance = {name: _hue_distance(hue, _hue(np.array(rgb))) for name, rgb in COLOURS.items()}
    return min(distance, key=distance.get)


def detect_motion(mask: np.ndarray) -> str | None:
    """Direction of the object centroid's least-squares travel over the clip; "still" below a bound.

    travel = slope * (T - 1) per axis; still when max |travel| < STILL_MAX_TRAVEL * min(H, W), else
    the dominant axis's sign (image y points down).
    """
    t_idx, centres = [], []
    for t, m in enumerate(mask):
        if m.sum() >= _min_pixels(m.shape):
            ys, xs = np.nonzero(m)
            t_idx.append(t)
            centres.append((xs.mean(), ys.mean()))
    if len(t_idx) < 2:
        return None
    t = np.asarray(t_idx, dtype=np.float64)
    c = np.asarray(centres)  # (n, 2) as (x, y)
    slope = ((t - t.mean())[:, None] * (c - c.mean(axis=0))).sum(axis=0) / ((t - t.mean()) ** 2).sum()
    travel = slope * (mask.shape[0] - 1)  # (2,) pixels over the clip
    if np.abs(travel).max() < STILL_MAX_TRAVEL * min(mask.shape[1:]):
        return "still"
    dx, dy = travel
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def detect_count(mask: np.ndarray) -> int | None:
    """Most common number of objects over ``COUNT_FRAMES`` evenly spaced frames; None with none seen."""
    picks = np.unique(np.linspace(0, mask.shape[0] - 1, COUNT_FRAMES).round().astype(int))
    counts = [count_components(mask[t]) for t in picks]
    counts = [c for c in counts if c > 0]
    if not counts:
        return None
    return Counter(counts).most_common(1)[0][0]


def count_components(mask: np.ndarray) -> int:
    """Number of 4-connected components of an (H, W) mask big enough to be objects."""
    sizes = component_sizes(mask)
    if sizes.size == 0:
        return 0
    floor = max(_min_pixels(mask.shape), MIN_OBJECT_RELATIVE * sizes.max())
    return int((sizes >= floor).sum())


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 4-connected components of an (H, W) bool mask.

    Labels start as each pixel's flat index; each round takes the minimum over 4-neighbours inside
    the mask, then jumps label <- label[label], until nothing changes: every pixel ends with the
    smallest index of its component.
    """
    h, w = mask.shape
    outside = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), outside)
    while True:
        new = labels.copy()
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            neighbour = np.roll(labels, shift, axis=axis)
            border = [slice(None), slice(None)]
            border[axis] = 0 if shift == 1 else -1  # np.roll wraps: drop the wrapped row/column
            neighbour[tuple(border)] = outside
            new = np.where(mask, np.minimum(new, neighbour), outside)
        flat = new.ravel()
        inside = flat < outside
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.unique(labels[mask], return_counts=True)[1]


def flicker(frames: np.ndarray, mask: np.ndarray) -> float:
    """Mean |f_{t+1} - f_t| / 255 over pixels that are background in both frames."""
    if frames.shape[0] < 2:
        return 0.0
    diff = np.abs(frames[1:].astype(np.int16) - frames[:-1].astype(np.int16)).mean(axis=-1)  # (T-1, H, W)
    background = ~(mask[1:] | mask[:-1])
    if not background.any():
        return 0.0
    return float(diff[background].mean() / 255)


def _hue(rgb: np.ndarray) -> float:
    """Hue angle in degrees of an RGB triple in [0, 1] (the HSV hexcone)."""
    r, g, b = rgb
    hi, lo = rgb.max(), rgb.min()
    if hi - lo < 1e-9:
        return 0.0
    if hi == r:
        h = (g - b) / (hi - lo) % 6
    elif hi == g:
        h = (b - r) / (hi - lo) + 2
    else:
        h = (r - g) / (hi - lo) + 4
    return float(60 * h)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def _min_pixels(shape) -> float:
    return max(4.0, MIN_OBJECT_FRACTION * shape[0] * shape[1])


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (T, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 pixels, got {frames.dtype}")
    return frames
