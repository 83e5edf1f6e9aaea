"""The networks, built from the config tree only: a class-conditional diffusers
``UNet2DModel`` and an ``AutoencoderKL`` (built small, or loaded from a local directory)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DModel

from ..config import ConfigError, DataConfig, ModelConfig, VAEConfig
from .latent_stats import denormalise, latent_affine, normalise
from .losses import Denoiser


def build_unet(m: ModelConfig, input_shape: tuple[int, int, int]) -> UNet2DModel:
    """UNet with a learned class embedding of num_classes + 1 rows; the last row is the
    null label that classifier-free guidance trains and samples with. ``input_shape`` is
    the (C, H, W) it denoises (config.shapes.unet_input_shape)."""
    channels, side, _ = input_shape
    down = ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in m.attention_levels]
    up = ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(m.attention_levels)]
    return UNet2DModel(
        sample_size=side, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=m.norm_num_groups, attention_head_dim=m.attention_head_dim,
        num_class_embeds=m.num_classes + 1, dropout=m.dropout,
    )


def null_label(m: ModelConfig) -> int:
    return m.num_classes


def as_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Adapt a UNet2DModel (or a DeepSpeed engine wrapping one) to (x_t, t, labels) -> out."""
    def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return unet(x, t, class_labels=labels).sample
    return denoise


def build_vae(v: VAEConfig, data: DataConfig) -> AutoencoderKL:
    """The configured VAE: ``vae.pretrained`` (a diffusers directory) or a fresh small one
    for ``data``'s images."""
    if v.pretrained:
        return _load_pretrained_vae(Path(v.pretrained))
    levels = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=data.image_channels, out_channels=data.image_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
        sample_size=data.resolution, scaling_factor=v.scaling_factor,
    )


def _load_pretrained_vae(path: Path) -> AutoencoderKL:
    """Its latent channels and downsampling factor were checked against the config when the
    config loaded (config_rules, from the same config.json)."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"vae.pretrained={path}: no diffusers config.json there; point it at a "
                          f"directory saved by AutoencoderKL.save_pretrained (e.g. an SD-VAE)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True)


def encode_images(vae: AutoencoderKL, images: torch.Tensor, sample: bool = True,
                  generator: torch.Generator | list | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B,3,H,W) -> diffusion latents (B,c,H/f,W/f) of about unit
    variance per channel (see core.latent_stats)."""
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mean
    return normalise(z, *vae_latent_affine(vae))


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images in about [-1, 1]."""
    return vae.decode(denormalise(latents, *vae_latent_affine(vae))).sample


def vae_latent_affine(vae: AutoencoderKL) -> tuple[list[float], list[float]]:
    """(shift, scale) per channel that map this VAE's raw latents to diffusion latents."""
    return latent_affine(vae.config, vae.config.latent_channels)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_classifier(m: ModelConfig, data: DataConfig):
    """The domain classifier for this dataset: its classes, at the data resolution."""
    from .classifier import DomainClassifier

    return DomainClassifier(num_classes=m.num_classes, resolution=data.resolution)
