"""``dist-diffusion export``: a run's latest complete checkpoint -> a diffusers UNet (or,
for a VAE run, AutoencoderKL) directory (safetensors + config.json) that
``from_pretrained``, the sampler and ``encode`` load. Runs in one process, offline: EMA shards written by N ranks are joined
here (ZeRO-3 partitions are the flat parameter cut in N equal, padded pieces).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import ConfigError, load_config
from .core.models import build_for_target
from .runtime.checkpoint import COMPLETE, consolidated_fp32_state, latest_complete


def export_model(run_dir: str | Path, out: str | Path, weights: str = "ema") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    root = run_dir / "checkpoints"
    tag = latest_complete(root)
    if tag is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint; train first (or point --run-dir "
                          f"at the run's directory)")
    cfg = load_config(run_dir / "config.yaml")
    model = build_for_target(cfg)
    state = _ema_state(root / tag, model) if weights == "ema" else consolidated_fp32_state(root, tag)
    model.load_state_dict(state)
    model.save_pretrained(out, safe_serialization=True)
    (out / "dist_diffusion.json").write_text(json.dumps(
        {"checkpoint": str(root / tag), "weights": weights, "target": cfg.train.target, "null_label": cfg.model.num_classes,
         "prediction": cfg.diffusion.prediction, "schedule": cfg.diffusion.schedule,
         "num_train_timesteps": cfg.diffusion.num_train_timesteps}, indent=2))
    return out


def _ema_state(folder: Path, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    meta = json.loads((folder / COMPLETE).read_text())
    shards = [load_file(str(folder / f"ema_rank{r:03d}.safetensors")) for r in range(meta["world_size"])]
    if meta["zero_stage"] != 3:
        return shards[0]  # every rank holds the whole EMA
    return {name: _join_partitions([s[name] for s in shards], p.shape) for name, p in unet.named_parameters()}


def _join_partitions(parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    numel = math.prod(shape)
    return torch.cat([p.flatten() for p in parts])[:numel].view(shape)


