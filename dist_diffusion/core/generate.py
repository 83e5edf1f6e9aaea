"""Generation from a UNet with the configured sampler: the one place that turns
``cfg.sample`` into a sampler call. Sample i draws all its noise from (sample.seed, i)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import Config
from ..config.shapes import unet_input_shape
from .guidance import Guidance
from .models import as_denoiser, decode_latents, null_label
from .samplers import per_sample_randn, run_sampler, sample_generators
from .schedule import forward_process


@torch.no_grad()
def generate(cfg: Config, unet: torch.nn.Module, labels: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Samples (latents or pixels) for ``labels`` on the UNet's device; row j uses the
    generator of sample indices[j]. The generators stay on the CPU, so every device and
    every process count draws the same noise."""
    s, d = cfg.sample, cfg.diffusion
    where = _device_of(unet)
    gens = sample_generators(s.seed, indices)
    noise = per_sample_randn(gens, unet_input_shape(cfg), where)
    guidance = Guidance(null_label(cfg), s.guidance_scale, tuple(s.guidance_interval) or None)
    schedule = forward_process(d).to(where)
    denoise = in_row_blocks(_in_precision(as_denoiser(unet), where, s.precision), s.network_batch)
    return run_sampler(s.sampler, denoise, schedule, noise, labels.to(where), guidance, steps=s.steps,
                       spacing=s.spacing, eta=s.eta, generators=gens, prediction=d.prediction,
                       clip_x0=s.clip_x0, order=s.order)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _in_precision(denoise, where: torch.device, precision: str):
    """The network under bf16 autocast (sample.precision=bf16); the sampler's own
    arithmetic stays fp32 either way."""
    if precision == "fp32":
        return denoise

    def bf16(x, t, labels):
        with torch.autocast(where.type, dtype=torch.bfloat16):
            return denoise(x, t, labels).float()
    return bf16


def in_row_blocks(fn, rows: int):
    """``fn(*tensors)`` computed on blocks of exactly ``rows`` rows (the last block padded by
    repeating its first row), so every call has one shape. A network's output row then
    depends on its input row alone, not on the batch size around it: kernels choose their
    blocking (and so their rounding) by shape. ``rows`` 0: ``fn`` itself."""
    if rows <= 0:
        return fn

    def blocks(*tensors):
        n, outs = tensors[0].shape[0], []
        for start in range(0, n, rows):
            part = [t[start:start + rows] for t in tensors]
            short = rows - part[0].shape[0]
            padded = [torch.cat([p, p[:1].expand(short, *p.shape[1:])]) if short else p for p in part]
            outs.append(fn(*padded)[:rows - short])
        return torch.cat(outs)
    return blocks


def decode_on_its_device(vae, latents: torch.Tensor, rows: int = 0) -> torch.Tensor:
    """Latents -> images with the VAE wherever it lives, in its dtype, in blocks of ``rows``
    (see :func:`in_row_blocks`); the VAE itself is never moved or cast (during training it
    is the encoder of the next step)."""
    dtype = next(vae.parameters()).dtype
    decode = in_row_blocks(lambda z: decode_latents(vae, z), rows)
    return decode(latents.to(_device_of(vae), dtype)).float()
