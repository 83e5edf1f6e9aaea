"""DDIM-50 against DDPM-1000 on the same model and samples, and the sampling job on 2
processes against 1, timed in one run.

Prints `ddim50_vs_ddpm1000_speedup=<x>` (goal >= 18: 20x fewer network calls, minus the
fixed cost per call); `sampler_vs_diffusers_ratio=<x>`: samples/s of our DDIM-50 CFG-3 loop
over a plain diffusers loop (the export's `scheduler/` DDIMScheduler, the conditional and
unconditional halves in one batched call, as diffusers' pipelines do) on the same exported
UNet and noise, median of alternating rounds (goal >= 1.0); then, last, `sample_scaling_2v1=<x>`: the same `dist-diffusion
sample` job (64 samples, DDIM-50, CFG 3) with --nproc 2 against --nproc 1, from the
sampling seconds each job reports (process start-up excluded; goal >= 1.7 on 2 cores).
Each process gets one core (OMP_NUM_THREADS=1), as each gets one GPU on a cluster; the
single process on both cores (intra-op threads) is printed beside it for context. The model is the tiny UNet of configs/tiny.yaml in
pixel space at 16x16 with CFG 3 (two batched passes per step), on whatever device runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import diffusers_cfg_loop  # noqa: E402  (the loop test_export compares against)

from dist_diffusion.config import load_config  # noqa: E402
from dist_diffusion.core.guidance import Guidance
from dist_diffusion.core.models import as_denoiser, build_unet, null_label
from dist_diffusion.config.shapes import unet_input_shape
from dist_diffusion.core.samplers import per_sample_randn, run_sampler, sample_generators
from dist_diffusion.core.schedule import make_schedule


def time_sampler(name: str, steps: int, model, cfg, n: int) -> float:
    gens = sample_generators(0, range(n))
    noise = per_sample_randn(gens, unet_input_shape(cfg.vae, cfg.data))
    labels = torch.arange(n) % cfg.model.num_classes
    start = time.perf_counter()
    with torch.no_grad():
        run_sampler(name, model, make_schedule(), noise, labels, Guidance(null_label(cfg.model), 3.0),
                    steps=steps, generators=gens)
    return time.perf_counter() - start


def main() -> None:
    cfg = load_config("configs/tiny.yaml", ["vae.enabled=false", "data.resolution=16"])
    torch.manual_seed(0)
    model = as_denoiser(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval())
    time_sampler("ddim", 5, model, cfg, 8)  # warm-up: allocator, kernels
    ddpm = time_sampler("ddpm", 1000, model, cfg, 8)
    ddim = time_sampler("ddim", 50, model, cfg, 8)
    print(f"ddpm1000_seconds={ddpm:.2f} ddim50_seconds={ddim:.2f}")
    print(f"ddim50_vs_ddpm1000_speedup={ddpm / ddim:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"sampler_vs_diffusers_ratio={sampler_vs_diffusers(cfg, tmp):.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).save_pretrained(f"{tmp}/unet")
        seconds = {n: sampling_job_seconds(n, tmp, threads=1) for n in (1, 2)}
        both_cores = sampling_job_seconds(1, tmp, threads=2)
    print(f"sample_job_seconds_1proc={seconds[1]:.2f} sample_job_seconds_2proc={seconds[2]:.2f} "
          f"sample_job_seconds_1proc_2threads={both_cores:.2f}")
    print(f"sample_scaling_2v1={seconds[1] / seconds[2]:.2f}")


def sampler_vs_diffusers(cfg, tmp: str, n: int = 16, rounds: int = 5) -> float:
    """Median over rounds of (diffusers loop seconds / our loop seconds): > 1 means ours is faster."""
    from diffusers import DDIMScheduler, UNet2DModel

    from dist_diffusion.export import write_export

    torch.manual_seed(0)
    write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, Path(tmp) / "unet", {"weights": "random"})
    unet = UNet2DModel.from_pretrained(f"{tmp}/unet").eval()
    scheduler = DDIMScheduler.from_pretrained(f"{tmp}/unet", subfolder="scheduler")
    gens = sample_generators(0, range(n))
    noise = per_sample_randn(gens, unet_input_shape(cfg.vae, cfg.data))
    labels = torch.arange(n) % cfg.model.num_classes
    guidance = Guidance(null_label(cfg.model), 3.0)
    ratios = []
    with torch.no_grad():  # warm-up of both loops: allocator, kernels
        run_sampler("ddim", as_denoiser(unet), make_schedule(), noise, labels, guidance, steps=5, generators=gens)
    diffusers_cfg_loop(unet, scheduler, noise, labels, null_label(cfg.model), 3.0, steps=5)
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.no_grad():
            ours = run_sampler("ddim", as_denoiser(unet), make_schedule(), noise, labels, guidance, steps=50,
                               generators=gens)
        mid = time.perf_counter()
        theirs = diffusers_cfg_loop(unet, scheduler, noise, labels, null_label(cfg.model), 3.0, steps=50)
        ratios.append((time.perf_counter() - mid) / (mid - start))
    assert (ours - theirs).abs().max() < 1e-3, "the two loops sample different images"
    print(f"sampler_vs_diffusers_rounds={','.join(f'{r:.3f}' for r in ratios)}")
    return sorted(ratios)[len(ratios) // 2]


def sampling_job_seconds(nproc: int, tmp: str, threads: int) -> float:
    import os

    out = f"{tmp}/out{nproc}-{threads}"
    subprocess.run([sys.executable, "-m", "dist_diffusion.cli", "sample", "--config", "configs/tiny.yaml",
                    "--nproc", str(nproc), "vae.enabled=false", "data.resolution=16", f"eval.unet={tmp}/unet",
                    f"eval.out={out}", "sample.num_samples=64", "sample.batch_size=8", "eval.samples_per_shard=8",
                    "sample.steps=50", "sample.guidance_scale=3"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(Path(out, "report.json").read_text())["results"][0]["seconds"]


if __name__ == "__main__":
    main()
