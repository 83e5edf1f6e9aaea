"""Original-size images -> data.resolution squares: ADM's resize and crop, the random crop,
and the DCT-scaled JPEG decode (dist_diffusion/data/resize.py, through the stream's decoder)."""

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from dist_diffusion.data import resize
from dist_diffusion.data.stream import decode_image_uint8


def adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The reference: guided-diffusion's image_datasets.center_crop_arr (ADM; DiT reuses it)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo(name: str, width: int, height: int) -> np.ndarray:
    """A real photo from scikit-image's bundled data, resized to width x height."""
    from skimage import data

    return np.asarray(Image.fromarray(getattr(data, name)()).resize((width, height), Image.BICUBIC))


def test_box_halving_then_crop_matches_the_hand_computed_means():
    """64x32 to 16: one box halving (32 >= 2*16) to 32x16, bicubic at scale 1 (a copy),
    center crop at x = 8. PIL's box filter rounds each pass: horizontal, then vertical."""
    pixels = noise(32, 64)
    x = pixels.astype(int)
    across = (x[:, 0::2] + x[:, 1::2] + 1) // 2
    down = (across[0::2] + across[1::2] + 1) // 2
    assert np.array_equal(resize.fit(pixels, 16), down[:, 8:24])


@pytest.mark.parametrize("width,height,size", [(33, 17, 16), (300, 131, 32), (131, 300, 32), (257, 129, 64),
                                               (40, 13, 16), (1000, 251, 32), (65, 64, 32), (17, 17, 16),
                                               (500, 375, 128)])
def test_fit_is_adm_center_crop_arr_bit_for_bit(width, height, size):
    pixels = noise(height, width, seed=width * height)
    ours = resize.fit(pixels, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, adm_center_crop_arr(Image.fromarray(pixels), size))
    assert resize.adm_geometry(width, height, size) == resize.adm_resize(Image.fromarray(pixels), size).size


def test_images_at_the_target_size_pass_unchanged():
    """The path of prepare's shards: same array, same tensor as the decoder gave before resizing existed."""
    pixels = noise(16, 16)
    assert resize.fit(pixels, 16) is pixels
    data = jpeg(pixels)
    before = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
    for size in (0, 16):
        assert torch.equal(decode_image_uint8({"jpg": data}, size), before)
        assert torch.equal(decode_image_uint8({"jpg": data}, size, np.random.default_rng(0)), before)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    assert torch.equal(decode_image_uint8({"png": buf.getvalue()}, 16), torch.from_numpy(pixels).permute(2, 0, 1))


def test_random_crop_is_deterministic_within_bounds_and_only_draws_along_slack():
    pixels = noise(37, 90)  # halved to 18 x 45, then 16 x 40: slack 24 across, none down
    resized = np.array(resize.adm_resize(Image.fromarray(pixels), 16))
    assert resized.shape[:2] == (16, 40)
    lefts = set()
    for seed in range(40):
        top, left = resize.crop_offsets(16, 40, 16, np.random.default_rng(seed))
        assert top == 0 and 0 <= left <= 40 - 16
        lefts.add(left)
        crop = resize.fit(pixels, 16, np.random.default_rng(seed))
        assert np.array_equal(crop, resized[:, left:left + 16])
        assert np.array_equal(crop, resize.fit(pixels, 16, np.random.default_rng(seed)))
    assert len(lefts) > 10
    rng = np.random.default_rng(1)
    resize.fit(noise(16, 16), 16, rng)  # at the target: nothing to draw
    assert rng.random() == np.random.default_rng(1).random()


@pytest.mark.parametrize("size", [64, 128])
def test_dct_scaled_jpeg_decode_is_close_to_full_decode_plus_adm(size):
    """Tolerance: every image >= 30 dB PSNR against full decode + ADM, and a mean absolute
    difference <= 3 levels (of 255) over the set (measured: worst 31.2 dB; mean 2.5 levels
    at 64 px, 1.7 at 128 px). Both sample the same pixel centers; only the low-pass filter
    differs (DCT scaling vs box-halving)."""
    mads = []
    for name in ("astronaut", "coffee", "chelsea"):
        for width, height in ((500, 375), (333, 480), (257, 400), (411, 187), (300, 290)):
            data = jpeg(photo(name, width, height))
            scaled = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
            assert min(scaled.shape[:2]) < min(width, height)  # the decode really was scaled down
            full = resize.fit(simplejpeg.decode_jpeg(data, colorspace="RGB"), size).astype(float)
            fast = resize.decode_jpeg(data, size)
            assert fast.shape == (size, size, 3)
            mse = ((fast - full) ** 2).mean()
            assert 10 * np.log10(255 ** 2 / mse) >= 30.0, (name, width, height)
            mads.append(np.abs(fast - full).mean())
            rng = np.random.default_rng(width)  # the random crop lands where the full path's does
            exact = resize.fit(simplejpeg.decode_jpeg(data, colorspace="RGB"), size, np.random.default_rng(width))
            assert 10 * np.log10(255 ** 2 / ((resize.decode_jpeg(data, size, rng) - exact.astype(float)) ** 2).mean()) >= 30.0
    assert np.mean(mads) <= 3.0


def test_other_formats_go_through_pil_with_the_same_resize():
    pixels = noise(45, 70)
    for mode, fmt, ext in (("RGB", "PNG", "png"), ("L", "PNG", "png"), ("RGB", "WEBP", "webp")):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format=fmt, lossless=True)
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            expected = adm_center_crop_arr(img.convert("RGB"), 16)
        assert np.array_equal(decode_image_uint8({ext: buf.getvalue()}, 16).permute(1, 2, 0).numpy(), expected)
