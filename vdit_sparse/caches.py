"""What ``cache=`` may name: the tile-skip cache (ours, inside attention), alone or with a step-level cache."""

from __future__ import annotations

TILESKIP = "tileskip"
CACHES = ("none", TILESKIP)


def parse_cache(cache: str) -> tuple[bool, str | None]:
    """(tile-skip on, step-level cache name or None) of a ``cache=`` value; a bad value is a named error."""
    if not isinstance(cache, str) or cache not in CACHES:
        raise ValueError(f"cache={cache!r}: unknown cache; known caches are {', '.join(CACHES)}")
    return cache == TILESKIP, None
