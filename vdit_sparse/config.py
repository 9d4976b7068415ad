"""Hydra composition of the shipped configs (configs/, installed as vdit_sparse.configs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError



def config_dir() -> Path:
    """configs/ of this installation: the package data, or the checkout for an editable install."""
    import vdit_sparse.configs as pkg

    if getattr(pkg, "__file__", None) is None:  # a namespace package: some other vdit_sparse/configs/ came first
        where = ", ".join(str(p) for p in getattr(pkg, "__path__", []))
        raise UserError(f"vdit_sparse.configs resolves to {where}, a directory without the package's files (left "
                        "behind by an older install?); remove it, or reinstall vdit-sparse")
    return Path(pkg.__file__).resolve().parent


def user_config_dir() -> Path:
    """Where the user's own files go (tuned tables): $VDIT_SPARSE_HOME, else the platform's user config folder."""
    import os
    import sys

    if os.environ.get("VDIT_SPARSE_HOME"):
        return Path(os.environ["VDIT_SPARSE_HOME"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "vdit-sparse"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "vdit-sparse"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "vdit-sparse"


def user_tuned_dir() -> Path:
    return user_config_dir() / "tuned"


def group_options(group: str) -> list[str]:
    """The names a config group takes: the registries' for ``attention`` and ``cache``, the YAML files' for ``model``."""
    if group == "attention":
        from .methods import METHODS

        return list(METHODS)
    if group == "cache":
        from .caches import STEP_CACHES, TILESKIP

        return ["none", TILESKIP, *STEP_CACHES]
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def register_groups() -> None:
    """Hydra's ``attention`` and ``cache`` groups, one node per registered method and cache (entry-point plugins
    included), so a new method needs no YAML file of ours; keys given as attention.KEY=V are added to the node."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group in ("attention", "cache"):
        for name in group_options(group):
            store.store(group=group, name=name, node={"name": name})


def tuned_names() -> list[str]:
    """Tables ``--tuned NAME`` finds: the user's, then the shipped ones."""
    return sorted({p.stem for d in (user_tuned_dir(), config_dir() / "tuned") for p in d.glob("*.yaml")})


def compose(overrides: list[str]):
    """The resolved config (an OmegaConf DictConfig) for Hydra ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .caches import parse_cache

    overrides = list(overrides)
    for group in ("attention", "model"):
        for o in overrides:
            if o.startswith(f"{group}=") and o.split("=", 1)[1] not in group_options(group):
                raise UserError(f"{group}={o.split('=', 1)[1]!r}: unknown; known: {', '.join(group_options(group))}")
    cache = None
    for i, o in enumerate(overrides):
        if o.startswith("cache="):
            cache = o.split("=", 1)[1]
            try:
                tileskip, step = parse_cache(cache)
            except ValueError as e:
                raise UserError(str(e)) from None
            overrides[i] = f"cache={step or ('tileskip' if tileskip else 'none')}"  # one YAML per cache; combos below
    # configs/tuned/ holds tables, not a config group: Hydra would refuse `tuned=NAME`, so set it after
    tuned = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.lstrip("+").startswith("tuned=")]
    overrides = [o for o in overrides if not o.lstrip("+").startswith("tuned=")]
    register_groups()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"config overrides {' '.join(overrides)!r}: {first}") from None
    if tuned:
        cfg.tuned = None if tuned[-1] in ("null", "") else tuned[-1]
    if cache is not None:
        cfg.cache.name = cache  # tileskip+<step cache>: the step cache's YAML, the combined name
    return cfg


def find_tuned_table(name_or_path: str) -> Path:
    """The table a ``--tuned`` value names: a YAML path as given, or a bare NAME in the user's tuned folder,
    then in the tables shipped in configs/tuned/."""
    path = Path(name_or_path).expanduser()
    if path.suffix or len(path.parts) > 1:
        if not path.is_file():
            raise UserError(f"tuned={name_or_path!r}: no such file")
        return path
    for folder in (user_tuned_dir(), config_dir() / "tuned"):
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    raise UserError(f"tuned={name_or_path!r}: no such table in {user_tuned_dir()} or the shipped ones; "
                    f"known: {', '.join(tuned_names()) or 'none yet'}")


def _read_tuned(name_or_path: str) -> tuple[Path, object]:
    """(path, parsed YAML) of a tuned table; YAML that does not parse is a one-line error naming the file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    path = find_tuned_table(name_or_path)
    try:
        return path, OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tuned table {path}: not valid YAML ({first})") from None


def parse_tuned(data, where: str) -> tuple[dict[int, dict], dict[str, dict]]:
    """(per-layer table, step-cache settings) of a tuned table's contents, from a file or given as a dict:
    ``{"layers": {LAYER: {setting: value}}, "caches": {name: {setting: value}}}`` (either section may be
    missing; ``tune`` writes both), or a bare ``{LAYER: {setting: value}}`` mapping. One parser for both,
    so a dict in the file's shape means what the file means."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with 'layers: {{LAYER: {{setting: value}}}}' and/or 'caches'")
    sectioned = bool({"layers", "caches", "metadata"} & set(map(str, data)))
    layers = (data.get("layers") or {}) if sectioned else data
    caches = (data.get("caches") or {}) if sectioned else {}
    if not isinstance(layers, dict) or not all(isinstance(k, (int, str)) and str(k).isdigit() for k in layers):
        raise UserError(f"{where}: expected 'layers: {{LAYER: {{setting: value}}}}', LAYER a layer index >= 0")
    if not isinstance(caches, dict) or not all(isinstance(v, dict) for v in caches.values()):
        raise UserError(f"{where}: 'caches' must map a cache name to its settings")
    return {int(k): v for k, v in layers.items()}, caches


def load_tuned(name_or_path: str) -> tuple[dict[int, dict], dict[str, dict]]:
    """(per-layer table, step-cache settings) of a tuned YAML (see :func:`find_tuned_table`,
    :func:`parse_tuned`); the ``caches`` section holds settings measured for the model, e.g.
    ``{"magcache": {"mag_ratios": [...]}}`` (written by ``vdit-sparse tune --cache magcache``)."""
    path, data = _read_tuned(name_or_path)
    return parse_tuned(data, f"tuned table {path}")


@dataclass(frozen=True)
class TunedTable:
    """A tuned table, read and parsed once: where it came from, its per-layer table, its step-cache settings and
    its metadata (what it was tuned for)."""

    source: str  # the --tuned value (a name or a path), or "dict" for a table given in Python
    layers: dict
    caches: dict
    metadata: dict

    @classmethod
    def read(cls, tuned) -> "TunedTable":
        """The table ``tuned`` names (a name or path, see :func:`find_tuned_table`), or a dict in the file's shape."""
        if isinstance(tuned, TunedTable):
            return tuned
        if isinstance(tuned, dict):
            path, data, source = "tuned", tuned, "dict"
        else:
            path, data = _read_tuned(str(tuned))
            path, source = f"tuned table {path}", str(tuned)
        layers, caches = parse_tuned(data, path)
        meta = data.get("metadata") if isinstance(data, dict) else None
        return cls(source, layers, caches, meta if isinstance(meta, dict) else {})


def check_tuned_fits(tuned, attention: str, cache: str, model: str, steps: int, step_caches: set | None = None) -> None:
    """Refuse a tuned table (a :class:`TunedTable`, or its name or path) made for another run: its metadata's method,
    model and step count must be this run's, and a table holding only step-cache settings needs ``cache`` to run that
    cache (``step_caches``: the step caches the whole command runs with this table, when that is more than this run's,
    as in a compare sweep of caches). Hand-written tables without metadata are taken as they are."""
    from .caches import parse_cache

    table = TunedTable.read(tuned)
    layers, caches, meta = table.layers, table.caches, table.metadata
    where = f"tuned={table.source!r}"
    used = step_caches if step_caches is not None else {parse_cache(cache)[1]}
    if caches and not layers and not (set(caches) & used):
        raise UserError(f"{where}: holds only step-cache settings ({', '.join(caches)}); run it with "
                        f"--cache {next(iter(caches))}")
    made_for = meta.get("attention")
    if layers and made_for and made_for != attention:
        raise UserError(f"{where}: tuned for attention={made_for!r}, this run is attention={attention!r}; "
                        f"run --attention {made_for}, or tune a table for {attention}")
    if meta.get("model") and meta["model"] != model:
        raise UserError(f"{where}: tuned on model={meta['model']!r}, this run is model={model!r}; tune one for this model")
    tuned_steps = meta.get("steps") or (meta.get("calibration") or {}).get("steps")
    if tuned_steps and tuned_steps != steps:
        raise UserError(f"{where}: tuned at {tuned_steps} steps, this run has {steps}; run --steps {tuned_steps}, "
                        "or tune a table at this step count")


def load_tuned_table(name_or_path: str) -> dict[int, dict]:
    """The per-layer table ``{layer: {setting: value}}`` of a tuned YAML."""
    return load_tuned(name_or_path)[0]


def load_tuned_caches(name_or_path: str) -> dict[str, dict]:
    """The ``caches`` section of a tuned YAML."""
    return load_tuned(name_or_path)[1]
