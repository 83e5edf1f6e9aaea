"""Sample grids during training (``train.sample_every``): sample.sampler + CFG samples from the EMA
weights -> ``RUN/samples/stepN.png``, drawn by rank 0. The loop calls it; the logger only
reports the path."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..core.generate import decode_on_its_device, generate
from ..core.models import build_unet, build_vae
from ..imaging import save_grid
from ..runtime.distributed import device


class TrainingGrids:
    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, encoder_vae=None):
        self.cfg, self.folder, self.is_main = cfg, Path(run_dir) / "samples", is_main
        self._vae = encoder_vae  # the frozen encoder of on-the-fly encoding decodes as well

    def draw(self, step: int, ema) -> Path | None:
        """The grid's path on rank 0 (None elsewhere); every rank calls it, since gathering
        the EMA is a collective under ZeRO-3."""
        state = ema.full_state()
        if not self.is_main:
            return None
        return ema_grid(self.cfg, state, self._decoder(), self.folder / f"step{step:08d}.png", device())

    def _decoder(self):
        """The VAE that turns sampled latents into images (None in pixel space). Latent
        shards train without one, so it is loaded once, here, for the grids alone."""
        if self._vae is None and self.cfg.vae.enabled and self.cfg.vae.pretrained:
            self._vae = build_vae(self.cfg).to(device()).eval()
        return self._vae


def class_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,.. (per_class each): one grid row per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def ema_grid(cfg: Config, ema_state: dict, vae, path: Path, where: torch.device, per_class: int = 8) -> Path:
    """A grid of EMA samples on ``where``, one row per class (at most 10 classes), decoded
    by the VAE."""
    unet = build_unet(cfg)
    unet.load_state_dict(ema_state)
    unet.to(where).eval()
    labels = class_rows(cfg.model.num_classes, per_class)[: per_class * 10]
    x = generate(cfg.sample, cfg.diffusion, unet, labels, range(len(labels)))
    if cfg.vae.enabled and vae is not None:
        x = decode_on_its_device(vae, x)
    return save_grid(x[:, :3], path, nrow=per_class, scale=2)
