"""Generation from a UNet with the configured process and sampler: the one place that turns
the ``sample`` section into a sampler call. Sample i draws all its noise from (sample.seed, i)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import DiffusionConfig, SampleConfig
from .guidance import Guidance
from .models import as_denoiser, decode_latents
from .processes import make_process
from .samplers import per_sample_randn, sample_generators, sampler


@torch.no_grad()
def generate(sample: SampleConfig, diffusion: DiffusionConfig, unet: torch.nn.Module, labels: torch.Tensor,
             indices: Sequence[int]) -> torch.Tensor:
    """Samples (latents or pixels) for ``labels`` on the UNet's device; row j uses the
    generator of sample indices[j]. The generators stay on the CPU, so every device and
    every process count draws the same noise. The UNet (a class-conditional UNet2DModel)
    gives the sample shape and its null label (the last class row)."""
    where = _device_of(unet)
    gens = sample_generators(sample.seed, indices)
    noise = per_sample_randn(gens, _input_shape(unet), where)
    guidance = Guidance(unet.config.num_class_embeds - 1, sample.guidance_scale,
                        tuple(sample.guidance_interval) or None)
    process = make_process(diffusion).to(where)
    denoise = in_row_blocks(_in_precision(as_denoiser(unet), where, sample.precision), sample.network_batch)
    return sampler(sample.sampler)(denoise, process, noise, labels.to(where), guidance, sample, gens)


def _input_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    side = unet.config.sample_size
    height, width = (side, side) if isinstance(side, int) else side
    return unet.config.in_channels, height, width


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
