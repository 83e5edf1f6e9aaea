"""Sample grids during training (``train.sample_every``): sample.sampler + CFG samples from the EMA
weights -> ``RUN/samples/stepN.png``, drawn by rank 0. The loop calls it; the logger only
reports the path."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DiffusionConfig, SampleConfig
from ..core.generate import decode_on_its_device, generate
from ..core.models import build_vae
from ..imaging import save_grid
from ..runtime.distributed import device


class TrainingGrids:
    """``objective`` builds the UNet the EMA weights load into and holds the model, VAE and
    data sections (a diffusion objective: the only kind that draws grids)."""

    def __init__(self, objective, sample: SampleConfig, diffusion: DiffusionConfig, run_dir: Path, is_main: bool,
                 encoder_vae=None):
        self.objective, self.sample, self.diffusion = objective, sample, diffusion
        self.folder, self.is_main = Path(run_dir) / "samples", is_main
        self._vae = encoder_vae  # the frozen encoder of on-the-fly encoding decodes as well

    def draw(self, step: int, ema) -> Path | None:
        """The grid's path on rank 0 (None elsewhere); every rank calls it, since gathering
        the EMA is a collective under ZeRO-3."""
        state = ema.full_state()
        if not self.is_main:
            return None
        unet = self.objective.build()
        unet.load_state_dict(state)
        return ema_grid(unet.to(device()), self.sample, self.diffusion, self._decoder(),
                        self.folder / f"step{step:08d}.png")

    def _decoder(self):
        """The VAE that turns sampled latents into images (None in pixel space). Latent
        shards train without one, so it is loaded once, here, for the grids alone."""
        v = self.objective.vae
        if self._vae is None and v.enabled and v.pretrained:
            self._vae = build_vae(v, self.objective.data).to(device()).eval()
        return self._vae


def class_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,.. (per_class each): one grid row per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def ema_grid(unet, sample: SampleConfig, diffusion: DiffusionConfig, vae, path: Path, per_class: int = 8) -> Path:
    """A grid of samples of ``unet`` (the EMA weights, on their device), one row per class
    (at most 10 classes), decoded by ``vae`` (None: the samples are images)."""
    num_classes = unet.config.num_class_embeds - 1  # the last row is the null label
    labels = class_rows(num_classes, per_class)[: per_class * 10]
    x = generate(sample, diffusion, unet.eval(), labels, range(len(labels)))
    if vae is not None:
        x = decode_on_its_device(vae, x)
    return save_grid(x[:, :3], path, nrow=per_class, scale=2)
