"""Sample grids during training (``train.sample_every``): DDIM + CFG samples from the EMA
weights -> ``RUN/samples/stepN.png``, drawn by rank 0. The loop calls it; the logger only
reports the path."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .core.models import build_vae
from .generate import ema_grid
from .runtime.distributed import device


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
