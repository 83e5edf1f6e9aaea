"""The data plane at ImageNet-100's shape: prepare, stream against upstream webdataset, and
the stream's memory over two epochs, all in one run.

A synthetic ImageNet-100-like tree: 100 class folders of JPEGs of 160 to 500 px a side
(smooth colour fields, edges and noise made with numpy), N images in all
(``DATA_SCALE_N``: 20,000 by default, 130,000 for the full size). Prints:

- ``prepare_images_per_s_per_core``: `prepare` to 128 px JPEG shards of 200 samples, with
  one worker per core; ``prepare_vs_baseline_ratio``: its images/s over a plain
  single-process loop (PIL open, resize, crop, JPEG, ``tarfile``) on the same files;
- ``stream_vs_webdataset_ratio``: samples/s of ``ShardStream`` over samples/s of upstream
  ``webdataset.WebDataset(...).shuffle(...).decode("torchrgb")`` reading the same shards
  from the embedded S3 (presigned URLs through curl, webdataset's HTTP route), both with
  2 DataLoader workers and batches of 64, best of 2 alternating rounds (goal >= 1.0);
- ``stream_rss_growth_mb``: the memory (PSS) of the process and its workers over a 2-epoch stream,
  highest minus the value once every worker finished its first shard (goal <= 50);
- ``original_size_stream_vs_webdataset_ratio``: the same race on shards of original-size
  JPEGs (``DATA_SCALE_ORIGINAL_N``, 4,000 by default: crops of scikit-image's photos, 160 to
  500 px a side, any aspect, sensor noise, quality 85-95), indexed, not prepared. Both sides
  resize and center-crop to 128 px as ADM does: ours with ``data.resolution`` (DCT-scaled
  JPEG decode, then one bicubic resize), upstream with ``decode("pil")`` and ADM's
  ``center_crop_arr`` in a ``map``. Same loaders, batches and rounds (goal >= 1.0). Also the
  CPU time per sample of each (the process, its workers and their curl: not the S3
  server), which a busy machine does not skew as it skews samples/s.
"""

from __future__ import annotations

import functools
import io
import multiprocessing as mp
import os
import resource
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from dist_diffusion.config import DataConfig
from dist_diffusion.data import shards, storage
from dist_diffusion.data.index import index
from dist_diffusion.data.prepare import prepare
from dist_diffusion.data.stream import ShardStream, StreamSpec
from dist_diffusion.stack import start_s3, stop_s3

N = int(os.environ.get("DATA_SCALE_N", "20000"))
ORIGINAL_N = int(os.environ.get("DATA_SCALE_ORIGINAL_N", "4000"))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "stereo_motorcycle")
CLASSES, RESOLUTION, PER_SHARD, BATCH, WORKERS = 100, 128, 200, 64, 2


def synthetic_image(index: int) -> Image.Image:
    """A photo-like JPEG source: a colour gradient, a few hard-edged shapes, sensor noise."""
    rng = np.random.default_rng(index)
    w, h = (int(v) for v in rng.integers(160, 501, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3) + rng.uniform(-0.4, 0.4, 3) * (xx[..., None] + yy[..., None])
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 2)
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_image(args: tuple[Path, int]) -> None:
    root, index = args
    folder = root / f"n{index % CLASSES:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_image(index).save(folder / f"img_{index:07d}.JPEG", quality=90)


def make_tree(root: Path) -> None:
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(write_image, [(root, i) for i in range(N)], chunksize=64)


def baseline_prepare(src: Path, out: Path) -> float:
    """Images/s of the textbook loop: one process, PIL resize + center crop + JPEG + tarfile."""
    files = sorted(src.glob("*/*.JPEG"))
    labels = {name: i for i, name in enumerate(sorted({f.parent.name for f in files}))}
    out.mkdir()
    start, tar = time.perf_counter(), None
    for i, path in enumerate(files):
        if i % PER_SHARD == 0:
            tar = tar.close() if tar else None
            tar = tarfile.open(out / f"shard-{i // PER_SHARD:06d}.tar", "w")
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = RESOLUTION / min(img.size)
            img = img.resize((max(RESOLUTION, round(img.width * scale)), max(RESOLUTION, round(img.height * scale))),
                             Image.BICUBIC)
        left, top = (img.width - RESOLUTION) // 2, (img.height - RESOLUTION) // 2
        buf = io.BytesIO()
        img.crop((left, top, left + RESOLUTION, top + RESOLUTION)).save(buf, format="JPEG", quality=95)
        for ext, payload in (("jpg", buf.getvalue()), ("cls", str(labels[path.parent.name]).encode())):
            info = tarfile.TarInfo(f"{i:08d}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    return len(files) / (time.perf_counter() - start)


def upload(local: Path, url: str) -> None:
    names = [p.name for p in local.iterdir() if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: storage.put_file(local / n, storage.parse(url).join(n)), names))


def ours_per_s(url: str) -> float:
    spec = StreamSpec(url=url, batch_size=BATCH, num_workers=WORKERS)
    loader = torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=WORKERS)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["key"])
    return count / (time.perf_counter() - start)


def theirs_per_s(urls: list[str]) -> float:
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), workersplitter=wds.split_by_worker)
               .shuffle(PER_SHARD).decode("torchrgb").to_tuple("jpg", "cls").batched(BATCH))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=WORKERS)
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def presigned(url: str, manifest: dict) -> list[str]:
    loc, client = storage.parse(url), storage.s3_client()
    return [client.generate_presigned_url("get_object", ExpiresIn=3600,
                                          Params={"Bucket": loc.bucket, "Key": loc.join(s["name"]).key})
            for s in manifest["shards"]]


@functools.cache
def photos() -> list[Image.Image]:
    """scikit-image's bundled colour photos (no download)."""
    from skimage import data

    loaded = [getattr(data, name)() for name in PHOTOS]
    return [Image.fromarray(p[0] if isinstance(p, tuple) else p) for p in loaded]


def original_jpeg(index: int) -> bytes:
    """An original-size photo: a random crop of a real photo (any aspect), resized so its
    sides are 160 to 500 px, with sensor noise, saved at JPEG quality 85-95."""
    rng = np.random.default_rng([7, index])
    photo = photos()[index % len(PHOTOS)]
    w, h = (int(v) for v in rng.integers(160, 501, size=2))
    cw = int(photo.width * rng.uniform(0.4, 1.0))
    ch = min(photo.height, max(16, round(cw * h / w)))
    cw = min(photo.width, round(ch * w / h))
    left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    img = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 3, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def write_original_shard(args: tuple[Path, int]) -> None:
    out, shard = args
    keys = range(shard * PER_SHARD, min(ORIGINAL_N, (shard + 1) * PER_SHARD))
    shards.write_tar(out / f"orig-{shard:06d}.tar",
                     ((f"{i:08d}", {"jpg": original_jpeg(i), "cls": str(i % CLASSES).encode()}) for i in keys))


def make_original_shards(out: Path) -> None:
    out.mkdir()
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(write_original_shard, [(out, s) for s in range(-(-ORIGINAL_N // PER_SHARD))])


def adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's (guided-diffusion) center_crop_arr, the resize upstream users write in a map."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def adm_tensor(img: Image.Image) -> torch.Tensor:
    """As ``decode("torchrgb")`` gives it: (3, H, W) float in [0, 1]."""
    return torch.from_numpy(adm_center_crop_arr(img, RESOLUTION)).permute(2, 0, 1).float() / 255.0


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (loader workers, their curl)."""
    return sum(t.ru_utime + t.ru_stime for t in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))


def timed(batches) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of a loader's epoch; workers are joined when it ends."""
    start, cpu, count = time.perf_counter(), cpu_s(), 0
    for images in batches:
        assert images.shape[1:] == (3, RESOLUTION, RESOLUTION)
        count += len(images)
    return count / (time.perf_counter() - start), (cpu_s() - cpu) / count * 1e3


def ours_resized(url: str) -> tuple[float, float]:
    spec = StreamSpec(url=url, batch_size=BATCH, num_workers=WORKERS, resolution=RESOLUTION)
    loader = torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=WORKERS)
    return timed(batch["image"] for batch in loader)


def theirs_resized(urls: list[str]) -> tuple[float, float]:
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), workersplitter=wds.split_by_worker)
               .shuffle(PER_SHARD).decode("pil").to_tuple("jpg", "cls").map_tuple(adm_tensor, int).batched(BATCH))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=WORKERS)
    return timed(images for images, _ in loader)


def original_size_race(root: Path) -> dict[str, float]:
    """Best of 2 alternating rounds of ours and upstream on indexed original-size JPEG shards."""
    t0 = time.perf_counter()
    make_original_shards(root / "original")
    url = "s3://bench/original"
    upload(root / "original", url)
    manifest = index(url, progress=False)
    span = manifest["image_size_range"]
    print(f"original-size shards: {manifest['num_samples']} JPEGs, {span['width']} x {span['height']} px, "
          f"aspect {span['aspect']}, made and indexed in {time.perf_counter() - t0:.0f} s", flush=True)
    urls, best = presigned(url, manifest), {"ours": (0.0, 0.0), "theirs": (0.0, 0.0)}
    for _ in range(2):
        best["ours"] = max(best["ours"], ours_resized(url))
        best["theirs"] = max(best["theirs"], theirs_resized(urls))
    return best


def tree_rss_mb(skip: int) -> float:
    """PSS of the process and its loader workers: forked workers share the parent's pages,
    and plain RSS would count each shared page once per worker as copy-on-write touches
    it. ``skip`` is the S3 server's pid, also a child, whose caches are not the stream's."""
    me = psutil.Process()
    tree = [me, *(p for p in me.children(recursive=True) if p.pid != skip)]
    return sum(p.memory_full_info().pss for p in tree) / 2**20


def stream_rss_growth_mb(url: str, server_pid: int) -> float:
    spec = StreamSpec(url=url, batch_size=BATCH, num_workers=WORKERS)
    loader = torch.utils.data.DataLoader(ShardStream(spec, epochs=2), batch_size=None, num_workers=WORKERS)
    settled_after = WORKERS * -(-PER_SHARD // BATCH) + WORKERS  # every worker is past its first shard
    settled, peak = None, 0.0
    for i, _ in enumerate(loader):
        rss = tree_rss_mb(skip=server_pid)
        if i == settled_after:
            settled = rss
        peak = max(peak, rss) if settled is not None else peak
    return peak - settled


def main() -> None:
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_tree(root / "src")
        print(f"made {N} JPEGs in {CLASSES} classes in {time.perf_counter() - t0:.0f} s", flush=True)
        data = DataConfig(resolution=RESOLUTION, samples_per_shard=PER_SHARD, prepare_workers=cores)
        start = time.perf_counter()
        manifest = prepare(root / "src", str(root / "shards"), data, progress=False)
        ours = manifest["num_samples"] / (time.perf_counter() - start)
        baseline = baseline_prepare(root / "src", root / "baseline")
        print(f"prepare: {ours:.0f} images/s with {cores} workers, baseline {baseline:.0f} images/s; "
              f"{len(manifest['shards'])} shards", flush=True)
        server = start_s3(root / "s3")
        try:
            os.environ.update(server.env())
            storage.s3_client.cache_clear()
            storage.s3_client().create_bucket(Bucket="bench")
            url = "s3://bench/imagenet-like"
            upload(root / "shards", url)
            urls, best = presigned(url, manifest), {"ours": 0.0, "theirs": 0.0}
            for _ in range(2):
                best["ours"] = max(best["ours"], ours_per_s(url))
                best["theirs"] = max(best["theirs"], theirs_per_s(urls))
            growth = stream_rss_growth_mb(url, server.pid)
            original = original_size_race(root)
        finally:
            stop_s3(server.pid)
    print(f"N={N} shards={len(manifest['shards'])} stream_samples_per_s={best['ours']:.0f} "
          f"webdataset_samples_per_s={best['theirs']:.0f}")
    print(f"prepare_images_per_s_per_core={ours / cores:.1f}")
    print(f"prepare_vs_baseline_ratio={ours / baseline:.3f}")
    print(f"stream_rss_growth_mb={growth:.1f}")
    print(f"stream_vs_webdataset_ratio={best['ours'] / best['theirs']:.3f}")
    (ours_rate, ours_cpu), (theirs_rate, theirs_cpu) = original["ours"], original["theirs"]
    print(f"original_size_stream_samples_per_s={ours_rate:.0f} original_size_webdataset_samples_per_s={theirs_rate:.0f}")
    print(f"original_size_cpu_ms_per_sample_stream={ours_cpu:.2f} original_size_cpu_ms_per_sample_webdataset={theirs_cpu:.2f}")
    print(f"original_size_stream_vs_webdataset_ratio={ours_rate / theirs_rate:.3f}")


if __name__ == "__main__":
    sys.exit(main())
