"""The VAE objective (Kingma & Welling 2014) as LDM trains its autoencoder (Rombach et al.
2022, after VQGAN, Esser et al. 2021): reconstruction + kl_weight * KL(q(z|x) || N(0, I)),
plus, when ``adversarial_weight`` > 0, a patch discriminator's hinge loss.

Why the adversarial term: an L1/L2 reconstruction of a small latent is the conditional
mean of what the latent leaves undetermined, so stochastic detail (grass, gravel, fabric)
comes back smeared. The discriminator judges 8x8-ish patches as real or decoded and pushes
the decoder to put plausible detail there instead of the average.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) sized for 32-128 px: two stride-2 stages, then a 3x3
    conv to one logit per patch (B,1,H/4,W/4). GroupNorm, not BatchNorm: each rank's
    micro-batch is small and the statistics must not depend on how it is split."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, 1, 3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class AdversarialAutoencoder(nn.Module):
    """What an adversarial VAE run optimises: the ``vae`` (what is exported) and its
    ``discriminator`` (trained beside it, kept in checkpoints, never exported)."""

    def __init__(self, vae: nn.Module, discriminator: PatchDiscriminator):
        super().__init__()
        self.vae, self.discriminator = vae, discriminator


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator | None, kl_weight: float,
             recon: str = "l1", discriminator: nn.Module | None = None,
             adversarial_weight: float = 0.0) -> torch.Tensor:
    """Per-sample loss, shape (B,): mean reconstruction error per pixel of a decoded
    posterior sample, plus kl_weight times the KL summed over the latent, plus (with a
    discriminator) the adversarial terms of :func:`adversarial_terms`."""
    posterior = vae.encode(images).latent_dist
    decoded = vae.decode(posterior.sample(generator=generator)).sample
    error = (decoded.float() - images.float())
    per_pixel = error.abs() if recon == "l1" else error.pow(2)
    reconstruction = per_pixel.flatten(1).mean(dim=1)
    loss = reconstruction + kl_weight * posterior.kl().float()
    if discriminator is None:
        return loss
    return loss + adversarial_terms(discriminator, images, decoded, adversarial_weight, reconstruction.sum())


def balanced_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, decoded: torch.Tensor,
                    weight: float) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7), taken at the decoded image instead of
    the decoder's last layer: weight * ||grad L_rec|| / ||grad L_adv||, a constant. The
    adversarial pull then stays a fixed fraction of the reconstruction's however far the
    discriminator's logits grow; unbalanced, it wiped out the reconstruction here."""
    g_rec, = torch.autograd.grad(reconstruction, decoded, retain_graph=True)
    g_adv, = torch.autograd.grad(adversarial, decoded, retain_graph=True)
    return (weight * g_rec.norm() / (g_adv.norm() + 1e-8)).clamp(max=1e4).detach()


def adversarial_terms(discriminator: nn.Module, real: torch.Tensor, decoded: torch.Tensor,
                      weight: float, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
    """Both players' hinge losses (Lim & Ye 2017) in one per-sample sum, so one backward
    pass and one optimizer train both:

    - discriminator: relu(1 - D(x)) + relu(1 + D(x_hat)), with x_hat detached, so this term
      moves only D;
    - decoder: -weight * D(x_hat), with D's parameters detached (a functional call on
      detached copies), so this term moves only the VAE. Given the ``reconstruction``
      loss (summed), the weight is balanced against it (:func:`balanced_weight`).
    """
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    fooled = functional_call(discriminator, frozen, (decoded,)).float().flatten(1).mean(dim=1)
    if reconstruction is not None and torch.is_grad_enabled():
        weight = balanced_weight(reconstruction, -fooled.sum(), decoded, weight)
    real_logits = discriminator(real).float()
    fake_logits = discriminator(decoded.detach()).float()
    d_loss = (torch.relu(1 - real_logits) + torch.relu(1 + fake_logits)).flatten(1).mean(dim=1)
    return d_loss - weight * fooled
