"""A recipe is a YAML file in ``configs/`` plus ``key=value`` overrides (OmegaConf
dotlist). :func:`load_config` merges them onto the schema, so an unknown key or a wrong
type is caught by OmegaConf, and a value out of range by the rules; both surface as one
:class:`ConfigError` naming the key and file. A loaded config is frozen; :func:`derive`
makes a changed copy. ``dist-diffusion config`` prints the resolved tree, and ``--docs``
prints every field's doc."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .rules import validate
from .schema import UNET_PRESETS, Config, ConfigError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema <- YAML file <- ``key=value`` overrides, then :func:`validate`.

    Raises :class:`ConfigError` (never an OmegaConf trace) naming key and source.
    """
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), str(path))
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "command-line override")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _apply_presets(cfg)
    return _validated(cfg, source=str(path) if path else "config from overrides")


def derive(cfg: Config, changes: dict[str, Any], source: str = "derived config") -> Config:
    """A new validated, frozen config: ``cfg`` with dotted keys changed (e.g. a launcher's
    absolute ``train.run_dir``); ``cfg`` itself is left as it was."""
    merged = OmegaConf.structured(cfg)
    for key, value in changes.items():
        if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"{source}: {key} is not a config key")
        OmegaConf.update(merged, key, value, merge=False)
    return _validated(OmegaConf.to_object(merged), source)  # type: ignore[arg-type]


_MISSING = object()


def replaced(section: Any, **changes: Any) -> Any:
    """A frozen copy of one section with some fields changed, for values the whole tree was
    validated with already (a sweep's points: config.rules checks each when the config
    loads), so nothing re-validates the tree for each of them."""
    copy = dataclasses.replace(section, **changes)
    _freeze(copy)
    return copy


def _validated(cfg: Config, source: str) -> Config:
    validate(cfg, source=source)
    _freeze(cfg)
    return cfg


def _freeze(node: Any) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _freeze(value)
    object.__setattr__(node, "_frozen", True)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML recipe such as "
                          f"configs/tiny.yaml")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several types
        reason = " ".join(str(err).split())  # PyYAML's message spans lines
        raise ConfigError(f"{path}: not valid YAML ({reason}); fix the syntax") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    if not loaded:
        raise ConfigError(f"{path} is empty; a recipe sets at least one section (see configs/tiny.yaml)")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line override: {err}") from None


def _merge(base: DictConfig, extra: DictConfig, source: str) -> DictConfig:
    for name in extra:  # a section given a scalar or a list: OmegaConf's own error names no key
        if name in base and isinstance(base[name], DictConfig) and not isinstance(extra[name], DictConfig):
            raise ConfigError(f"{source}: {name} must be a mapping of its keys (e.g. {name}.KEY=VALUE, "
                              f"or `{name}:` with indented keys in YAML), not {OmegaConf.to_container(extra)[name]!r}")
    try:
        return OmegaConf.merge(base, extra)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        hint = " (unknown key: check the spelling against `dist-diffusion config --docs`)" \
            if "not in" in reason or "Key" in reason else ""
        renamed = RENAMED_KEYS.get(key)
        if renamed:
            raise ConfigError(f"{source}: {key} was renamed {renamed}; use {renamed}") from None
        raise ConfigError(f"{source}: {key}: {reason}{hint}") from None


# Keys that changed name: an old recipe gets the new name, not "unknown key".
RENAMED_KEYS = {"sample.cfg_scale": "sample.guidance_scale", "eval.cfg_scales": "eval.guidance_scales"}


def _apply_presets(cfg: Config) -> None:
    """Fill the UNet fields left empty from ``model.preset``."""
    preset = UNET_PRESETS.get(cfg.model.preset)
    if preset is None:
        return  # validate() reports the bad preset name
    for name, value in preset.items():
        if getattr(cfg.model, name) in (None, []):
            setattr(cfg.model, name, list(value) if isinstance(value, list) else value)


def to_yaml(cfg: Config) -> str:
    """The resolved tree as YAML (stored with checkpoints and printed by the CLI)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# What a checkpoint's weights and optimizer state are tied to: the network's shape, the
# latent space it learned, the forward process and what it predicts. Hyperparameters
# (learning rate, dropout, steps, batch) may change on a resume; these may not.
RUN_FINGERPRINT = ("model.preset", "model.num_classes", "model.block_out_channels", "model.layers_per_block",
                   "model.attention_levels", "model.norm_num_groups", "model.attention_head_dim",
                   "vae.enabled", "vae.pretrained", "vae.latent_channels", "vae.block_out_channels",
                   "vae.layers_per_block", "vae.norm_num_groups", "vae.scaling_factor",
                   "diffusion.process", "diffusion.num_train_timesteps", "diffusion.schedule",
                   "diffusion.beta_start", "diffusion.beta_end", "diffusion.snr_shift", "diffusion.prediction",
                   "data.resolution", "data.image_channels", "train.target")


def fingerprint_changes(stored_yaml: str, cfg: Config) -> List[str]:
    """``key: old -> new`` for each :data:`RUN_FINGERPRINT` key on which a run's stored
    config (its ``config.yaml``) and ``cfg`` differ."""
    old, new = OmegaConf.create(stored_yaml), OmegaConf.structured(cfg)
    changes = []
    for key in RUN_FINGERPRINT:
        before, after = OmegaConf.select(old, key, default=None), OmegaConf.select(new, key)
        before = OmegaConf.to_container(before) if isinstance(before, (DictConfig, ListConfig)) else before
        after = OmegaConf.to_container(after) if isinstance(after, (DictConfig, ListConfig)) else after
        if before is not None and before != after:
            changes.append(f"{key}: {before} -> {after}")
    return changes


def field_docs(node: Any = Config, prefix: str = "") -> List[tuple[str, str]]:
    """``(dotted key, doc)`` for every leaf field, for ``dist-diffusion config --docs``."""
    rows = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            rows += field_docs(_section_type(node, f.name), prefix=f"{key}.")
        else:
            rows.append((key, f.metadata.get("doc", "")))
    return rows


def _section_type(node: Any, name: str):
    instance = node() if isinstance(node, type) else node
    return type(getattr(instance, name))
