"""What every launcher checks before a rank starts, each failure one line: the run
directory can resume with this config and is not in use, and the shards are there and
fit the model. Torch-free, so a launcher (`dist-diffusion train --nproc N`, the Ray and
submitit launchers) answers in a fraction of a second, not after importing the trainer."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError, DataConfig, ModelConfig, VAEConfig, fingerprint_changes
from ..config.shapes import unet_input_shape
from ..data import storage
from ..data.shards import load_manifest
from .objectives import Objective, objective
from ..runtime import checkpoint, run_lock


def preflight(cfg: Config, check_lock: bool = True) -> dict:
    """What every launcher checks before a rank starts, and every rank again however it was
    started (torchrun, srun, Ray, a container), each failure one line: the objective's own
    rules, the run directory can resume with this config and is not in use, and the shards
    are there and fit the model. Returns the shards' manifest."""
    goal = objective(cfg)
    goal.check()
    if cfg.eval.during_training and not goal.draws_grids:
        raise ConfigError(f"eval.during_training scores sampled images, but train.target={goal.name} samples none; "
                          f"turn it on for UNet runs (train.target=unet)")
    run_dir = Path(cfg.train.run_dir)
    stored = checkpoint.stored_run_config(run_dir)
    refuse_other_model(run_dir, fingerprint_changes(stored, cfg) if stored is not None else [])
    manifest = check_data(goal, cfg.model, cfg.vae, cfg.data)
    if cfg.train.ckpt_url:  # not found out at the first checkpoint, after the steps before it
        storage.check_bucket(cfg.train.ckpt_url)
    if check_lock:
        run_lock.check_free(run_dir)
    return manifest


def refuse_other_model(run_dir: Path, changes: list[str]) -> None:
    """Refuse, before anything in it changes, to go on with a run directory whose
    checkpoints belong to another model (``changes``: what differs in ``RUN_FINGERPRINT``'s
    keys): the resume would fail half-way or, worse, load weights into the wrong latent
    space or objective."""
    if changes:
        raise ConfigError(f"train.run_dir={run_dir} holds checkpoints of another model ({'; '.join(changes)}); "
                          f"resume it with its own settings ({run_dir / 'config.yaml'}) or start a new train.run_dir")


def check_data(goal: Objective, model: ModelConfig, vae: VAEConfig, data: DataConfig) -> dict:
    """The manifest of ``data.shards``, once it is known to fit the objective's model."""
    manifest = load_manifest(data.shards) if data.shards else _no_shards()
    _check_data_matches(goal, model, vae, data, manifest)
    return manifest


def _no_shards():
    raise ConfigError("data.shards is empty; point it at shards from `dist-diffusion prepare` "
                      "(images) or `dist-diffusion encode` (latents)")


def _check_data_matches(goal: Objective, model: ModelConfig, vae: VAEConfig, data: DataConfig,
                        manifest: dict) -> None:
    """Shards and model must agree before any step: kind, shape and class count."""
    if goal.needs_image_shards and manifest["kind"] != "images":
        raise ConfigError(f"train.target={goal.name} needs image shards, but {data.shards} holds "
                          f"{manifest['kind']}; point data.shards at the output of prepare")
    if manifest["num_classes"] > model.num_classes and goal.conditions_on_classes:
        raise ConfigError(f"the shards at {data.shards} have {manifest['num_classes']} classes but "
                          f"model.num_classes={model.num_classes}; raise it")
    if goal.encodes_with_vae(manifest["kind"]) and not vae.pretrained:
        raise ConfigError(f"train.target={goal.name} on the image shards {data.shards} encodes them with "
                          f"the VAE, but vae.pretrained is empty: it would learn the latents of a randomly "
                          f"initialised VAE. Train one (train.target=vae, then `dist-diffusion export`) or pass a "
                          f"diffusers AutoencoderKL directory as vae.pretrained")
    if manifest["kind"] == "latents":
        if not vae.enabled:
            raise ConfigError(f"{data.shards} holds latents but vae.enabled=false; use image shards "
                              f"for pixel-space training")
        if list(manifest["latent_shape"]) != list(unet_input_shape(vae, data)):
            raise ConfigError(f"latents in {data.shards} are {manifest['latent_shape']} but the config "
                              f"expects {list(unet_input_shape(vae, data))}; match vae.* and data.resolution")
    elif manifest["resolution"] not in (None, data.resolution):  # None: original sizes, resized while streaming
        raise ConfigError(f"images in {data.shards} are {manifest['resolution']}px but "
                          f"data.resolution={data.resolution}; re-run prepare or change it")
