"""Training objective: the simple DDPM loss with epsilon or v targets, min-SNR weighting,
and classifier-free-guidance label dropout. Every random draw is passed in."""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, add_noise, v_target

# A denoiser maps (x_t (B,C,H,W), t (B,) long, labels (B,) long) -> prediction (B,C,H,W).
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def drop_labels(labels: torch.Tensor, p: float, null_label: int,
                uniform: torch.Tensor) -> torch.Tensor:
    """CFG training (Ho & Salimans 2022, alg. 1): replace each label by the null label
    with probability p. ``uniform`` (B,) are U[0,1) draws made by the caller."""
    return torch.where(uniform < p, torch.full_like(labels, null_label), labels)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Hang et al. 2023, eq. 7: w_t = min(SNR_t, gamma) / SNR_t for epsilon targets;
    v targets already carry a factor (SNR_t + 1), so divide by that instead."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def diffusion_loss(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor,
                   labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   prediction: str = "epsilon", min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-sample weighted MSE, shape (B,): || target - model(x_t, t, y) ||^2 averaged over
    pixels (DDPM eq. 14, 'L_simple'). The caller takes the mean (and can split it by t)."""
    x_t = add_noise(schedule, x0, noise, t)
    target = noise if prediction == "epsilon" else v_target(schedule, x0, noise, t)
    output = model(x_t, t, labels)
    per_sample = per_sample_mse(output, target)
    if min_snr_gamma > 0:
        snr = schedule.snr(t.to(schedule.alphas_cumprod.device)).to(per_sample.device)
        per_sample = per_sample * min_snr_weight(snr, min_snr_gamma, prediction)
    return per_sample


def per_sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32: shape (B,)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
