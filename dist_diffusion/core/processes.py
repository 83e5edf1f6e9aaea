"""Forward processes: how a training pair is made from data and noise, and everything that
follows from that choice. A process owns

- the training-time distribution of t (:meth:`ForwardProcess.sample_time`),
- x_t from (x0, noise, t), the training target and the per-sample loss,
- what the network's timestep input is for a t (:meth:`ForwardProcess.network_time`),
- how a network output becomes (x0, noise) (:meth:`ForwardProcess.split`),
- where t lies between data and noise, for the logger (:meth:`ForwardProcess.noise_level`),
- its sampling time grid (each process family names its own; its samplers call it),
- what an export records about it (``dist_diffusion.json``) and the matching diffusers
  scheduler.

A process is built from the config's ``diffusion`` section alone. Which class a
``diffusion.process`` name means is written once, in the registry
(``dist_diffusion.config.registry``), beside the samplers that integrate it: adding a
process is its class and one registry entry.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Dict, Tuple

import torch

from ..config import DiffusionConfig
from ..config.registry import PROCESSES
from .losses import Denoiser, diffusion_loss, per_sample_mse
from .schedule import (DEFAULT_BETAS, NoiseSchedule, add_noise, forward_process, make_timesteps, split_prediction,
                       v_target)


class ForwardProcess(ABC):
    """q(x_t | x0) of one family, and what training, sampling and the export need from it.
    Tensors are (B, C, H, W) images and (B,) times."""

    name = ""
    # keys of dist_diffusion.json an export written before they were recorded implies
    recorded_before: Dict[str, Any] = {}

    def __init__(self, diffusion):
        self.diffusion = diffusion  # the config's diffusion section

    def to(self, device: torch.device | str) -> "ForwardProcess":
        """The process with its tables on ``device`` (itself when it has none)."""
        return self

    @abstractmethod
    def sample_time(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n,) training times drawn from ``gen`` on its device: all of a step's randomness
        comes from the step's generator."""

    @abstractmethod
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, a draw of q(x_t | x0) with the given noise."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at (x_t, t)."""

    @abstractmethod
    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep input for times t."""

    @abstractmethod
    def split(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A network output at (x_t, t) -> (x0_hat, noise_hat)."""

    @abstractmethod
    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Where times t lie between the data (0) and pure noise (1), float32 (B,): the
        logger splits the loss by its quarters."""

    @abstractmethod
    def export_record(self) -> Dict[str, Any]:
        """``diffusion.*`` keys an export records (``dist_diffusion.json``) and a sampling
        job checks against its own config; ``process`` is always one of them."""

    @abstractmethod
    def diffusers_scheduler(self, sample):
        """The diffusers scheduler that samples this process as our sampler does, for the
        ``sample`` section's settings (the export's ``scheduler/``)."""

    def loss(self, model: Denoiser, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (B,) between the network's output at x_t and the target; the
        caller takes the mean (and splits it by :meth:`noise_level`)."""
        output = model(self.noised(x0, noise, t), self.network_time(t), labels)
        return per_sample_mse(output, self.target(x0, noise, t))


class VariancePreserving(ForwardProcess):
    """DDPM's discrete variance-preserving process (Ho et al. 2020): integer t in 0..T-1,
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps under the configured beta schedule
    (linear, scaled-linear, cosine; optionally SNR-shifted), the network predicting eps or v.
    Its samplers (DDPM, DDIM, DPM-Solver++(2M), UniPC) live in core.samplers."""

    name = "ddpm"
    recorded_before = {"process": "ddpm", "snr_shift": 1.0}

    def __init__(self, diffusion, schedule: NoiseSchedule | None = None):
        super().__init__(diffusion)
        self.schedule = forward_process(diffusion) if schedule is None else schedule
        self.prediction = diffusion.prediction

    @classmethod
    def of_schedule(cls, schedule: NoiseSchedule, prediction: str) -> "VariancePreserving":
        """The process of an explicit schedule, for sampling with it (run_sampler): its
        ``diffusion`` section names no schedule, so it has no export record of its own."""
        return cls(DiffusionConfig(num_train_timesteps=schedule.num_timesteps, prediction=prediction), schedule)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def to(self, device) -> "VariancePreserving":
        return VariancePreserving(self.diffusion, self.schedule.to(device))

    def sample_time(self, n, gen):
        """t ~ U{0, ..., T-1} (DDPM alg. 1)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=gen, device=gen.device)

    def noised(self, x0, noise, t):
        return add_noise(self.schedule, x0, noise, t)

    def target(self, x0, noise, t):
        return noise if self.prediction == "epsilon" else v_target(self.schedule, x0, noise, t)

    def network_time(self, t):
        return t

    def split(self, output, x_t, t):
        return split_prediction(self.prediction, output, x_t, self.schedule.alpha_bar(t))

    def noise_level(self, t):
        return t.float() / self.num_timesteps

    def loss(self, model, x0, labels, t, noise):
        """L_simple (DDPM eq. 14) with min-SNR weighting (diffusion.min_snr_gamma)."""
        return diffusion_loss(model, self.schedule, x0, labels, t, noise, self.prediction,
                              self.diffusion.min_snr_gamma)

    def timesteps(self, steps: int, spacing: str, multistep: bool = False) -> torch.Tensor:
        """The sampling grid: ``steps`` descending integer timesteps (see make_timesteps)."""
        return make_timesteps(self.num_timesteps, steps, spacing, multistep)

    def export_record(self):
        d = self.diffusion
        return {"process": self.name, "prediction": d.prediction, "schedule": d.schedule,
                "num_train_timesteps": d.num_train_timesteps, "snr_shift": d.snr_shift}

    def diffusers_scheduler(self, sample):
        """diffusers' DDIMScheduler with the same betas (float32), prediction, spacing and x0
        clipping as our DDIM; the last step goes to the clean image (set_alpha_to_one), as
        ours does."""
        from diffusers import DDIMScheduler

        d = self.diffusion
        lo, hi = DEFAULT_BETAS.get(d.schedule, (1e-4, 0.02))
        # diffusers has no SNR shift: a shifted schedule travels as its betas
        shifted = self.schedule.betas.tolist() if d.snr_shift != 1.0 else None
        return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=BETA_SCHEDULE[d.schedule],
                             beta_start=d.beta_start or lo, beta_end=d.beta_end or hi, trained_betas=shifted,
                             prediction_type=PREDICTION_TYPE[d.prediction], clip_sample=sample.clip_x0,
                             set_alpha_to_one=True, steps_offset=0, timestep_spacing=sample.spacing)


# our schedule names -> diffusers' beta_schedule; prediction -> prediction_type
BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPE = {"epsilon": "epsilon", "v": "v_prediction"}


def make_process(diffusion) -> ForwardProcess:
    """The process ``diffusion.process`` names, built from the ``diffusion`` section."""
    return implementation(PROCESSES[diffusion.process].implementation)(diffusion)


def implementation(path: str):
    """The object a registry entry names, ``module:attribute`` under dist_diffusion (e.g.
    ``core.samplers:ddim``). Imported on first use, so the registry itself stays free of
    torch: a launcher validates a config without importing it."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"dist_diffusion.{module}"), name)
