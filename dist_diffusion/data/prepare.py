"""``dist-diffusion prepare``: a class-folder tree -> WebDataset image shards + manifest.

``SRC/<class>/*.{jpg,jpeg,JPEG,png}`` (the ImageNet-100 layout). Files are ordered
deterministically (sorted, then shuffled with ``data.shuffle_seed`` so every shard mixes
classes), resized on the shorter side, center-cropped and re-encoded in several
processes. A shard is complete once its sidecar exists, so a rerun skips finished
shards; unreadable images are reported in the manifest and skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing as mp
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..config import DataConfig
from . import shards, storage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
HOLDOUT = "holdout"  # OUT/holdout: the held-out split, a shard set with its own manifest


class PrepareError(ValueError):
    """Bad input to prepare or index; the message names the path and the fix."""


@dataclass(frozen=True)
class Item:
    key: str
    path: str  # relative to the source root
    label: int


@dataclass(frozen=True)
class ShardJob:
    index: int
    items: tuple[Item, ...]
    src: str
    out: str
    data: DataConfig
    reuse: bool = True  # a complete shard already there is kept (a rerun after a crash)


def scan(src: Path, labels_file: str = "") -> tuple[list[str], list[Item]]:
    """Class names (sorted folder names, or names from the labels file) and items with
    stable keys: the index of the file in sorted order."""
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a directory; pass the root of a class-folder tree")
    folders = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not folders:
        raise PrepareError(f"--src {src} has no class folders; expected SRC/<class>/<image files>")
    files = [(f, label) for label, name in enumerate(folders)
             for f in sorted((src / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise PrepareError(f"--src {src}: no .jpg/.jpeg/.png files in its class folders")
    items = [Item(f"s{i:08d}", str(f.relative_to(src)), label) for i, (f, label) in enumerate(files)]
    return _class_names(folders, labels_file), items


def _class_names(folders: list[str], labels_file: str) -> list[str]:
    if not labels_file:
        return folders
    if not Path(labels_file).is_file():
        raise PrepareError(f"data.labels_file={labels_file} does not exist; give a file of '<folder> <class name>' "
                           f"lines, or leave it empty to name classes by their folders")
    names = {}
    for line in Path(labels_file).read_text().splitlines():
        folder, _, name = line.strip().partition(" ")
        if folder:
            names[folder] = name.strip() or folder
    return [names.get(folder, folder) for folder in folders]


def plan_shards(items: list[Item], data: DataConfig, src: Path, out: str) -> list[ShardJob]:
    order = list(items)
    random.Random(data.shuffle_seed).shuffle(order)
    n = data.samples_per_shard
    return [ShardJob(i // n, tuple(order[i:i + n]), str(src), out, data) for i in range(0, len(order), n)]


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow reads. 16- and 32-bit integer images (16-bit PNGs
    open as I;16 or I) are scaled down first: Pillow's own conversion clips them, and a
    16-bit grayscale photo came out pure white. Float images are taken as 0-1 if they
    fit there, else as 0-255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        values = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.round(values / _full_scale(img.mode, values) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def _full_scale(mode: str, values) -> float:
    """The value that means white in a high-depth image."""
    if mode == "F":
        return 1.0 if values.max(initial=0) <= 1.0 else 255.0
    return 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0


def load_square(path: Path, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic, antialiased), then center-crop."""
    with Image.open(path) as img:
        img.load()  # decode now: truncated or corrupt files fail here, not later
        img = to_rgb(img)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC, reducing_gap=None)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def encode(img: Image.Image, data: DataConfig) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if data.image_format == "png":
        img.save(buf, format="PNG", optimize=False)
        return "png", buf.getvalue()
    img.save(buf, format="JPEG", quality=data.jpeg_quality, subsampling=0 if data.jpeg_quality >= 90 else 2)
    return "jpg", buf.getvalue()


def write_shard(job: ShardJob) -> dict:
    """Encode one shard and publish it; returns its manifest entry (plus skipped files).
    Already complete (sidecar present) -> read the sidecar instead of redoing the work."""
    out = storage.parse(job.out)
    name = shards.shard_name(job.data.shard_prefix, job.index)
    sidecar = out.join(shards.sidecar_name(name))
    if job.reuse and storage.exists(sidecar):
        import json
        return {**json.loads(storage.read_bytes(sidecar)), "reused": True}
    samples, skipped = [], []
    for item in job.items:
        try:
            ext, payload = encode(load_square(Path(job.src) / item.path, job.data.resolution), job.data)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            skipped.append({"path": item.path, "error": f"{type(err).__name__}: {err}"})
            continue
        samples.append((item.key, {ext: payload, "cls": str(item.label).encode(),
                                   "path.txt": item.path.encode()}))
    info = shards.upload_tar(out.join(name), samples)
    entry = {"name": name, **info, "skipped": skipped}
    storage.write_bytes(sidecar, shards.dumps(entry))  # last: marks the shard complete
    return entry


# What the bytes of the shards depend on: a rerun with other values must not reuse them.
SHARD_SETTINGS = ("resolution", "image_channels", "image_format", "jpeg_quality", "samples_per_shard",
                  "shard_prefix", "shuffle_seed", "labels_file", "holdout_fraction")
SETTINGS_FILE = "prepare_settings.json"


def _claim_output(out: str, data: DataConfig, overwrite: bool) -> None:
    """Record the settings in OUT before the first shard; refuse an OUT that holds shards
    made with other settings (their shards would be reused under a manifest that lies),
    unless ``overwrite``, which rewrites every shard."""
    import json

    wanted = {key: getattr(data, key) for key in SHARD_SETTINGS}
    record = storage.parse(out).join(SETTINGS_FILE)
    if not overwrite:
        stored = _stored_settings(out, record)
        changed = [f"data.{k}: {stored[k]} -> {wanted[k]}" for k in SHARD_SETTINGS
                   if k in stored and stored[k] != wanted[k]]
        if changed:
            raise PrepareError(f"{out} holds shards prepared with other settings ({'; '.join(changed)}); prepare into "
                               f"another --out, or pass --overwrite to rewrite them")
    storage.write_bytes(record, json.dumps(wanted, indent=1).encode())


def _stored_settings(out: str, record) -> dict:
    """The settings OUT was prepared with (an older OUT has only its manifest's)."""
    import json

    if storage.exists(record):
        return json.loads(storage.read_bytes(record))
    manifest = storage.parse(out).join(shards.MANIFEST)
    if storage.exists(manifest):
        m = json.loads(storage.read_bytes(manifest))
        return {k: m[k] for k in ("resolution", "image_format") if k in m}
    return {}


def prepare(src: str | Path, out: str, data: DataConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Run the whole conversion; returns the manifest (also written to OUT/manifest.json).
    With ``data.holdout_fraction`` the held-out images become their own shard set in
    OUT/holdout, named in the manifest's ``holdout``."""
    src = Path(src)
    classes, items = scan(src, data.labels_file)
    storage.check_bucket(out)  # missing bucket / bad credentials: fail before any work
    if not storage.parse(out).is_s3 and Path(out).exists() and not Path(out).is_dir():
        raise PrepareError(f"--out {out} is a file; give a directory (new or from an earlier prepare) or s3:// prefix")
    existed = bool(storage.list_names(storage.parse(out)))
    _claim_output(out, data, overwrite)
    kept, held = split_holdout(items, data.holdout_fraction, data.shuffle_seed)
    held_out = holdout_url(out)
    jobs = plan_shards(kept, data, src, out) + (plan_shards(held, data, src, held_out) if held else [])
    entries = _run_jobs([dataclasses.replace(job, reuse=not overwrite) for job in jobs], data.prepare_workers,
                        progress)
    skipped = [s for e in entries for s in e.pop("skipped")]
    if skipped and len(skipped) == len(items):
        if not existed:  # the empty shards of this run would only pose as a dataset
            _remove_output(out)
        raise PrepareError(f"--src {src}: none of its {len(items)} images could be read (first: {skipped[0]['path']}: "
                           f"{skipped[0]['error']}); check the files, or that they are images at all")
    for e in entries:
        e.pop("reused", None)
    train_entries, held_entries = _by_output(jobs, entries, out)
    extra = {"resolution": data.resolution, "image_format": data.image_format}
    if held_entries:
        held_manifest = shards.manifest("images", classes, held_entries, **extra, split="holdout", holdout_of=out)
        storage.write_bytes(storage.parse(held_out).join(shards.MANIFEST), shards.dumps(held_manifest))
        extra["holdout"] = {"url": held_out, "fraction": data.holdout_fraction,
                            "num_samples": held_manifest["num_samples"]}
    result = shards.manifest("images", classes, train_entries, **extra, skipped=skipped, source_files=len(items))
    storage.write_bytes(storage.parse(out).join(shards.MANIFEST), shards.dumps(result))
    return result


def split_holdout(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(kept, held out): an item is held out when a seeded hash of its path falls below
    ``fraction``, so the split of a file never changes when others are added or removed."""
    if fraction <= 0:
        return items, []
    def held(item: Item) -> bool:
        digest = hashlib.sha256(f"{seed}:{item.path}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction
    return [i for i in items if not held(i)], [i for i in items if held(i)]


def holdout_url(out: str) -> str:
    return str(storage.parse(out).join(HOLDOUT))


def _by_output(jobs: list[ShardJob], entries: list[dict], out: str) -> tuple[list[dict], list[dict]]:
    kept = [e for job, e in zip(jobs, entries) if job.out == out]
    return kept, [e for job, e in zip(jobs, entries) if job.out != out]


def _remove_output(out: str) -> None:
    """Delete everything under OUT (which this run created), and OUT itself when local."""
    root = storage.parse(out)
    for name in storage.list_names(root):
        storage.delete(root.join(name))
    if not root.is_s3:
        shutil.rmtree(out, ignore_errors=True)


def _run_jobs(jobs: list[ShardJob], workers: int, progress: bool) -> list[dict]:
    bar = tqdm(total=len(jobs), desc="prepare", unit="shard", disable=not progress)
    results: list[dict] = []  # imap keeps the order of jobs
    # spawn, not fork: boto3 clients and their connection pools must not cross a fork
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        for entry in pool.imap(write_shard, jobs):
            results.append(entry)
            bar.update(1)
            bar.set_postfix(samples=sum(e["samples"] for e in results))
    bar.close()
    return results
