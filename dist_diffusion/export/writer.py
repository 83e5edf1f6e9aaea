"""``dist-diffusion export``: a run's latest complete checkpoint -> a diffusers UNet (or,
for a VAE run, AutoencoderKL) directory (safetensors + config.json) that
``from_pretrained``, the sampler and ``encode`` load. Runs in one process, offline: EMA shards written by N ranks are joined
here (ZeRO-3 partitions are the flat parameter cut in N equal, padded pieces).

A UNet export also carries ``scheduler/``: the diffusers scheduler of its forward process
(the process names it: DDIMScheduler for ddpm), so diffusers samples it as we do, and
``dist_diffusion.json`` records the process's keys. It is a whole pipeline directory too
(``model_index.json`` and ``unet/``, hard links of the top-level weights). In pixel space
that is a ``DDIMPipeline`` (a ``ClassConditionalLatentPipeline`` without a VAE where the
scheduler is not DDIM's); in latent space a ``ClassConditionalLatentPipeline``
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

from ..config import Config, ConfigError, DiffusionConfig, SampleConfig, VAEConfig, load_config
from ..core.processes import make_process
from ..runtime.checkpoint import (COMPLETE, consolidated_fp32_state, ema_file, ema_files, latest_complete,
                                  tag_for)
from ..train.objectives import objective
from ..runtime.ema import join_partitions


def export_model(run_dir: str | Path, out: str | Path, weights: str = "ema", step: int | None = None) -> Path:
    """The latest complete checkpoint of ``run_dir`` (or the one of ``step``) -> ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    root = run_dir / "checkpoints"
    tag = latest_complete(root) if step is None else tag_for(step)
    if tag is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint; train first (or point --run-dir "
                          f"at the run's directory)")
    if not (root / tag / COMPLETE).is_file():
        kept = sorted(p.name for p in root.iterdir() if (p / COMPLETE).is_file())
        raise ConfigError(f"{run_dir} has no complete checkpoint of step {step} (kept: {kept or 'none'}); "
                          f"pass one of those steps, or raise train.keep_last to keep more")
    cfg = load_config(run_dir / "config.yaml")
    goal = objective(cfg)
    trained = goal.build()
    state = _ema_state(root / tag, trained) if weights == "ema" else consolidated_fp32_state(root, tag)
    trained.load_state_dict(state)
    model = goal.exported(trained)
    measured = goal.measure_export(model)
    write_export(model, cfg, out, {"checkpoint": str(root / tag), "weights": weights, **measured})
    if measured:  # the run keeps what its export measured on held-out data, beside metrics.jsonl
        record = {"checkpoint": tag, "weights": weights, "export": str(out), **measured}
        (run_dir / "heldout_metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def write_export(model: torch.nn.Module, cfg: Config, out: Path, provenance: dict) -> Path:
    """``model`` as a diffusers directory, with what a user needs to sample it elsewhere."""
    out, process = Path(out), make_process(cfg.diffusion)
    model.save_pretrained(out, safe_serialization=True)
    (out / "dist_diffusion.json").write_text(json.dumps(
        {**provenance, "target": objective(cfg).name, "null_label": cfg.model.num_classes,
         **process.export_record()}, indent=2))
    if isinstance(model, UNet2DModel):
        scheduler = process.diffusers_scheduler(cfg.sample)
        scheduler.save_pretrained(out / "scheduler")
        _link_unet(out)
        if cfg.vae.enabled:
            _as_latent_pipeline(out, cfg.vae, cfg.model.num_classes, type(scheduler).__name__)
        elif type(scheduler).__name__ == "DDIMScheduler":
            _write_index(out, "DDIMPipeline", "DDIMScheduler")
        else:  # DDIMPipeline steps with DDIM's arguments; ours takes any scheduler
            _write_index(out, "ClassConditionalLatentPipeline", type(scheduler).__name__, latent_space=False,
                         null_class_label=cfg.model.num_classes)
    return out


def ddim_scheduler(diffusion: DiffusionConfig, sample: SampleConfig):
    """diffusers' DDIMScheduler of a ddpm run (the scheduler its export carries)."""
    return make_process(diffusion).diffusers_scheduler(sample)


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


def _as_latent_pipeline(out: Path, v: VAEConfig, null_label: int, scheduler: str) -> None:
    """``vae/``: a copy (not a link: re-exporting the VAE run rewrites its files in place) of
    the run's ``vae.pretrained`` directory, whose config.json holds latents_mean/latents_std.
    Without one to copy (moved, or on S3), model_index.json names no VAE and the pipeline
    asks for ``vae=`` when it loads."""
    source, vae_dir = Path(v.pretrained) if v.pretrained else None, out / "vae"
    shutil.rmtree(vae_dir, ignore_errors=True)
    has_vae = source is not None and (source / "config.json").is_file()
    if has_vae:
        vae_dir.mkdir()
        for path in source.iterdir():
            if path.is_file() and path.name != "dist_diffusion.json":
                shutil.copyfile(path, vae_dir / path.name)
    _write_index(out, "ClassConditionalLatentPipeline", scheduler, latent_space=True,
                 null_class_label=null_label,
                 vae=["diffusers", "AutoencoderKL"] if has_vae else [None, None])


def _write_index(out: Path, class_name: str, scheduler: str, **entries) -> None:
    """model_index.json: the pipeline class and its components, all diffusers classes."""
    from diffusers import __version__ as diffusers_version

    index = {"_class_name": class_name, "_diffusers_version": diffusers_version, **entries,
             "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_ema_files(run_dir: Path, folder: Path, out: Path, provenance: dict) -> Path:
    """EMA files laid out as a checkpoint's (``folder``: ema_rankNNN files and a COMPLETE
    naming the ZeRO stage and world size) -> an export of the run's model at ``out``."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    goal = objective(cfg)
    trained = goal.build()
    trained.load_state_dict(_ema_state(folder, trained))
    return write_export(goal.exported(trained), cfg, Path(out), provenance)


def _ema_state(folder: Path, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    meta = json.loads((folder / COMPLETE).read_text())
    if meta["zero_stage"] != 3:
        return load_file(str(folder / ema_file(0)))  # the whole EMA, written once by rank 0
    shards = [load_file(str(folder / name)) for name in ema_files(folder)]
    return {name: join_partitions([s[name] for s in shards], p.shape) for name, p in unet.named_parameters()}
