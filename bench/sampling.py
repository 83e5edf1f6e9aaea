"""DDIM-50 against DDPM-1000 on the same model and samples, timed in one run.

Prints `ddim50_vs_ddpm1000_speedup=<x>` last (goal >= 18: 20x fewer network calls,
minus the fixed cost per call). The model is the tiny UNet of configs/tiny.yaml in
pixel space at 16x16 with CFG 3 (two batched passes per step), on whatever device runs it.
"""

from __future__ import annotations

import time

import torch

from dist_diffusion.config import load_config
from dist_diffusion.core.guidance import Guidance
from dist_diffusion.core.models import as_denoiser, build_unet, null_label, unet_input_shape
from dist_diffusion.core.samplers import per_sample_randn, run_sampler, sample_generators
from dist_diffusion.core.schedule import make_schedule


def time_sampler(name: str, steps: int, model, cfg, n: int) -> float:
    gens = sample_generators(0, range(n))
    noise = per_sample_randn(gens, unet_input_shape(cfg))
    labels = torch.arange(n) % cfg.model.num_classes
    start = time.perf_counter()
    with torch.no_grad():
        run_sampler(name, model, make_schedule(), noise, labels, Guidance(null_label(cfg), 3.0),
                    steps=steps, generators=gens)
    return time.perf_counter() - start


def main() -> None:
    cfg = load_config("configs/tiny.yaml", ["vae.enabled=false", "data.resolution=16"])
    torch.manual_seed(0)
    model = as_denoiser(build_unet(cfg).eval())
    time_sampler("ddim", 5, model, cfg, 8)  # warm-up: allocator, kernels
    ddpm = time_sampler("ddpm", 1000, model, cfg, 8)
    ddim = time_sampler("ddim", 50, model, cfg, 8)
    print(f"ddpm1000_seconds={ddpm:.2f} ddim50_seconds={ddim:.2f}")
    print(f"ddim50_vs_ddpm1000_speedup={ddpm / ddim:.2f}")


if __name__ == "__main__":
    main()
