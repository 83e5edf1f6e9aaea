"""A VAE measured on the data it will encode: the per-channel latent statistics that give
diffusion unit-variance latents (written into the VAE's config.json, see
core.latent_stats), and its reconstruction PSNR.

``dist-diffusion export`` calibrates every VAE trained here; ``dist-diffusion
calibrate-vae`` does it for any other VAE directory (a pretrained SD-VAE keeps its
published factor unless asked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..core.latent_stats import measure
from ..data.stream import ShardStream, StreamSpec
from ..logs import get_logger

LOG = get_logger("calibrate")
BATCH = 64


def image_batches(url: str, num_images: int, seed: int = 0, labels: bool = False) -> Iterator:
    """Up to ``num_images`` images of the shards at ``url`` in [-1, 1] (with their labels:
    (images, labels)), in the seeded epoch order (a spread over every shard, not the first
    few), without flips."""
    spec = StreamSpec(url=url, batch_size=BATCH, num_workers=0, seed=seed, hflip=False)
    left = num_images
    for batch in ShardStream(spec, epochs=1):
        if left <= 0:
            return
        images = batch["image"][:left]
        left -= len(images)
        yield (images, batch["label"][:len(images)]) if labels else images


def calibrate(vae, url: str, num_images: int = 1024, seed: int = 0) -> dict:
    """Measure ``vae``'s latents on ``url``'s images and make them its normalisation
    (``latents_mean``/``latents_std`` per channel, ``scaling_factor`` 1, no shift)."""
    stats = measure(vae, image_batches(url, num_images, seed), torch.Generator().manual_seed(seed))
    vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"],
                           scaling_factor=1.0, shift_factor=None)
    spread = ", ".join(f"{s:.3f}" for s in stats["latents_std"])
    LOG.info(f"latent statistics over {stats['num_images']} images of {url}: std per channel {spread}")
    return {**stats, "shards": url}


@torch.no_grad()
def reconstruction_psnr(vae, batches) -> dict:
    """Mean PSNR (dB, pixels in [0, 1]) of posterior-mean reconstructions, and the MSE on
    [-1, 1], over ``batches`` of images."""
    where, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    psnrs, errors = [], []
    for images in batches:
        x = images.to(where, dtype)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        mse = ((recon - x.float()) ** 2).mean(dim=(1, 2, 3))
        errors.append(mse.cpu())
        psnrs.append((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).cpu())  # range 2 on [-1, 1] = 1 on [0, 1]
    if not psnrs:
        raise ValueError("no images to measure the reconstruction on")
    psnr, mse = torch.cat(psnrs), torch.cat(errors)
    return {"psnr_db": psnr.mean().item(), "mse": mse.mean().item(), "num_images": len(psnr)}


@torch.no_grad()
def classification_accuracy(classifier, batches) -> dict:
    """Top-1 accuracy of ``classifier`` over ``batches`` of (images, labels)."""
    where, dtype = next(classifier.parameters()).device, next(classifier.parameters()).dtype
    right = total = 0
    for images, labels in batches:
        predicted = classifier(images.to(where, dtype)).argmax(dim=1).cpu()
        right += int((predicted == labels).sum())
        total += len(labels)
    if not total:
        raise ValueError("no images to measure the accuracy on")
    return {"top1": right / total, "num_images": total}


def calibrate_directory(vae_dir: str | Path, url: str, out: str | Path | None = None, num_images: int = 1024,
                        seed: int = 0) -> dict:
    """``dist-diffusion calibrate-vae``: the VAE directory ``vae_dir`` calibrated on ``url``,
    saved to ``out`` (default: in place); its statistics and PSNR also go to
    ``dist_diffusion.json`` there."""
    from diffusers import AutoencoderKL

    from ..config import ConfigError

    if not (Path(vae_dir) / "config.json").is_file():
        raise ConfigError(f"--vae {vae_dir}: no diffusers config.json there; point it at a directory saved by "
                          f"AutoencoderKL.save_pretrained (an SD-VAE, or `dist-diffusion export` of a VAE run)")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    stats = calibrate(vae, url, num_images, seed)
    quality = reconstruction_psnr(vae, image_batches(url, 256, seed + 1))
    target = Path(out or vae_dir)
    vae.save_pretrained(target, safe_serialization=True)
    record = _read_record(Path(vae_dir))
    record.update({"latent_stats": stats, "reconstruction": quality})
    (target / "dist_diffusion.json").write_text(json.dumps(record, indent=2))
    return {"latent_stats": stats, "reconstruction": quality, "out": str(target)}


def _read_record(vae_dir: Path) -> dict:
    path = vae_dir / "dist_diffusion.json"
    return json.loads(path.read_text()) if path.is_file() else {}
