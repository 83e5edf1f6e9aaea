"""Exports users take elsewhere: a pixel-space UNet export is a diffusers DDIMPipeline
directory whose scheduler samples what ours samples; a latent export carries the same
scheduler beside its UNet (its pipeline: tests/test_pipeline.py)."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from conftest import diffusers_cfg_loop
from dist_diffusion.config import load_config
from dist_diffusion.core.models import build_unet, null_label
from dist_diffusion.config.shapes import unet_input_shape
from dist_diffusion.core.samplers import make_timesteps, per_sample_randn, sample_generators
from dist_diffusion.export import write_export
from dist_diffusion.core.generate import generate

PIXELS = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", "sample.steps=10"]


def exported(tmp_path, overrides):
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    return cfg, write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, tmp_path / "unet", {"weights": "random"})


@pytest.mark.parametrize("forward", [["diffusion.schedule=linear", "diffusion.prediction=epsilon"],
                                     ["diffusion.schedule=cosine", "diffusion.prediction=v",
                                      "sample.spacing=trailing"],
                                     ["diffusion.schedule=scaled_linear"]])
def test_pixel_export_loads_as_ddim_pipeline_and_samples_like_ours(tmp_path, forward):
    """(diffusers' DDIM steps to t - T // steps, the next listed timestep only when steps
    divides T, so linspace, whose gaps are not T // steps, is left out.)"""
    cfg, out = exported(tmp_path, PIXELS + forward)
    pipe = DDIMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, DDIMScheduler) and isinstance(pipe.unet, UNet2DModel)
    indices, labels = range(6), torch.arange(6) % 4
    noise = per_sample_randn(sample_generators(cfg.sample.seed, indices), unet_input_shape(cfg.vae, cfg.data))
    theirs = diffusers_cfg_loop(pipe.unet, pipe.scheduler, noise, labels, null_label(cfg.model), cfg.sample.guidance_scale, cfg.sample.steps)
    ours = generate(cfg.sample, cfg.diffusion, UNet2DModel.from_pretrained(out).eval(), labels, indices)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_pixel_pipeline_shares_the_weights_on_disk(tmp_path):
    _, out = exported(tmp_path, PIXELS)
    top, sub = out / "diffusion_pytorch_model.safetensors", out / "unet/diffusion_pytorch_model.safetensors"
    assert top.stat().st_ino == sub.stat().st_ino  # hard links: one copy of the weights
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]


def test_latent_export_carries_the_scheduler_of_its_forward_process(tmp_path):
    cfg, out = exported(tmp_path, ["diffusion.schedule=scaled_linear", "diffusion.prediction=v"])
    index = json.loads((out / "model_index.json").read_text())  # latent space: a pipeline whose VAE is
    assert index["_class_name"] == "ClassConditionalLatentPipeline"  # the run's vae.pretrained (none here)
    assert index["vae"] == [None, None] and index["latent_space"] is True
    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(cfg.sample.steps)
    assert scheduler.timesteps.tolist() == make_timesteps(1000, cfg.sample.steps, cfg.sample.spacing).tolist()
    assert UNet2DModel.from_pretrained(out).config.in_channels == 4
