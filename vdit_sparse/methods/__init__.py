"""Registry of attention methods, by the name users pass as ``attention=``."""

from __future__ import annotations

from .base import AttentionContext, Method
from .dense import Dense

METHODS: dict[str, type[Method]] = {"dense": Dense}


def _register_optional():
    # methods whose modules may not exist yet in a partial checkout stay out of the registry
    import importlib

    for name, (module, cls) in {"svg": (".svg", "SVG"), "svg2": (".svg2", "SVG2")}.items():
        try:
            METHODS[name] = getattr(importlib.import_module(module, __name__), cls)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}{module}":
                raise


_register_optional()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"attention={name!r}: unknown method; known methods are {', '.join(sorted(METHODS))}")
    return METHODS[name]()


__all__ = ["AttentionContext", "Method", "METHODS", "get_method"]
