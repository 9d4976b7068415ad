"""Registry of attention methods, by the name users pass as ``attention=``.

Adding a method: write its module (a ``Method`` subclass with its ``Settings``, ``summary`` and
``knobs``; see base.py) and add it to the tuple below. The CLI help, ``tune``, ``bench`` and the
config checks read this registry.
"""

from __future__ import annotations

from .base import AttentionContext, Method
from .dense import Dense
from .sta import STA
from .svg import SVG
from .svg2 import SVG2

METHODS: dict[str, type[Method]] = {m.name: m for m in (Dense, SVG, SVG2, STA)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"attention={name!r}: unknown method; known methods are {', '.join(METHODS)}")
    return METHODS[name]


def sparse_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.sparse]


__all__ = ["AttentionContext", "Method", "METHODS", "get_method", "sparse_methods"]
