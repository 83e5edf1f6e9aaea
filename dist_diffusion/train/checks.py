"""What every launcher checks before a rank starts, each failure one line: the run
directory can resume with this config and is not in use, and the shards are there and
fit the model. Torch-free, so a launcher (`dist-diffusion train --nproc N`, the Ray and
submitit launchers) answers in a fraction of a second, not after importing the trainer."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from ..config.shapes import unet_input_shape
from ..data import storage
from ..data.shards import load_manifest
from .objectives import objective
from ..runtime import checkpoint, run_lock


def preflight(cfg: Config, check_lock: bool = True) -> dict:
    """What every launcher checks before a rank starts, and every rank again however it was
    started (torchrun, srun, Ray, a container), each failure one line: the objective's own
    rules, the run directory can resume with this config and is not in use, and the shards
    are there and fit the model. Returns the shards' manifest."""
    objective(cfg).check(cfg)
    checkpoint.check_resumable(cfg)
    manifest = check_data(cfg)
    if cfg.train.ckpt_url:  # not found out at the first checkpoint, after the steps before it
        storage.check_bucket(cfg.train.ckpt_url)
    if check_lock:
        run_lock.check_free(Path(cfg.train.run_dir))
    return manifest


def check_data(cfg: Config) -> dict:
    """The manifest of ``data.shards``, once it is known to fit the model."""
    manifest = load_manifest(cfg.data.shards) if cfg.data.shards else _no_shards()
    _check_data_matches(cfg, manifest)
    return manifest


def _no_shards():
    raise ConfigError("data.shards is empty; point it at shards from `dist-diffusion prepare` "
                      "(images) or `dist-diffusion encode` (latents)")


def _check_data_matches(cfg: Config, manifest: dict) -> None:
    """Shards and model must agree before any step: kind, shape and class count."""
    if objective(cfg).needs_image_shards and manifest["kind"] != "images":
        raise ConfigError(f"train.target={cfg.train.target} needs image shards, but {cfg.data.shards} holds "
                          f"{manifest['kind']}; point data.shards at the output of prepare")
    if manifest["num_classes"] > cfg.model.num_classes and objective(cfg).conditions_on_classes:
        raise ConfigError(f"the shards at {cfg.data.shards} have {manifest['num_classes']} classes but "
                          f"model.num_classes={cfg.model.num_classes}; raise it")
    if objective(cfg).encodes_with_vae(cfg, manifest) and not cfg.vae.pretrained:
        raise ConfigError(f"train.target={cfg.train.target} on the image shards {cfg.data.shards} encodes them with "
                          f"the VAE, but vae.pretrained is empty: it would learn the latents of a randomly "
                          f"initialised VAE. Train one (train.target=vae, then `dist-diffusion export`) or pass a "
                          f"diffusers AutoencoderKL directory as vae.pretrained")
    if manifest["kind"] == "latents":
        if not cfg.vae.enabled:
            raise ConfigError(f"{cfg.data.shards} holds latents but vae.enabled=false; use image shards "
                              f"for pixel-space training")
        if list(manifest["latent_shape"]) != list(unet_input_shape(cfg)):
            raise ConfigError(f"latents in {cfg.data.shards} are {manifest['latent_shape']} but the config "
                              f"expects {list(unet_input_shape(cfg))}; match vae.* and data.resolution")
    elif manifest["resolution"] not in (None, cfg.data.resolution):  # None: original sizes, resized while streaming
        raise ConfigError(f"images in {cfg.data.shards} are {manifest['resolution']}px but "
                          f"data.resolution={cfg.data.resolution}; re-run prepare or change it")
