"""Reference statistics of the real data: computed once per (dataset, extractor) by a
distributed pass over the shards and cached next to them as
``<shards>/fid_stats/<extractor id>.npz``; later jobs read that file instead. Sums are
taken in shard order from per-shard feature files, never in rank order."""

from __future__ import annotations

import io

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..data import storage
from ..data.shards import load_manifest
from ..data.stream import IMAGE_EXTS, decode_image, parse_tar
from ..imaging import to_uint8
from ..runtime.distributed import barrier
from ..runtime.env import ProcessEnv
from .features import Extractor
from .stats import FeatureSums, frechet_distance


def reference_stats(shards: str, extractor: Extractor, env: ProcessEnv,
                    batch_size: int = 64) -> tuple[FeatureSums | None, bool]:
    """(statistics of every image in ``shards``, whether they came from the cache); the
    statistics on the main rank only (None elsewhere), which is where scores are made.

    Each rank extracts the features of its shards into ``fid_stats/<id>/`` (one file per
    shard, kept: a rerun skips them); the main rank then sums them in shard order, so the
    statistics are the same bits whatever the number of processes."""
    root = storage.parse(shards)
    cache = root.join(f"fid_stats/{extractor.id}.npz")
    if storage.exists(cache):
        return (_load(storage.read_bytes(cache), extractor) if env.is_main else None), True
    manifest = load_manifest(shards)
    if manifest["kind"] != "images":
        raise ValueError(f"{shards} holds {manifest['kind']}; reference statistics need the image shards "
                         f"(set eval.reference to the output of prepare)")
    entries = manifest["shards"]
    for k in tqdm(range(env.rank, len(entries), env.world_size), desc="reference stats", unit="shard",
                  disable=not env.is_main):
        _extract_shard(root, entries[k], _features_file(root, extractor, k), extractor, batch_size)
    barrier()  # every rank's feature files are written
    if not env.is_main:
        return None, False
    total = FeatureSums.empty(extractor.dim, extractor.classes)
    with threadpool_limits(limits=1):  # the same additions in the same order, see module doc
        for k in range(len(entries)):
            with np.load(io.BytesIO(storage.read_bytes(_features_file(root, extractor, k)))) as f:
                total.add(f["features"], f["logits"])
    storage.write_bytes(cache, _dump(total))
    return total, False


def reference_features(shards: str, extractor: Extractor, count: int) -> np.ndarray | None:
    """The features of the first ``count`` reference images, in shard order (as many real
    images as samples, for KID and precision/recall); None where a reference computed by
    an older version kept no per-shard feature files."""
    root, parts, have = storage.parse(shards), [], 0
    for k in range(len(load_manifest(shards)["shards"])):
        if have >= count:
            break
        path = _features_file(root, extractor, k)
        if not storage.exists(path):
            return None
        with np.load(io.BytesIO(storage.read_bytes(path))) as f:
            parts.append(f["features"])
        have += len(parts[-1])
    return np.concatenate(parts)[:count] if parts else None


def floor_images(reference: str) -> tuple[str, str]:
    """(real images to measure the floor with, what they are). Not the reference's own
    images where others exist: the split a held-out reference was held out of, or the
    held-out split of a reference that has one; else the reference itself (a floor
    biased low: those images are part of the statistics)."""
    manifest = load_manifest(reference)
    if manifest.get("holdout_of"):
        return manifest["holdout_of"], "training split"
    if manifest.get("holdout"):
        return manifest["holdout"]["url"], "held-out split"
    return reference, "reference images themselves"


def real_floor(reference: FeatureSums | None, shards: str, extractor: Extractor, count: int,
               env: ProcessEnv) -> dict | None:
    """``fid_real_floor``: the FID of ``count`` real images of ``shards`` (the first, in
    shard order) against ``reference``, at the samples' N, so a sample's FID reads as a
    multiple of what real data scores. On the main rank (None elsewhere); every rank
    extracts a share of the shards it needs."""
    root, entries = storage.parse(shards), load_manifest(shards)["shards"]
    needed, have = 0, 0
    while needed < len(entries) and have < count:
        have, needed = have + entries[needed]["samples"], needed + 1
    for k in range(env.rank, needed, env.world_size):
        _extract_shard(root, entries[k], _features_file(root, extractor, k), extractor, 64)
    barrier()
    if not env.is_main:
        return None
    features = reference_features(shards, extractor, count)
    sums = FeatureSums.empty(extractor.dim, extractor.classes)
    sums.add(features, np.zeros((len(features), extractor.classes)))
    with threadpool_limits(limits=1):
        fid = frechet_distance(*sums.mean_cov(), *reference.mean_cov())
    return {"fid_real_floor": fid, "fid_real_floor_n": len(features), "fid_real_floor_images": shards}


def _features_file(root, extractor: Extractor, k: int):
    return root.join(f"fid_stats/{extractor.id}/features-{k:06d}.npz")


def _extract_shard(root, entry: dict, dest, extractor: Extractor, batch_size: int) -> None:
    if storage.exists(dest):
        return
    images = [decode_image(s) for s in parse_tar(storage.read_bytes(root.join(entry["name"])))
              if any(ext in s for ext in IMAGE_EXTS)]
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f, lg = extractor(to_uint8(torch.stack(images[start:start + batch_size])))
        feats.append(f.astype(np.float32))
        logits.append(lg.astype(np.float32))
    buf = io.BytesIO()
    np.savez(buf, features=np.concatenate(feats), logits=np.concatenate(logits))
    storage.write_bytes(dest, buf.getvalue())


def _dump(sums: FeatureSums) -> bytes:
    buf = io.BytesIO()
    mu, cov = sums.mean_cov()
    np.savez(buf, vector=sums.to_vector(), mu=mu, sigma=cov, count=sums.count)
    return buf.getvalue()


def _load(data: bytes, extractor: Extractor) -> FeatureSums:
    with np.load(io.BytesIO(data)) as f:
        return FeatureSums.from_vector(f["vector"], extractor.dim, extractor.classes)
