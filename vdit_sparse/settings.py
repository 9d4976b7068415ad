"""Typed settings: one frozen dataclass per attention method, the only home of defaults and validation.

``Settings`` holds what every method shares (where it runs dense, its block size); each method module
subclasses it with its own fields (``SVGSettings`` in methods/svg.py, ...). The tile-skip cache's knobs are
not a method's: they are ``vdit_sparse.caches.TileSkip``. Python (``accelerate(pipe, attention="svg",
density=0.3)``), the CLI (``--density 0.3``) and Hydra (``attention.density=0.3``) all end in one
``vdit_sparse.runspec.resolve``, so one request gives one settings object, whichever way it came. Every field says how it is checked and what it
means in its metadata, which the CLI help and the error messages read.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, ClassVar


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def nonnegative(name, v):
    if not _is_number(v) or v < 0:
        raise ValueError(f"{name}={v!r}: must be a number >= 0")


def fraction(name, v):
    if not _is_number(v) or not 0 < v <= 1:
        raise ValueError(f"{name}={v!r}: must be a number in (0, 1]")


def optional_fraction(name, v):
    if v is not None:
        fraction(name, v)


def unit_interval(name, v):
    if not _is_number(v) or not 0 <= v <= 1:
        raise ValueError(f"{name}={v!r}: must be a number in [0, 1]")


def positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r}: must be a positive integer")


def count(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name}={v!r}: must be an integer >= 0")


def flag(name, v):
    if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r}: must be true or false")


def optional_positive(name, v):
    if v is not None and (not _is_number(v) or v <= 0):
        raise ValueError(f"{name}={v!r}: must be a positive number, or null for off")


def warmup(name, v):
    if not _is_number(v) or v < 0:
        raise ValueError(f"{name}={v!r}: must be a count >= 0, or a fraction of the steps in [0, 1)")
    if v >= 1 and not float(v).is_integer():
        raise ValueError(f"{name}={v!r}: a value >= 1 is a count and must be whole")


def layers(name, v):
    ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
        isinstance(v, tuple) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    )
    if not ok:
        raise ValueError(f"{name}={v!r}: must be a count >= 0 of first layers, or a list of layer indices")


def log2_bound(name, v):
    if not _is_number(v) or v > 0:
        raise ValueError(f"{name}={v!r}: must be a log2-space bound <= 0 (e.g. -14.4 safe, -10, -3 fast)")


def setting(default, check, help: str):
    """A settings field: its default, its validator ``check(name, value)`` and a one-line help."""
    return field(default=default, metadata={"check": check, "help": help})


class Checked:
    """Base of frozen settings dataclasses: YAML/JSON lists become tuples (settings are hashable) and every
    field is checked by the validator in its metadata, under the name ``label(field)`` errors show."""

    def label(self, name: str) -> str:
        return name

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, value := tuple(value))
            f.metadata["check"](self.label(f.name), value)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Settings(Checked):
    """What every method shares: dense warm-up, dense layers, block size."""

    method: ClassVar[str] = ""

    warmup_steps: float = setting(0, warmup, "first steps run dense: a count, or a fraction of the steps when < 1")
    dense_layers: int | tuple = setting(0, layers, "layers that always run dense: a count from the first, or a list")
    block_size: int = setting(64, positive_int, "tokens per block of positional patterns (svg's band, dense tile-skip)")

    @classmethod
    def own_names(cls) -> list[str]:
        """The settings this method adds to the shared ones."""
        shared = set(Settings.names())
        return [n for n in cls.names() if n not in shared]

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    def updated(self, **overrides: Any) -> "Settings":
        """A copy with ``overrides``; a name this method does not have is an error naming the ones it has."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not a setting of attention={self.method!r}; "
                f"its settings are {', '.join(self.names())}"
            )
        return replace(self, **{k: _plain(v) for k, v in overrides.items()})

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the method's defaults (what a report needs to name)."""
        defaults = type(self)()
        return {k: v for k, v in asdict(self).items() if getattr(defaults, k) != v}



def _plain(v):
    """OmegaConf containers and lists as tuples; everything else as given."""
    if type(v).__name__ == "ListConfig" or isinstance(v, list):
        return tuple(v)
    return v


def __getattr__(name: str):
    if name == "settings_for":  # moved to vdit_sparse.methods in 0.3 (it reads the method registry); this name stays for 0.3
        import warnings

        warnings.warn("vdit_sparse.settings.settings_for moved to vdit_sparse.methods.settings_for", DeprecationWarning,
                      stacklevel=2)
        from .methods import settings_for

        return settings_for
    if name == "TILESKIP_FIELDS":  # 0.3: the tile-skip knobs left the methods' settings for caches.TileSkip
        import warnings

        from .caches import TILESKIP_KEYS

        warnings.warn("vdit_sparse.settings.TILESKIP_FIELDS: the tile-skip knobs are vdit_sparse.caches.TileSkip's "
                      "fields now (caches.TILESKIP_KEYS)", DeprecationWarning, stacklevel=2)
        return TILESKIP_KEYS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
