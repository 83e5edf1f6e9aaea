"""Original-size images -> ``size`` x ``size`` squares, as ADM and DiT prepare ImageNet.

ADM's ``center_crop_arr`` (guided-diffusion, image_datasets.py), which DiT reuses: halve
the image with a box filter while its short side is at least twice the target (an exact
average of 2x2 blocks, cheap, and free of the aliasing one large bicubic step leaves),
then one bicubic resize that brings the short side to the target, then a crop of the
long side. A JPEG can skip most of that work: libjpeg-turbo's DCT scaling decodes it at
M/8 of its size directly (simplejpeg's ``min_height``/``min_width``), so it is decoded at
the smallest such scale whose short side is still at least the target, and one bicubic
resize samples the crop ADM would have made (same pixel centers). An image already at
the target is returned as it is, bit for bit.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

CROPS = ("center", "random")


def fit(pixels: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C): ADM's resize, then the center crop, or with
    ``rng`` a crop at offsets drawn from it (drawn only along a side with slack)."""
    if pixels.shape[:2] == (size, size):
        return pixels  # already at the target: untouched, no draw
    resized = np.array(adm_resize(Image.fromarray(pixels), size))  # writable, for torch
    top, left = crop_offsets(resized.shape[0], resized.shape[1], size, rng)
    return resized[top:top + size, left:left + size]


def adm_resize(img: Image.Image, size: int) -> Image.Image:
    """Box-halve while the short side is >= 2 * size, then bicubic to short side == size."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)


def crop_offsets(height: int, width: int, size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """(top, left) of the crop: centered (ADM rounds down), or uniform over the slack."""
    if rng is None:
        return (height - size) // 2, (width - size) // 2
    return tuple(int(rng.integers(0, extent - size + 1)) if extent > size else 0 for extent in (height, width))


def decode_jpeg(data: bytes, size: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 RGB; with ``size``, already fitted to size x size as
    :func:`fit` fits it. A JPEG whose short side allows it is decoded at the smallest DCT
    scale M/8 (M < 8) that keeps both sides >= ``size``; one bicubic resize then samples
    exactly the pixel centers ADM's result has (same scale, same crop; see
    :func:`_fit_scaled`), so only the low-pass filter differs from a full decode + ADM.
    Raises ValueError for what simplejpeg cannot read (CMYK, odd markers)."""
    if not size:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    m = next(m for m in range(1, 9) if min(_scaled(height, m), _scaled(width, m)) >= size)
    if m == 8:  # no DCT scale keeps the short side >= size: ADM on the full image
        return fit(simplejpeg.decode_jpeg(data, colorspace="RGB"), size, rng)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=_scaled(height, m),
                                    min_width=_scaled(width, m))
    if pixels.shape[:2] != (_scaled(height, m), _scaled(width, m)):  # another scale than asked: be exact
        return fit(simplejpeg.decode_jpeg(data, colorspace="RGB"), size, rng)
    return _fit_scaled(pixels, width, height, m / 8, size, rng)


def _scaled(side: int, m: int) -> int:
    """libjpeg's side at scale m/8 (jdiv_round_up)."""
    return -(-side * m // 8)


def adm_geometry(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of ADM's resized image (before the crop), without resizing."""
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
    scale = size / min(width, height)
    return round(width * scale), round(height * scale)


def _fit_scaled(pixels: np.ndarray, width: int, height: int, factor: float, size: int,
                rng: np.random.Generator | None) -> np.ndarray:
    """The crop of ADM's result for a ``width`` x ``height`` original, sampled from its
    DCT-scaled decode (``factor`` of each side). PIL maps edge coordinates linearly through
    every step (box-halving to w // 2, the bicubic resize), so ADM's output pixel x sits at
    x * width / final_width of the original, and at ``factor`` times that in ``pixels``: a
    resize of that box to size x size (filter support scaled to the box) lands on the same
    centers. The crop offsets are ADM's, drawn as :func:`fit` draws them."""
    final_w, final_h = adm_geometry(width, height, size)
    top, left = crop_offsets(final_h, final_w, size, rng)
    sx, sy = width / final_w * factor, height / final_h * factor
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.array(Image.fromarray(pixels).resize((size, size), resample=Image.BICUBIC, box=box))
