"""Registry of attention methods, by the name users pass as ``attention=``.

Adding a method: write its module (a ``Method`` subclass with its ``Settings``, ``summary`` and
``knobs``; see base.py), then add it to the tuple below, or, from your own package, declare it as an
entry point of the group ``vdit_sparse.methods`` (vdit_sparse/registry.py). The CLI help, Hydra,
``tune``, ``bench`` and the config checks read this registry.
"""

from __future__ import annotations

from ..registry import METHODS_GROUP, discover
from ..settings import Settings
from .base import AttentionContext, Method
from .dense import Dense
from .sta import STA
from .svg import SVG
from .svg2 import SVG2

BUILTIN = (Dense, SVG, SVG2, STA)


def methods() -> dict[str, type[Method]]:
    """``{name: Method subclass}``: the built-in methods, then the installed packages' (found once, on first use)."""
    return discover(METHODS_GROUP, Method, BUILTIN)


def __getattr__(name: str):
    if name == "METHODS":  # the registry as a module attribute, built on first use (registry.py says why)
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_method(name: str) -> type[Method]:
    registry = methods()
    if name not in registry:
        raise ValueError(f"attention={name!r}: unknown method; known methods are {', '.join(registry)}")
    return registry[name]


def sparse_methods() -> list[str]:
    return [name for name, m in methods().items() if m.sparse]


def settings_for(method: str, overrides: dict | None = None, cache: str = "none") -> Settings:
    """The settings of ``method`` with ``overrides`` (canonical names), checked against the method and the cache.

    Tile-skip knobs among ``overrides`` (``threshold``, ``refresh_every``) are checked as the tile-skip cache's
    (vdit_sparse.caches.TileSkip), and are an error unless ``cache`` includes tileskip: they would change nothing.
    A whole run (settings, tile-skip, step cache, tuned table) resolves with ``vdit_sparse.runspec.resolve``.
    """
    from ..caches import split_tileskip, tileskip_settings

    own, tile = split_tileskip(dict(overrides or {}))
    tileskip_settings(cache, tile)
    return get_method(method).Settings().updated(**own)


__all__ = ["AttentionContext", "Method", "METHODS", "get_method", "methods", "settings_for", "sparse_methods"]
