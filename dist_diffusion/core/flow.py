"""Rectified flow (Liu et al. 2023; flow matching, Lipman et al. 2023) in the form SD3 trains
it (Esser et al. 2024): continuous t in [0, 1], the straight path

    x_t = (1 - t) x0 + t eps,                      (SD3 eq. 3 with a_t = 1 - t, b_t = t)

and the network predicting its velocity v = dx_t/dt = eps - x0 (the "v" of
``diffusion.prediction`` under this process). Training draws t from a logit-normal
(SD3 sec. 3.1: t = sigmoid(m + s n), n ~ N(0, 1)) or a uniform distribution; the network's
timestep input is t * T (T = diffusion.num_train_timesteps), the range a UNet's timestep
embedding sees under DDPM, as SD3 and diffusers feed it. Sampling integrates the ODE
dx/dt = v from t = 1 (noise) to 0 (data) with Euler or Heun steps, on diffusers'
FlowMatchEulerDiscreteScheduler's grid, so the export's scheduler reproduces our Euler loop.
"""

from __future__ import annotations

import numpy as np
import torch

from .guidance import guided_output
from .processes import ForwardProcess


class RectifiedFlow(ForwardProcess):
    name = "rectified_flow"
    recorded_before = {"process": "ddpm"}

    def __init__(self, diffusion):
        super().__init__(diffusion)
        self.num_timesteps = diffusion.num_train_timesteps

    def sample_time(self, n, gen):
        d = self.diffusion
        if d.time_distribution == "uniform":
            return torch.rand(n, generator=gen, device=gen.device)
        normal = torch.randn(n, generator=gen, device=gen.device)
        return torch.sigmoid(d.logit_mean + d.logit_std * normal)  # SD3 eq. 19, logit-normal

    def noised(self, x0, noise, t):
        t = _expand(t, x0)
        return (1 - t) * x0 + t * noise

    def target(self, x0, noise, t):
        return noise - x0

    def network_time(self, t):
        return t * self.num_timesteps

    def split(self, output, x_t, t):
        """x0 = x_t - t v, eps = x_t + (1 - t) v: the two ends of the straight line through x_t."""
        t = _expand(t, x_t) if t.dim() else t
        return x_t - t * output, x_t + (1 - t) * output

    def noise_level(self, t):
        return t.float()

    def times(self, steps: int) -> torch.Tensor:
        """(steps + 1,) float32 times from 1 down to 0: ``steps`` points evenly spaced from 1 to
        1/T, then 0, as FlowMatchEulerDiscreteScheduler (shift 1) lays them out."""
        if steps < 1:
            raise ValueError(f"sampling steps={steps} must be >= 1")
        T = self.num_timesteps
        last = float(torch.tensor(1.0) / T)  # 1/T in float32, as diffusers' table holds it
        grid = torch.from_numpy(np.linspace(1.0 * T, last * T, steps) / T).float()
        return torch.cat([grid, grid.new_zeros(1)])

    def export_record(self):
        d = self.diffusion
        return {"process": self.name, "prediction": d.prediction, "num_train_timesteps": d.num_train_timesteps}

    def diffusers_scheduler(self, sample):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_timesteps, shift=1.0)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in the dtype of ``like``."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def velocity(model, process: RectifiedFlow, x, t: torch.Tensor, labels, guidance) -> torch.Tensor:
    """The guided velocity at time t (0-d). The guidance interval [lo, hi], written in the
    ddpm process's timesteps 0..T-1, guides the times lo/(T-1) <= t <= hi/(T-1): the same
    share of the way from data to noise."""
    T = process.num_timesteps
    at = t.item() * (T - 1)
    return guided_output(model, x, process.network_time(t).item(), labels, guidance, at=at).float()


def euler(model, process, noise, labels, guidance, sample, generators, progress=None):
    """Euler's method on dx/dt = v: x_{t'} = x_t + (t' - t) v(x_t, t)."""
    ts, x = process.times(sample.steps), noise.float()
    for t, t_next in _pairs(ts, progress):
        x = x + (t_next - t) * velocity(model, process, x, t, labels, guidance)
    return x


def heun(model, process, noise, labels, guidance, sample, generators, progress=None):
    """Heun's second-order method (Karras et al. 2022, alg. 1): an Euler step, then the
    average of the velocities at both ends; the last step, to t = 0, stays Euler. NFE:
    2 steps - 1."""
    ts, x = process.times(sample.steps), noise.float()
    for t, t_next in _pairs(ts, progress):
        v = velocity(model, process, x, t, labels, guidance)
        x_next = x + (t_next - t) * v
        if t_next > 0:
            v = 0.5 * (v + velocity(model, process, x_next, t_next, labels, guidance))
            x_next = x + (t_next - t) * v
        x = x_next
    return x


def _pairs(ts: torch.Tensor, progress):
    pairs = list(zip(ts[:-1], ts[1:]))
    return progress(pairs) if progress else pairs
