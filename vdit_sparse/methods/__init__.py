"""Registry of attention methods, by the name users pass as ``attention=``."""

from __future__ import annotations

from .base import AttentionContext, Method
from .dense import Dense
from .svg import SVG
from .svg2 import SVG2

METHODS: dict[str, type[Method]] = {"dense": Dense, "svg": SVG, "svg2": SVG2}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"attention={name!r}: unknown method; known methods are {', '.join(sorted(METHODS))}")
    return METHODS[name]()


__all__ = ["AttentionContext", "Method", "METHODS", "get_method"]
