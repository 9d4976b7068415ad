"""Hydra composition of the shipped configs (configs/, installed as vdit_sparse.configs)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError



def config_dir() -> Path:
    """configs/ of this installation: the package data, or the checkout for an editable install."""
    import vdit_sparse.configs as pkg

    return Path(pkg.__file__).resolve().parent


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose(overrides: list[str]):
    """The resolved config (an OmegaConf DictConfig) for Hydra ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for group in ("attention", "cache", "model"):
        for o in overrides:
            if o.startswith(f"{group}=") and o.split("=", 1)[1] not in group_options(group):
                raise UserError(f"{group}={o.split('=', 1)[1]!r}: unknown; known: {', '.join(group_options(group))}")
    # configs/tuned/ holds tables, not a config group: Hydra would refuse `tuned=NAME`, so set it after
    tuned = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.lstrip("+").startswith("tuned=")]
    overrides = [o for o in overrides if not o.lstrip("+").startswith("tuned=")]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"config overrides {' '.join(overrides)!r}: {first}") from None
    if tuned:
        cfg.tuned = None if tuned[-1] in ("null", "") else tuned[-1]
    return cfg


def load_tuned_table(name_or_path: str) -> dict:
    """A per-layer table ``{layer: {setting: value}}`` from configs/tuned/NAME.yaml or a YAML path."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = config_dir() / "tuned" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"tuned={name_or_path!r}: no such table; known: {', '.join(group_options('tuned')) or 'none yet'}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    layers = data.get("layers", data) if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise UserError(f"tuned table {path}: expected a mapping 'layers: {{LAYER: {{setting: value}}}}'")
    return layers
