"""Registries that other packages extend through entry points.

A package adds an attention method by declaring, in its pyproject.toml::

    [project.entry-points."vdit_sparse.methods"]
    window = "my_package.window:StaticWindow"      # a vdit_sparse.methods.Method subclass

and a step cache through the group ``vdit_sparse.caches`` (a ``vdit_sparse.caches.StepCache`` subclass).
Once installed, the name works everywhere a built-in one does: the CLI and its help, Hydra keys, ``accelerate``,
``tune``, ``compare --sweep`` and ``bench``. An entry point that fails to load, is not such a class, or takes a
built-in's name is skipped with a one-line warning (an installed plugin never stops the tool).

Discovery runs on first use, not at import: a plugin module imports vdit_sparse's modules, and it may be loaded
while they are still importing if discovery ran then.
"""

from __future__ import annotations

import functools
import warnings

METHODS_GROUP = "vdit_sparse.methods"
CACHES_GROUP = "vdit_sparse.caches"


@functools.cache
def discover(group: str, base: type, builtin: tuple) -> dict[str, type]:
    """``{name: class}``: the built-in classes, then each installed entry point of ``group`` (a ``base`` subclass
    with a ``name``), in entry-point order."""
    from importlib.metadata import entry_points

    found = {cls.name: cls for cls in builtin}
    for ep in entry_points(group=group):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin: say so, keep the rest of the tool working
            warnings.warn(f"{group} entry point {ep.name!r} ({ep.value}) failed to load ({type(e).__name__}: {e}); "
                          "skipped", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, base) and cls.name):
            warnings.warn(f"{group} entry point {ep.name!r} ({ep.value}) is not a {base.__name__} subclass with a "
                          "name; skipped", stacklevel=2)
        elif cls.name in found and found[cls.name] is not cls:
            warnings.warn(f"{group} entry point {ep.name!r} ({ep.value}) takes the name {cls.name!r}, which is "
                          "already registered; skipped", stacklevel=2)
        else:
            found[cls.name] = cls
    return found
