"""Generation from a UNet with the configured sampler: the one place that turns
``cfg.sample`` into a sampler call. Sample i draws all its noise from (sample.seed, i)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .config import Config
from .core.guidance import Guidance
from .core.models import as_denoiser, build_unet, decode_latents, null_label, unet_input_shape
from .core.samplers import per_sample_randn, run_sampler, sample_generators
from .core.schedule import make_schedule
from .imaging import save_grid


@torch.no_grad()
def generate(cfg: Config, unet: torch.nn.Module, labels: torch.Tensor, indices: Sequence[int],
             cfg_scale: float | None = None, progress=None) -> torch.Tensor:
    """Samples (latents or pixels) for ``labels``; row j uses the generator of sample indices[j]."""
    s, d = cfg.sample, cfg.diffusion
    gens = sample_generators(s.seed, indices)
    noise = per_sample_randn(gens, unet_input_shape(cfg))
    scale = s.cfg_scale if cfg_scale is None else cfg_scale
    guidance = Guidance(null_label(cfg), scale, tuple(s.guidance_interval) or None)
    schedule = make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end)
    return run_sampler(s.sampler, as_denoiser(unet), schedule, noise, labels, guidance, steps=s.steps,
                       spacing=s.spacing, eta=s.eta, generators=gens, prediction=d.prediction,
                       clip_x0=s.clip_x0, progress=progress)


def class_rows(cfg: Config, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,.. (per_class each): one grid row per class."""
    return torch.arange(cfg.model.num_classes).repeat_interleave(per_class)


@torch.no_grad()
def ema_grid(cfg: Config, ema_state: dict, vae, path: Path, per_class: int = 8) -> Path:
    """A grid of EMA samples, one row per class (at most 10 classes), decoded by the VAE."""
    unet = build_unet(cfg)
    unet.load_state_dict(ema_state)
    unet.eval()
    labels = class_rows(cfg, per_class)[: per_class * 10]
    x = generate(cfg, unet, labels, range(len(labels)))
    if cfg.vae.enabled and vae is not None:
        x = decode_latents(vae.float().cpu(), x)
    return save_grid(x[:, :3], path, nrow=per_class, scale=2)
