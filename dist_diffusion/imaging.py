"""Image tensors <-> files: sample grids a person looks at."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) in [-1, 1] -> uint8 in [0, 255], rounding like PIL does."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write images in [-1, 1] as one PNG grid, nrow per row, optionally upscaled (nearest)."""
    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
