"""The map between a VAE's raw latents and the unit-variance latents diffusion trains on.

LDM (Rombach et al. 2022, sec. 4.3.2) rescales latents by 1/std of the data's latents;
SD's 0.18215 is that figure for its VAE. A small VAE trained with a light KL term has
channels whose scales differ several-fold, so one scalar leaves some channels far from
unit variance and the schedule's signal-to-noise ratio wrong for them. We measure per
channel, as EDM2 does, and store the result the way diffusers' SDXL-family VAEs do:
``latents_mean`` and ``latents_std`` (per channel) beside ``scaling_factor`` in the VAE's
own config.json, so every reader of the VAE directory sees the same normalisation.

Diffusion latents:  z' = (z - shift) * scale, per channel (``latent_affine``), where
  - with latents_mean/std:  shift = latents_mean, scale = scaling_factor / latents_std;
  - otherwise (SD-VAE):      shift = shift_factor or 0, scale = scaling_factor.
"""

from __future__ import annotations

from typing import Iterable

import torch


def latent_affine(config, channels: int) -> tuple[list[float], list[float]]:
    """(shift, scale) per channel for a diffusers AutoencoderKL ``config``."""
    factor = float(config.scaling_factor)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        return [float(m) for m in mean], [factor / float(s) for s in std]
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return [shift] * channels, [factor] * channels


def normalise(z: torch.Tensor, shift: list[float], scale: list[float]) -> torch.Tensor:
    """Raw latents (B,C,h,w) -> diffusion latents."""
    s, k = _per_channel(shift, z), _per_channel(scale, z)
    return (z - s) * k


def denormalise(z: torch.Tensor, shift: list[float], scale: list[float]) -> torch.Tensor:
    """Diffusion latents (B,C,h,w) -> raw latents for the decoder."""
    s, k = _per_channel(shift, z), _per_channel(scale, z)
    return z / k + s


def _per_channel(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


@torch.no_grad()
def measure(vae, batches: Iterable[torch.Tensor], generator: torch.Generator) -> dict:
    """Per-channel mean and std of posterior samples z ~ q(z|x) over ``batches`` of images
    in [-1, 1] (what training draws), accumulated in float64."""
    where, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    total = square = None
    count, images = 0, 0
    for batch in batches:
        posterior = vae.encode(batch.to(where, dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(where, posterior.mean.dtype)
        z = (posterior.mean + posterior.std * noise).double().cpu()
        sums, squares = z.sum(dim=(0, 2, 3)), (z * z).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        square = squares if square is None else square + squares
        count += z.numel() // z.shape[1]
        images += z.shape[0]
    if not images:
        raise ValueError("no images to measure the latent statistics on")
    mean = total / count
    std = (square / count - mean * mean).clamp_min(1e-12).sqrt()
    return {"latents_mean": mean.tolist(), "latents_std": std.tolist(), "num_images": images}


def summary(z: torch.Tensor) -> dict:
    """Mean and std of diffusion latents (B,C,h,w), overall and per channel: the check
    that the normalisation did its job (every std near 1)."""
    z = z.double()
    return {"mean": z.mean().item(), "std": z.std().item(),
            "channel_mean": z.mean(dim=(0, 2, 3)).tolist(), "channel_std": z.std(dim=(0, 2, 3)).tolist()}
