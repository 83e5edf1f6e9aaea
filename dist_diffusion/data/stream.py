"""Streaming reader: shards from S3 (or disk) -> batches, exactly resumable.

The order of an epoch is a pure function of (seed, epoch): shards are permuted, and the
samples inside each shard are permuted (the shuffle buffer is one shard). That global
list is cut into equal contiguous spans, one per rank (the last ``N mod world`` samples
of the epoch order are dropped, so every rank sees the same count; which ones changes
every epoch). A rank's span is cut into one contiguous piece per dataloader worker,
sized so that worker k owns the rank's batches k, k+K, k+2K... in round-robin order,
which is the order a ``DataLoader`` returns them in. So the position of a rank is just
(epoch, batches consumed); on restore each worker skips its consumed batches without
downloading the shards they came from, and the workers are rotated so the DataLoader's
round-robin resumes at the right one. Order depends on (seed, world, workers, batch).
A training stream (``epochs=None``) walks epoch after epoch in the same workers: the
rotation of each new epoch continues the DataLoader's round-robin where the last one
ended, so the workers never restart and the batch order equals one loader per epoch.

Downloads retry transient S3 faults and continue at the byte where they broke.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import itertools
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from . import resize, shards, storage
from .shards import DataError, load_manifest  # noqa: F401 (DataError: the stream raises it; callers catch it here)

IMAGE_EXTS = shards.IMAGE_EXTS


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the order of samples, plus how to decode them."""

    url: str
    batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    seed: int = 0
    hflip: bool = True
    max_corrupt_fraction: float = 0.01
    cache_dir: str = ""
    resolution: int = 0  # images are resized and cropped to this square (0: the manifest's resolution)
    crop: str = "center"  # or "random": crop offsets drawn like the flip, see ShardStream._decode

    @property
    def slots(self) -> int:
        """Readers per rank: the dataloader workers, or 1 when reading in-process."""
        return max(1, self.num_workers)


@dataclass
class Position:
    """Where a rank is: ``epoch`` and ``batches`` consumed in it (stored in checkpoints).
    ``remaining`` ([start, end) intervals of the epoch order) is set when a run resumed
    with another world size: this epoch then covers only what the old ranks had left."""

    epoch: int = 0
    batches: int = 0
    remaining: list | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "remaining": self.remaining}


def epoch_samples(manifest: dict, seed: int, position: Position) -> list[tuple[int, int]]:
    """The (possibly reduced) epoch order this position walks through."""
    order = epoch_order(manifest, seed, position.epoch)
    if position.remaining is None:
        return order
    return [order[i] for start, end in position.remaining for i in range(start, end)]


def unconsumed(manifest: dict, spec: StreamSpec, position: Position) -> list[list[int]]:
    """The absolute epoch-order intervals this rank has not consumed yet (all its workers)."""
    intervals = position.remaining or [[0, len(epoch_order(manifest, spec.seed, position.epoch))]]
    total = sum(end - start for start, end in intervals)
    left = []
    for k, (start, end) in enumerate(worker_spans(total, spec)):
        done = _consumed_by_worker(position.batches, k, spec.slots) * spec.batch_size
        left += _absolute(intervals, start + done, end)
    return left


def _absolute(intervals: list, start: int, end: int) -> list[list[int]]:
    """Map [start, end) of the concatenation of ``intervals`` back to absolute intervals."""
    out, offset = [], 0
    for a, b in intervals:
        lo, hi = max(start, offset), min(end, offset + b - a)
        if lo < hi:
            out.append([a + lo - offset, a + hi - offset])
        offset += b - a
    return out


def epoch_order(manifest: dict, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(shard index, sample index inside the shard) for every sample, in epoch order."""
    rng = random.Random(f"{seed}/{epoch}")
    order = []
    shard_ids = list(range(len(manifest["shards"])))
    rng.shuffle(shard_ids)
    for s in shard_ids:
        inner = list(range(manifest["shards"][s]["samples"]))
        rng.shuffle(inner)
        order += [(s, j) for j in inner]
    return order


def worker_spans(num_samples: int, spec: StreamSpec) -> list[tuple[int, int]]:
    """[start, end) inside the epoch order for each worker of this rank."""
    per_rank = num_samples // spec.world_size
    start = spec.rank * per_rank
    n_batches = -(-per_rank // spec.batch_size)
    spans, cursor = [], start
    for k in range(spec.slots):
        owned = len(range(k, n_batches, spec.slots))
        size = owned * spec.batch_size
        if n_batches and (n_batches - 1) % spec.slots == k:  # owns the short last batch
            size -= n_batches * spec.batch_size - per_rank
        spans.append((cursor, cursor + max(size, 0)))
        cursor += max(size, 0)
    return spans


def batches_per_epoch(manifest: dict, spec: StreamSpec) -> int:
    return -(-(manifest["num_samples"] // spec.world_size) // spec.batch_size)


class ShardStream(torch.utils.data.IterableDataset):
    """Yields dicts {image (B,3,H,W) in [-1,1] | latent (B,c,h,w): ..., label: (B,), key: list,
    corrupt: int (samples dropped from this batch), epoch: int} from ``position``, for ``epochs`` epochs (None: forever);
    use with ``DataLoader(batch_size=None, num_workers=spec.num_workers)``."""

    def __init__(self, spec: StreamSpec, position: Position | None = None, manifest: dict | None = None,
                 epochs: int | None = 1):
        self.spec, self.position, self.epochs = spec, position or Position(), epochs
        self.manifest = manifest or load_manifest(spec.url)
        self.field = "latent" if self.manifest["kind"] == "latents" else "image"
        self._affine = latent_affine_of(self.manifest) if self.field == "latent" else None
        self._size = spec.resolution or self.manifest.get("resolution") or 0
        if self.field == "image" and not self._size:
            raise DataError(f"{spec.url} holds images of their original sizes (indexed), and the stream was "
                            f"given no resolution to resize them to; set data.resolution")
        self.stats = {"corrupt": 0, "retries": 0}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info else 0
        if info is not None:
            _fix_malloc_mmap_threshold()
        position, first_batch = self.position, -self.position.batches  # loader index of the epoch's batch 0
        for _ in itertools.count() if self.epochs is None else range(self.epochs):
            k = (physical - first_batch) % self.spec.slots  # rotation, see module doc
            order = epoch_samples(self.manifest, self.spec.seed, position)
            start, end = worker_spans(len(order), self.spec)[k]
            start += _consumed_by_worker(position.batches, k, self.spec.slots) * self.spec.batch_size
            self.stats["corrupt"] = 0  # the corrupt-sample limit is per epoch
            yield from self._batches(order, start, end, position.epoch)
            first_batch += self._epoch_batches(order, position)
            position = Position(position.epoch + 1, 0)

    def _epoch_batches(self, order: list, position: Position) -> int:
        count = -(-(len(order) // self.spec.world_size) // self.spec.batch_size)
        if count == 0 and position.remaining is None:  # a forever stream would spin without a batch
            raise DataError(f"{self.spec.url} has {len(order)} samples: fewer than one batch of "
                            f"{self.spec.batch_size} per process for {self.spec.world_size} processes; "
                            f"lower train.batch_size or add data")
        return count

    def _batches(self, order, start: int, end: int, epoch: int) -> Iterator[dict]:
        upcoming = list(dict.fromkeys(s for s, _ in order[start:end]))  # this worker's shards, in order
        reader = _ShardReader(self.spec, self.manifest, self.stats, upcoming)
        try:
            for b in range(start, end, self.spec.batch_size):
                picks = order[b:min(b + self.spec.batch_size, end)]
                samples = [reader.sample(s, j) for s, j in picks]
                decoded = [self._decode(x, epoch, s, j) for x, (s, j) in zip(samples, picks)]
                batch = _collate([d for d in decoded if d is not None], self.field)
                batch["corrupt"] = len(picks) - len(batch["key"])  # dropped, counted by the caller
                batch["epoch"] = epoch
                yield batch
        finally:
            reader.close()  # also when the consumer stops early: no download outlives the stream

    def _decode(self, sample: dict, epoch: int, shard: int, index: int):
        """(tensor, label, key), or None for a corrupt sample. Every random draw (flip,
        posterior noise, crop offsets) comes from a generator seeded by (seed, epoch, shard,
        index), so a resumed run draws what the uninterrupted one did. An image's flip is
        drawn before its crop: the flips are the same whichever crop is set."""
        rng = np.random.default_rng([self.spec.seed, epoch, shard, index])
        try:
            label = shards.sample_label(sample, self.manifest.get("label_key", ""))
            if self.manifest["kind"] == "latents":
                x = decode_latent(sample, rng, self._affine)
                flip = self.spec.hflip and rng.random() < 0.5
            else:
                flip = self.spec.hflip and rng.random() < 0.5
                x = decode_image_uint8(sample, self._size, rng if self.spec.crop == "random" else None)
        except Exception:
            self._count_corrupt()
            return None
        if flip:
            x = x.flip(-1)  # for latents: the VAE is convolutional, so close to encoding the flip
        return x, label, sample["__key__"]

    def _count_corrupt(self) -> None:
        self.stats["corrupt"] += 1
        limit = self.spec.max_corrupt_fraction * self.manifest["num_samples"]
        if self.stats["corrupt"] > limit:
            raise DataError(f"{self.stats['corrupt']} corrupt samples in {self.spec.url}, more than "
                            f"max_corrupt_fraction={self.spec.max_corrupt_fraction}; re-run prepare")


def decode_image(sample: dict, size: int = 0) -> torch.Tensor:
    """The sample's image as (3, H, W) float32 in [-1, 1] (``size``: see decode_image_uint8)."""
    return to_unit_range(decode_image_uint8(sample, size))


def decode_image_uint8(sample: dict, size: int = 0, crop_rng: np.random.Generator | None = None) -> torch.Tensor:
    """The sample's image as (3, H, W) uint8: the stream scales whole batches at once.
    JPEGs go through simplejpeg (libjpeg-turbo; 1.9x PIL's open + decode on 128 px images,
    same pixels); other formats, and JPEGs it refuses (CMYK, odd markers), through PIL.
    With ``size``, an image of another size is resized and cropped to size x size as ADM
    does (data/resize.py: JPEGs DCT-scaled; a random crop with ``crop_rng``); one of that
    size is unchanged."""
    ext = shards.image_field(sample)
    if ext in ("jpg", "jpeg"):
        try:
            return torch.from_numpy(resize.decode_jpeg(sample[ext], size, crop_rng)).permute(2, 0, 1)
        except ValueError:
            pass
    with Image.open(io.BytesIO(sample[ext])) as img:
        pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"))  # writable, for torch
    if size:
        pixels = resize.fit(pixels, size, crop_rng)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def to_unit_range(pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (written into ``out`` when given)."""
    return torch.div(pixels, 127.5, out=out).sub_(1.0)


def decode_latent(sample: dict, rng: np.random.Generator, affine: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """A draw z = mean + std * eps from the stored VAE posterior, mapped to diffusion
    latents by the manifest's per-channel (shift, scale): (z - shift) * scale."""
    mean = np.load(io.BytesIO(sample["mean.npy"])).astype(np.float32)
    std = np.load(io.BytesIO(sample["std.npy"])).astype(np.float32)
    z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    shift, scale = affine
    return torch.from_numpy((z - shift) * scale)


def latent_affine_of(manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's (shift, scale) as (C,1,1) float32 arrays. Manifests written before
    per-channel statistics carry one ``scaling_factor`` and no shift."""
    channels = manifest["latent_shape"][0]
    shift = manifest.get("latent_shift", [0.0] * channels)
    scale = manifest.get("latent_scale", [manifest["scaling_factor"]] * channels)
    return (np.asarray(shift, np.float32).reshape(-1, 1, 1), np.asarray(scale, np.float32).reshape(-1, 1, 1))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _fix_malloc_mmap_threshold(size: int = 128 * 1024) -> None:
    """Keep a worker's memory flat. glibc raises its mmap threshold each time a large block
    (a shard's bytes, a batch) is freed, so later ones come from the heap, which fragments:
    each worker grew by 110 MB over 40 shards, then stayed there. A fixed threshold turns
    that adjustment off (measured: flat within 10 MB); a no-op outside glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):
        pass


def _consumed_by_worker(batches: int, k: int, workers: int) -> int:
    """How many of the first ``batches`` round-robin batches came from worker k."""
    return len(range(k, batches, workers))


def _collate(items: list, field: str) -> dict:
    if not items:
        return {field: torch.empty(0), "label": torch.empty(0, dtype=torch.long), "key": []}
    return {field: _float_batch([x for x, _, _ in items]),
            "label": torch.tensor([y for _, y, _ in items], dtype=torch.long),
            "key": [k for _, _, k in items]}


def _float_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float32 batch; uint8 pixels are scaled to [-1, 1] in the same pass. In a loader
    worker the batch is written straight into shared memory, as default_collate does:
    otherwise sending it to the trainer copies it once more."""
    stacked = torch.stack(tensors)
    out = _empty_for_loader(stacked.shape, torch.float32)
    if stacked.dtype == torch.uint8:
        return to_unit_range(stacked, out)
    return out.copy_(stacked)


def _empty_for_loader(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(shape.numel())
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class _ShardReader:
    """Holds the current shard's samples (the shuffle buffer) and downloads the next shard
    in a background thread while this one is decoded."""

    def __init__(self, spec: StreamSpec, manifest: dict, stats: dict, upcoming: list[int]):
        self.spec, self.manifest, self.stats = spec, manifest, stats
        self.upcoming, self.current, self.samples = upcoming, -1, []
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[int, Future] = {}
        self._prefetch(0)

    def sample(self, shard: int, index: int) -> dict:
        if shard != self.current:
            self.samples = parse_tar(self._take(shard))
            self.current = shard
            self._prefetch(self.upcoming.index(shard) + 1)
        return self.samples[index]

    def _prefetch(self, position: int) -> None:
        if position < len(self.upcoming) and self.upcoming[position] not in self.pending:
            shard = self.upcoming[position]
            entry = self.manifest["shards"][shard]
            self.pending[shard] = self.pool.submit(fetch_shard, self.spec, entry, self.stats)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _take(self, shard: int) -> bytes:
        future = self.pending.pop(shard, None)
        if future is None:
            return fetch_shard(self.spec, self.manifest["shards"][shard], self.stats)
        return future.result()


def parse_tar(data: bytes) -> list[dict]:
    """Samples of a shard in stored order: {'__key__': key, ext: bytes, ...}."""
    return shards.read_samples(data)


def fetch_shard(spec: StreamSpec, entry: dict, stats: dict) -> bytes:
    """The shard's bytes, from the local cache when its sha256 matches, else downloaded."""
    cached = Path(spec.cache_dir) / entry["sha256"] / entry["name"] if spec.cache_dir else None
    if cached and cached.exists():
        return cached.read_bytes()
    loc = storage.parse(spec.url).join(entry["name"])
    data = storage.read_bytes(loc, stats=stats)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{loc}: sha256 does not match the manifest; the shard changed after "
                        f"prepare, re-run prepare")
    if cached:
        storage.write_bytes(storage.parse(str(cached)), data)
    return data
