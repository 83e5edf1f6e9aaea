"""Noise schedules and the forward process q(x_t | x_0).

Notation follows Ho et al. 2020 (DDPM): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, with t in 0..T-1 (0-based, as in diffusers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Defaults of the two linear-family schedules: DDPM (Ho et al.) and LDM (Rombach et al.).
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep constants of a discrete-time diffusion; all tensors have shape (T,)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """The same schedule on ``device``: move it once, so no step copies its tables."""
        return NoiseSchedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for integer timesteps t of shape (B,); t = -1 means 'clean' (1.0)."""
        padded = torch.cat([self.alphas_cumprod, self.alphas_cumprod.new_ones(1)])
        return padded[t]  # index -1 picks the appended 1.0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), shape (B,)."""
        a = self.alphas_cumprod[t]
        return a / (1.0 - a)


def make_schedule(name: str = "linear", num_timesteps: int = 1000,
                  beta_start: float | None = None, beta_end: float | None = None,
                  snr_shift: float = 1.0) -> NoiseSchedule:
    """Build a schedule. Betas are float32 like diffusers'; alpha_bar is their cumprod.
    ``snr_shift`` != 1 divides every step's SNR by its square (see :func:`shift_snr`)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {list(SCHEDULES)}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps={num_timesteps} must be >= 2")
    if name == "cosine":
        betas = _cosine_betas(num_timesteps)
    else:
        lo, hi = DEFAULT_BETAS[name]
        lo, hi = beta_start or lo, beta_end or hi
        if name == "linear":
            betas = torch.linspace(lo, hi, num_timesteps, dtype=torch.float32)
        else:  # LDM: linear in sqrt(beta)
            betas = torch.linspace(lo ** 0.5, hi ** 0.5, num_timesteps, dtype=torch.float32) ** 2
    schedule = NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))
    return schedule if snr_shift == 1.0 else shift_snr(schedule, snr_shift)


def forward_process(diffusion) -> NoiseSchedule:
    """The schedule a config's ``diffusion`` section names: the one place its keys become
    a schedule, for training, sampling and the export's scheduler alike."""
    d = diffusion
    return make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end, d.snr_shift)


def shift_snr(schedule: NoiseSchedule, shift: float) -> NoiseSchedule:
    """The schedule with SNR_t / shift^2 at every step (Hoogeboom et al. 2023, "simple
    diffusion", sec. 3.1). Why: the mean over an L x L latent has L^2 times the SNR of one
    position, so at twice the side a schedule keeps colour and layout visible to far higher
    t, and the steps that must decide them from the label alone get rare; shift 2 gives a
    16x16 latent the global noise an 8x8 one has unshifted."""
    a = schedule.alphas_cumprod.double()
    snr = a / (1 - a) / shift ** 2
    shifted = snr / (1 + snr)
    betas = (1 - shifted / torch.cat([shifted.new_ones(1), shifted[:-1]])).float()
    # alpha_bar as the cumprod of the float32 betas, as unshifted: what diffusers computes
    # from the same betas (an export's scheduler), to the bit
    return NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at 0.999 to avoid a singularity at t=T."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in the dtype of ``like`` for broadcasting over images."""
    return coef.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0), DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    a = schedule.alphas_cumprod.to(x0.device)[t]
    return _expand(a.sqrt(), x0) * x0 + _expand((1 - a).sqrt(), x0) * noise


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
    """Velocity (Salimans & Ho 2022, sec. 4): v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
    a = schedule.alphas_cumprod.to(x0.device)[t]
    return _expand(a.sqrt(), x0) * noise - _expand((1 - a).sqrt(), x0) * x0


def split_prediction(prediction: str, output: torch.Tensor, x_t: torch.Tensor,
                     alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> (x0_hat, eps_hat) at noise level alpha_bar (shape (B,) or scalar).

    epsilon: x0 = (x_t - sqrt(1-a) eps) / sqrt(a)                (DDPM eq. 15)
    v:       x0 = sqrt(a) x_t - sqrt(1-a) v,  eps = sqrt(a) v + sqrt(1-a) x_t
    """
    a = alpha_bar.reshape(-1, *([1] * (x_t.dim() - 1))) if alpha_bar.dim() else alpha_bar
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    if prediction == "epsilon":
        return (x_t - sqrt_1ma * output) / sqrt_a, output
    if prediction == "v":
        return sqrt_a * x_t - sqrt_1ma * output, sqrt_a * output + sqrt_1ma * x_t
    raise ValueError(f"unknown prediction type {prediction!r}; choose 'epsilon' or 'v'")


def make_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading",
                   multistep: bool = False) -> torch.Tensor:
    """Descending integer timesteps for a ``steps``-step sampler (Lin et al. 2024, table 2),
    as diffusers names them:

    leading:  0, k, 2k, ... with k = T // steps            (DDIM paper, diffusers default)
    trailing: T-1, T-1-k', ... with k' = T / steps         (reaches t = T-1, zero-SNR friendly)
    linspace: round(linspace(0, T-1, steps))
    Multistep solvers (DPM-Solver++, UniPC: ``multistep``) lay leading and linspace out over
    steps + 1 points and drop the last (t = 0), as diffusers' multistep schedulers do.
    After the last timestep every sampler steps to the clean image (alpha_bar = 1).
    """
    T = num_train_timesteps
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if not 1 <= steps <= T - int(multistep):
        raise ValueError(f"sampling steps={steps} must be between 1 and T={T}{' - 1' if multistep else ''}")
    points = steps + 1 if multistep and spacing != "trailing" else steps
    if spacing == "leading":
        ts = np.arange(0, points) * (T // points)
    elif spacing == "trailing":
        ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps]
    else:
        ts = np.linspace(0, T - 1, points).round()
    return torch.from_numpy(np.sort(ts.astype(np.int64))[::-1][:steps].copy())
