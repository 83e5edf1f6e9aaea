"""The VAE objective (Kingma & Welling 2014; LDM's autoencoder without the adversarial
term): reconstruction + kl_weight * KL(q(z|x) || N(0, I))."""

from __future__ import annotations

import torch


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator | None, kl_weight: float,
             recon: str = "l1") -> torch.Tensor:
    """Per-sample loss, shape (B,): mean reconstruction error per pixel of a decoded
    posterior sample, plus kl_weight times the KL summed over the latent."""
    posterior = vae.encode(images).latent_dist
    decoded = vae.decode(posterior.sample(generator=generator)).sample
    error = (decoded.float() - images.float())
    per_pixel = error.abs() if recon == "l1" else error.pow(2)
    return per_pixel.flatten(1).mean(dim=1) + kl_weight * posterior.kl().float()
