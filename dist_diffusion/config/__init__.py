"""One typed config tree for every command, loaded and validated in one place.

- ``registry``: the forward processes and samplers by name (the schema's choices, each
  entry's rules, and where core finds its implementation);
- ``schema``: the sections (one dataclass each, a doc per field) and the frozen base;
- ``shapes``: the shapes a config implies (the VAE's downsampling, the UNet's input);
- ``rules``: the checks across fields and sections that the schema cannot express;
- ``loading``: YAML + ``key=value`` overrides -> a validated, frozen ``Config``.

Imports run one way: registry <- schema <- shapes <- rules <- loading. Components take their own
section (``cfg.train``, ``cfg.sample``, ...); entry points and launchers take the tree.
"""

from .loading import (RUN_FINGERPRINT, derive, field_docs, fingerprint_changes, load_config, replaced,
                      to_yaml)
from .schema import (UNET_PRESETS, Config, ConfigError, DataConfig, DiffusionConfig, EvalConfig,
                     LaunchConfig, LogConfig, ModelConfig, RuntimeConfig, S3Config, SampleConfig, TrainConfig, VAEConfig,
                     parse_sampler_entry)
from .shapes import latent_downsample, pretrained_vae_config, unet_input_shape

__all__ = ["RUN_FINGERPRINT", "UNET_PRESETS", "Config", "ConfigError", "DataConfig", "DiffusionConfig", "EvalConfig",
           "LaunchConfig", "LogConfig", "ModelConfig", "RuntimeConfig", "S3Config", "SampleConfig", "TrainConfig", "VAEConfig",
           "derive", "field_docs", "fingerprint_changes", "latent_downsample", "load_config", "parse_sampler_entry",
           "pretrained_vae_config", "replaced", "to_yaml", "unet_input_shape"]
