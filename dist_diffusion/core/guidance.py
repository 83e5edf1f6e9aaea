"""Classifier-free guidance (Ho & Salimans 2022) with an optional guidance interval
(Kynkaanniemi et al. 2024: guide only in the middle of the noise range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .losses import Denoiser


@dataclass(frozen=True)
class Guidance:
    """How to guide: ``scale`` s in eps_u + s (eps_c - eps_u); ``null_label`` is the
    label the model was trained with for 'no class'; ``interval`` (lo, hi) guides only
    timesteps lo <= t <= hi (None: every step). The interval is in the ddpm process's
    timesteps 0..T-1; a process in other units maps its times onto them (see
    :func:`guided_output`'s ``at``)."""

    null_label: int
    scale: float = 1.0
    interval: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"guidance scale {self.scale} must be >= 0")
        if self.interval is not None and not 0 <= self.interval[0] <= self.interval[1]:
            raise ValueError(f"guidance interval {self.interval} must be (lo, hi) with 0 <= lo <= hi")

    def active(self, t: float) -> bool:
        return self.interval is None or self.interval[0] <= t <= self.interval[1]


def guided_output(model: Denoiser, x: torch.Tensor, t: int | float, labels: torch.Tensor,
                  guidance: Guidance, at: Optional[float] = None) -> torch.Tensor:
    """The guided model output at timestep input t for a batch x (B,C,H,W).

    ``t`` is what the network's timestep input gets (an int: a long tensor, as the ddpm
    process feeds it; a float: float32); ``at`` is the position on 0..T-1 that the guidance
    interval is checked at (default: t). Conditional and unconditional passes run as one
    batched forward (2B samples). Scale 1 (or a step outside the interval) is the plain
    conditional output and scale 0 the unconditional one: both skip the second half of the
    batch."""
    dtype = torch.long if isinstance(t, int) else torch.float32
    t_batch = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
    null = torch.full_like(labels, guidance.null_label)
    if guidance.scale == 1.0 or not guidance.active(t if at is None else at):
        return model(x, t_batch, labels)
    if guidance.scale == 0.0:
        return model(x, t_batch, null)
    both = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance.scale * (cond - uncond)
