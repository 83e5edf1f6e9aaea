"""The demo's real data sets, written as class-folder trees (the ImageNet-100 layout) of
32x32 RGB PNGs from images that ship inside a package, so nothing is downloaded:

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digit scans, 10 classes.
- ``textures``: scikit-image's sample photographs and texture scans, 6 classes; each
  class is the non-overlapping 32 px tiles of one image (so a held-out tile shares no
  pixel with a training tile).
- ``photos``: six other photographs of scikit-image, tiled the same way: the check that the
  textures' recipe (configs/photos32.yaml) carries to a set it was not made on.

``folder_dataset`` makes a user's own class-folder tree one more (``--src DIR``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..extras import require

TILE = 32


def write_digit_folders(root: Path, size: int = TILE) -> int:
    """scikit-learn's digits as ROOT/digit_<d>/<index>.png, size x size RGB; returns the count."""
    from PIL import Image

    digits = require("sklearn.datasets", "demo", "the digits demo").load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N,1,8,8) in [0,1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    for i, (img, label) in enumerate(zip(pixels.numpy(), digits.target)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return len(pixels)


# scikit-image's bundled files: three grayscale texture scans and three colour photographs
TEXTURE_SOURCES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
                   "coffee": "coffee.png", "astronaut": "astronaut.png", "rocket": "rocket.jpg"}
# The third set, which neither demo's recipe was made on: six more of its photographs (a cat,
# coins, a deep-field sky, a stained tissue section, a retina, a motorcycle)
PHOTO_SOURCES = {"cat": "chelsea.png", "coins": "coins.png", "galaxies": "hubble_deep_field.jpg", "tissue": "ihc.png",
                 "retina": "retina.jpg", "motorcycle": "motorcycle_left.png"}
MAX_SIDE = 512  # larger photos are first scaled so their shorter side is this
MAX_TILES = 256  # per class, drawn by a seeded choice where an image has more


def write_texture_folders(root: Path, size: int = TILE, sources: dict[str, str] = TEXTURE_SOURCES) -> int:
    """scikit-image's images as ROOT/<name>/<row>_<col>.png tiles, a class per image; returns
    the count."""
    from PIL import Image

    folder = Path(require("skimage.data", "demo", "the textures demo").__file__).parent
    count = 0
    for name, file in sources.items():
        with Image.open(folder / file) as img:
            photo = _at_most(img.convert("RGB"), MAX_SIDE)
        tiles = _tiles(np.asarray(photo), size)
        keep = np.random.default_rng(0).permutation(len(tiles))[:MAX_TILES]
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in sorted(keep):
            (row, col), pixels = tiles[k]
            Image.fromarray(pixels).save(root / name / f"{row:02d}_{col:02d}.png")
        count += len(keep)
    return count


def _at_most(img, side: int):
    from PIL import Image

    scale = side / min(img.size)
    return img if scale >= 1 else img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)


def _tiles(pixels: np.ndarray, size: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    rows, cols = pixels.shape[0] // size, pixels.shape[1] // size
    return [((r, c), np.ascontiguousarray(pixels[r * size:(r + 1) * size, c * size:(c + 1) * size]))
            for r in range(rows) for c in range(cols)]


@dataclass(frozen=True)
class DemoDataset:
    name: str
    write: Callable[[Path], int]
    num_classes: int
    what: str  # how the report names the images
    accuracy_bar: float  # class accuracy at the highest CFG scale the demo promises
    unet_config: str = "configs/tiny.yaml"  # the recipe of its latent UNet
    vae_config: str = "configs/vae_tiny.yaml"  # and of its VAE
    unet_overrides: tuple[str, ...] = ()  # where the demo's UNet run differs from unet_config
    vae_steps: int = 400  # training steps of its VAE
    unet_steps: int = 600  # and of its latent UNet


# The digits' UNet: configs/tiny.yaml at a higher learning rate, a shorter EMA and UniPC-10
# (on both data sets it scores better than DDIM-50 at a fifth of the network evaluations:
# the ablation's table; README "What the demo shows").
DIGITS_UNET = ("train.lr=2e-3", "train.warmup_steps=20", "train.ema_half_life_steps=50", "sample.sampler=unipc",
               "sample.steps=10")
# Photo crops take the recipe of configs/photos32.yaml and configs/vae_photos32.yaml (16x16x4
# latents, 3 UNet levels, snr_shift 2, v-prediction, fp32): its comments say why each key.
PHOTOS = dict(unet_config="configs/photos32.yaml", vae_config="configs/vae_photos32.yaml", vae_steps=700,
              unet_steps=1800)

DATASETS = {
    "digits": DemoDataset("digits", write_digit_folders, 10, "real digits", 0.90, unet_overrides=DIGITS_UNET),
    "textures": DemoDataset("textures", write_texture_folders, len(TEXTURE_SOURCES), "real texture and photo tiles",
                            0.80, **PHOTOS),
    "photos": DemoDataset("photos", lambda root: write_texture_folders(root, sources=PHOTO_SOURCES),
                          len(PHOTO_SOURCES), "real photo tiles", 0.80, **PHOTOS),
}


def folder_dataset(src: Path) -> DemoDataset:
    """A user's class-folder tree (SRC/<class>/<images>), with the recipe that fits its images:
    the digits' for images of 16 px or less (they carry no more detail than 8x8x4 latents hold),
    else the photos'. Images of any size are resized and centre-cropped to 32 px by prepare."""
    from PIL import Image

    classes = sorted(p for p in Path(src).iterdir() if p.is_dir())
    images = [f for c in classes for f in sorted(c.iterdir()) if f.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if len(classes) < 2 or not images:
        raise ConfigError(f"--src {src} must hold one folder of images per class (at least 2 classes, PNG or "
                          f"JPEG), as SRC/<class>/<image>")
    with Image.open(images[0]) as first:
        small = min(first.size) <= 16
    recipe = dict(unet_overrides=DIGITS_UNET) if small else PHOTOS

    def write(root: Path) -> int:
        shutil.copytree(src, root, dirs_exist_ok=True)
        return len(images)

    return DemoDataset(Path(src).name, write, len(classes), f"images from {src}", 0.80, **recipe)
