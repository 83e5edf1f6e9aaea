"""``dist-diffusion export``: a run's latest complete checkpoint -> a diffusers UNet (or,
for a VAE run, AutoencoderKL) directory (safetensors + config.json) that
``from_pretrained``, the sampler and ``encode`` load. Runs in one process, offline: EMA shards written by N ranks are joined
here (ZeRO-3 partitions are the flat parameter cut in N equal, padded pieces).

A UNet export also carries ``scheduler/``: the DDIMScheduler of its forward process, so
diffusers samples it with the training schedule. It is a whole pipeline directory too
(``model_index.json`` and ``unet/``, hard links of the top-level weights). In pixel space
that is a ``DDIMPipeline``; in latent space a ``ClassConditionalLatentPipeline``
(dist_diffusion.export.pipeline) with ``vae/``, a copy of the VAE the run was trained on
(``vae.pretrained``: its config.json carries the latent statistics), so
``ClassConditionalLatentPipeline.from_pretrained(out)`` samples and decodes it. Both load
with that class; a VAE that was not there to copy is passed as ``vae=`` instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from ..config import Config, ConfigError, load_config
from ..core.schedule import DEFAULT_BETAS, forward_process
from ..runtime.checkpoint import COMPLETE, consolidated_fp32_state, ema_file, latest_complete
from ..train.objectives import objective
from ..runtime.ema import join_partitions


def export_model(run_dir: str | Path, out: str | Path, weights: str = "ema") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    root = run_dir / "checkpoints"
    tag = latest_complete(root)
    if tag is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint; train first (or point --run-dir "
                          f"at the run's directory)")
    cfg = load_config(run_dir / "config.yaml")
    trained = objective(cfg).build(cfg)
    state = _ema_state(root / tag, trained) if weights == "ema" else consolidated_fp32_state(root, tag)
    trained.load_state_dict(state)
    model = objective(cfg).exported(trained)
    measured = objective(cfg).measure_export(model, cfg)
    write_export(model, cfg, out, {"checkpoint": str(root / tag), "weights": weights, **measured})
    if measured:  # the run keeps what its export measured on held-out data, beside metrics.jsonl
        record = {"checkpoint": tag, "weights": weights, "export": str(out), **measured}
        (run_dir / "heldout_metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def write_export(model: torch.nn.Module, cfg: Config, out: Path, provenance: dict) -> Path:
    """``model`` as a diffusers directory, with what a user needs to sample it elsewhere."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "dist_diffusion.json").write_text(json.dumps(
        {**provenance, "target": objective(cfg).name, "null_label": cfg.model.num_classes,
         "prediction": cfg.diffusion.prediction, "schedule": cfg.diffusion.schedule,
         "num_train_timesteps": cfg.diffusion.num_train_timesteps, "snr_shift": cfg.diffusion.snr_shift},
        indent=2))
    if isinstance(model, UNet2DModel):
        ddim_scheduler(cfg).save_pretrained(out / "scheduler")
        _link_unet(out)
        if cfg.vae.enabled:
            _as_latent_pipeline(out, cfg)
        else:
            _write_index(out, "DDIMPipeline")
    return out


# our schedule names -> diffusers' beta_schedule; prediction -> prediction_type
BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPE = {"epsilon": "epsilon", "v": "v_prediction"}


def ddim_scheduler(cfg: Config):
    """diffusers' DDIMScheduler for the run's forward process and sampling settings: the
    same betas (float32), prediction, spacing and x0 clipping as our DDIM; the last step
    goes to the clean image (set_alpha_to_one), as ours does."""
    from diffusers import DDIMScheduler

    d, s = cfg.diffusion, cfg.sample
    lo, hi = DEFAULT_BETAS.get(d.schedule, (1e-4, 0.02))
    shifted = None  # diffusers has no SNR shift: a shifted schedule travels as its betas
    if d.snr_shift != 1.0:
        shifted = forward_process(d).betas.tolist()
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=BETA_SCHEDULE[d.schedule],
                         beta_start=d.beta_start or lo, beta_end=d.beta_end or hi, trained_betas=shifted,
                         prediction_type=PREDICTION_TYPE[d.prediction], clip_sample=s.clip_x0,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing=s.spacing)


def _link_unet(out: Path) -> None:
    """``unet/`` beside the top-level UNet: diffusers loads a pipeline's components from
    subfolders, while ``eval.unet`` and ``UNet2DModel.from_pretrained`` read the top level.
    Hard links, so the weights are on disk once."""
    unet_dir = out / "unet"
    unet_dir.mkdir(exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (unet_dir / name).unlink(missing_ok=True)
        try:
            os.link(out / name, unet_dir / name)
        except OSError:  # a file system without hard links
            shutil.copyfile(out / name, unet_dir / name)


def _as_latent_pipeline(out: Path, cfg: Config) -> None:
    """``vae/``: a copy (not a link: re-exporting the VAE run rewrites its files in place) of
    the run's ``vae.pretrained`` directory, whose config.json holds latents_mean/latents_std.
    Without one to copy (moved, or on S3), model_index.json names no VAE and the pipeline
    asks for ``vae=`` when it loads."""
    source, vae_dir = Path(cfg.vae.pretrained) if cfg.vae.pretrained else None, out / "vae"
    shutil.rmtree(vae_dir, ignore_errors=True)
    has_vae = source is not None and (source / "config.json").is_file()
    if has_vae:
        vae_dir.mkdir()
        for path in source.iterdir():
            if path.is_file() and path.name != "dist_diffusion.json":
                shutil.copyfile(path, vae_dir / path.name)
    _write_index(out, "ClassConditionalLatentPipeline", latent_space=True, null_class_label=cfg.model.num_classes,
                 vae=["diffusers", "AutoencoderKL"] if has_vae else [None, None])


def _write_index(out: Path, class_name: str, **entries) -> None:
    """model_index.json: the pipeline class and its components, all diffusers classes."""
    from diffusers import __version__ as diffusers_version

    index = {"_class_name": class_name, "_diffusers_version": diffusers_version, **entries,
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _ema_state(folder: Path, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    meta = json.loads((folder / COMPLETE).read_text())
    shards = [load_file(str(folder / ema_file(r))) for r in range(meta["world_size"])]
    if meta["zero_stage"] != 3:
        return shards[0]  # every rank holds the whole EMA
    return {name: join_partitions([s[name] for s in shards], p.shape) for name, p in unet.named_parameters()}
