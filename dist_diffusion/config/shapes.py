"""The shape of what the UNet sees, derived from the config: the VAE's downsampling factor
(a pretrained VAE's own, from its config.json) and the latent's (C, H, W). Used by the
config rules, the trainer's shard checks, the model builders and eval's export check."""

from __future__ import annotations

import json
from pathlib import Path

from .schema import DataConfig, VAEConfig


def latent_downsample(v: VAEConfig) -> int:
    """Spatial factor between images and latents (1 without a VAE): a pretrained VAE's own,
    from its config.json, so a recipe's vae.block_out_channels cannot disagree with it."""
    if not v.enabled:
        return 1
    levels = pretrained_vae_config(v.pretrained).get("block_out_channels", v.block_out_channels)
    return 2 ** (len(levels) - 1)


def pretrained_vae_config(path: str) -> dict:
    """The diffusers config.json of the VAE directory ``path``; {} where there is none to
    read (no vae.pretrained, or not a VAE directory: loading it says so)."""
    config = Path(path) / "config.json" if path else None
    try:
        loaded = json.loads(config.read_text()) if config and config.is_file() else {}
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def unet_input_shape(v: VAEConfig, data: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) the UNet sees: VAE latents, or the images themselves in pixel space."""
    side = data.resolution // latent_downsample(v)
    channels = v.latent_channels if v.enabled else data.image_channels
    return channels, side, side
