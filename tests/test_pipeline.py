"""The pipeline users sample an export with: ``ClassConditionalLatentPipeline.from_pretrained``
on a UNet export (one directory, or the UNet export plus its VAE export) samples what our
DDIM sampler samples and decodes with the latent statistics, as our own decode does."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, UNet2DModel

from dist_diffusion.config import load_config, unet_input_shape
from dist_diffusion.core.generate import decode_on_its_device, generate
from dist_diffusion.core.models import build_unet, build_vae
from dist_diffusion.core.samplers import sample_generators
from dist_diffusion.export import write_export
from dist_diffusion.imaging import to_uint8
from dist_diffusion.export.pipeline import ClassConditionalLatentPipeline

LATENT = ["model.num_classes=4", "sample.steps=10"]
PIXELS = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", "sample.steps=10"]
# far from (0, 1), as a small VAE's measured statistics are: a decode that skips them is wrong
STATS = {"latents_mean": [0.8, -1.5, 0.3, 2.0], "latents_std": [3.0, 0.5, 6.0, 1.5]}


def vae_export(path):
    """A VAE export as ``export vae`` writes it: a 32 px <-> 8x8x4 AutoencoderKL whose
    config.json carries per-channel latent statistics (scaling_factor 1)."""
    torch.manual_seed(1)
    tiny = load_config("configs/tiny.yaml")
    vae = build_vae(tiny.vae, tiny.data).eval()
    vae.register_to_config(**STATS, scaling_factor=1.0, shift_factor=None)
    vae.save_pretrained(path)
    (path / "dist_diffusion.json").write_text(json.dumps({"target": "vae"}))
    return path


def unet_export(path, overrides):
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    return cfg, write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, path, {"weights": "random"})


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    vae_dir = vae_export(tmp / "vae_model")
    cfg, out = unet_export(tmp / "unet_model", [*LATENT, f"vae.pretrained={vae_dir}"])
    return cfg, out, vae_dir


def ours(cfg, out, vae_dir, labels, indices):
    """Our sampler and our decode, as ``eval`` runs them: images in [-1, 1]."""
    unet = UNet2DModel.from_pretrained(out).eval()
    latents = generate(cfg.sample, cfg.diffusion, unet, labels, indices)
    return decode_on_its_device(AutoencoderKL.from_pretrained(vae_dir).eval(), latents)


def test_latent_export_is_one_pipeline_directory(latent):
    _, out, vae_dir = latent
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalLatentPipeline" and index["null_class_label"] == 4
    assert {k: index[k] for k in ("unet", "scheduler", "vae")} == {
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": ["diffusers", "AutoencoderKL"]}
    vae_files = out / "vae/diffusion_pytorch_model.safetensors", vae_dir / "diffusion_pytorch_model.safetensors"
    assert vae_files[0].read_bytes() == vae_files[1].read_bytes()
    assert vae_files[0].stat().st_ino != vae_files[1].stat().st_ino  # a copy: re-exporting the VAE leaves it
    pipe = ClassConditionalLatentPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae.config.latents_std == STATS["latents_std"] and pipe.config.null_class_label == 4
    images = pipe(class_labels=[0, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(32, 32)] * 2 and images[0].mode == "RGB"


def test_pipeline_samples_and_decodes_what_our_sampler_and_decode_do(latent):
    """Same per-sample generators, DDIM at the export's steps and CFG: the latents agree with
    core's sampler, and the images with core's decode (latent statistics applied)."""
    cfg, out, vae_dir = latent
    pipe = ClassConditionalLatentPipeline.from_pretrained(out)
    indices, labels = range(5), torch.tensor([0, 1, 2, 3, 1])
    s = cfg.sample

    def call(output_type):
        return pipe(class_labels=labels, guidance_scale=s.guidance_scale, num_inference_steps=s.steps,
                    generator=sample_generators(s.seed, indices), output_type=output_type).images

    theirs_latents = call("latent")
    unet = UNet2DModel.from_pretrained(out).eval()
    assert (theirs_latents - generate(cfg.sample, cfg.diffusion, unet, labels, indices)).abs().max().item() <= 1e-5
    reference = ours(cfg, out, vae_dir, labels, indices)
    assert (call("pt") - (reference.clamp(-1, 1) + 1) / 2).abs().max().item() <= 1e-5
    pil = np.stack([np.asarray(im) for im in call("pil")]).astype(int)
    assert np.abs(pil - to_uint8(reference).permute(0, 2, 3, 1).numpy()).max() <= 1  # rounding at .5 only
    raw_decode = (AutoencoderKL.from_pretrained(vae_dir).decode(theirs_latents).sample.clamp(-1, 1) + 1) / 2
    assert (call("pt") - raw_decode).abs().max().item() > 0.05  # the statistics matter here


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_guidance_scales_one_and_zero_are_the_conditional_and_null_outputs(latent, scale):
    _, out, vae_dir = latent
    cfg = load_config("configs/tiny.yaml", [*LATENT, f"vae.pretrained={vae_dir}", f"sample.guidance_scale={scale}"])
    pipe = ClassConditionalLatentPipeline.from_pretrained(out)
    labels = torch.tensor([2, 0])
    theirs = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=10,
                  generator=sample_generators(cfg.sample.seed, range(2)), output_type="latent").images
    expect = generate(cfg.sample, cfg.diffusion, UNet2DModel.from_pretrained(out).eval(), labels, range(2))
    assert (theirs - expect).abs().max().item() <= 1e-5


def test_a_sample_is_the_same_alone_or_in_a_batch(latent):
    pipe = ClassConditionalLatentPipeline.from_pretrained(latent[1])
    gens = sample_generators(7, range(3))
    batch = pipe(class_labels=[1, 2, 3], num_inference_steps=5, generator=gens, output_type="latent").images
    alone = pipe(class_labels=[3], num_inference_steps=5, generator=sample_generators(7, [2]),
                 output_type="latent").images
    assert torch.allclose(batch[2:], alone, rtol=1e-4, atol=1e-4)  # kernels block by batch size


def test_the_pair_form_when_the_vae_was_not_there_to_copy(tmp_path):
    """A run whose VAE export moved before its UNet was exported: the export names no VAE,
    loading it alone says to pass one, and passing the VAE export samples the same."""
    vae_dir = vae_export(tmp_path / "vae_model")
    cfg = load_config("configs/tiny.yaml", [*LATENT, f"vae.pretrained={vae_dir}"])
    whole = write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, tmp_path / "whole", {"weights": "random"})
    shutil.move(vae_dir, tmp_path / "moved")
    torch.manual_seed(0)
    alone = write_export(UNet2DModel.from_pretrained(whole).eval(), cfg, tmp_path / "alone", {"weights": "random"})
    assert json.loads((alone / "model_index.json").read_text())["vae"] == [None, None]
    assert not (alone / "vae").exists()
    with pytest.raises(ValueError, match=r"vae=AutoencoderKL.from_pretrained"):
        ClassConditionalLatentPipeline.from_pretrained(alone)
    pair = ClassConditionalLatentPipeline.from_pretrained(alone, vae=AutoencoderKL.from_pretrained(tmp_path / "moved"))
    one = ClassConditionalLatentPipeline.from_pretrained(whole)
    kwargs = dict(class_labels=[0, 1], num_inference_steps=4, output_type="pt")
    a = pair(**kwargs, generator=torch.Generator().manual_seed(3)).images
    b = one(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(a, b)


def test_pixel_export_loads_with_the_same_class_and_samples_like_ours(tmp_path):
    cfg, out = unet_export(tmp_path / "pixel", PIXELS)
    assert isinstance(DDIMPipeline.from_pretrained(out), DDIMPipeline)  # still a DDIMPipeline directory
    pipe = ClassConditionalLatentPipeline.from_pretrained(out)
    assert pipe.vae is None and pipe.config.null_class_label == 4 and not pipe.config.latent_space
    indices, labels = range(4), torch.tensor([3, 2, 1, 0])
    x = pipe(class_labels=labels, guidance_scale=cfg.sample.guidance_scale, num_inference_steps=cfg.sample.steps,
             generator=sample_generators(cfg.sample.seed, indices), output_type="pt").images
    unet = UNet2DModel.from_pretrained(out).eval()
    expect = (generate(cfg.sample, cfg.diffusion, unet, labels, indices).clamp(-1, 1) + 1) / 2
    assert x.shape == (4, 3, 16, 16) and (x - expect).abs().max().item() <= 1e-5


def test_a_saved_pipeline_loads_back_the_same(latent, tmp_path):
    pipe = ClassConditionalLatentPipeline.from_pretrained(latent[1])
    pipe.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy/model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["latent_space"] is True
    again = ClassConditionalLatentPipeline.from_pretrained(tmp_path / "copy")
    kwargs = dict(class_labels=[1], num_inference_steps=3, output_type="latent")
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images,
                       again(**kwargs, generator=torch.Generator().manual_seed(0)).images)


@pytest.mark.parametrize("labels, says", [([0, 4], r"\[0, 4\)"), ([-1], r"\[0, 4\)"), ([0.5], "integer"),
                                           ([], "integer")])
def test_bad_class_labels_are_refused_in_one_line(latent, labels, says):
    pipe = ClassConditionalLatentPipeline.from_pretrained(latent[1])
    with pytest.raises(ValueError, match=says):
        pipe(class_labels=labels, num_inference_steps=2)


def test_mismatched_parts_are_refused(latent):
    pipe = ClassConditionalLatentPipeline.from_pretrained(latent[1])
    unconditional = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                norm_num_groups=8)
    with pytest.raises(ValueError, match="class-conditional"):
        ClassConditionalLatentPipeline(unconditional, pipe.scheduler, pipe.vae)
    two_channel = AutoencoderKL(latent_channels=2, block_out_channels=(32,), norm_num_groups=8)
    with pytest.raises(ValueError, match="2 latent channels but the UNet takes 4"):
        ClassConditionalLatentPipeline(pipe.unet, pipe.scheduler, two_channel)
    with pytest.raises(ValueError, match="generators for 2 class labels"):
        pipe(class_labels=[0, 1], num_inference_steps=2, generator=sample_generators(0, range(3)))
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 4, 4\)"):
        pipe(class_labels=[0], num_inference_steps=2, latents=torch.zeros(1, 4, 4, 4))
