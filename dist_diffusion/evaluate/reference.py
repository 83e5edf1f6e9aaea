"""Reference statistics of the real data: computed once per (dataset, extractor) by a
distributed pass over the shards and cached next to them as
``<shards>/fid_stats/<extractor id>.npz``; later jobs read that file instead."""

from __future__ import annotations

import io

import numpy as np
import torch
from tqdm import tqdm

from ..data import storage
from ..data.stream import IMAGE_EXTS, decode_image, load_manifest, parse_tar
from ..imaging import to_uint8
from ..runtime.distributed import all_reduce_sum
from ..runtime.env import ProcessEnv
from .features import Extractor
from .stats import FeatureSums


def reference_stats(shards: str, extractor: Extractor, env: ProcessEnv, batch_size: int = 64) -> tuple[FeatureSums, bool]:
    """(statistics of every image in ``shards``, whether they came from the cache)."""
    cache = storage.parse(shards).join(f"fid_stats/{extractor.id}.npz")
    if storage.exists(cache):
        return _load(storage.read_bytes(cache), extractor), True
    manifest = load_manifest(shards)
    if manifest["kind"] != "images":
        raise ValueError(f"{shards} holds {manifest['kind']}; reference statistics need the image shards "
                         f"(set eval.reference to the output of prepare)")
    sums = FeatureSums.empty(extractor.dim, extractor.classes)
    mine = manifest["shards"][env.rank::env.world_size]
    for entry in tqdm(mine, desc="reference stats", unit="shard", disable=not env.is_main):
        images = [decode_image(s) for s in parse_tar(storage.read_bytes(storage.parse(shards).join(entry["name"])))
                  if any(ext in s for ext in IMAGE_EXTS)]
        for start in range(0, len(images), batch_size):
            feats, logits = extractor(to_uint8(torch.stack(images[start:start + batch_size])))
            sums.add(feats, logits)
    total = FeatureSums.from_vector(all_reduce_sum(sums.to_vector()), extractor.dim, extractor.classes)
    if env.is_main:
        storage.write_bytes(cache, _dump(total))
    return total, False


def _dump(sums: FeatureSums) -> bytes:
    buf = io.BytesIO()
    mu, cov = sums.mean_cov()
    np.savez(buf, vector=sums.to_vector(), mu=mu, sigma=cov, count=sums.count)
    return buf.getvalue()


def _load(data: bytes, extractor: Extractor) -> FeatureSums:
    with np.load(io.BytesIO(data)) as f:
        return FeatureSums.from_vector(f["vector"], extractor.dim, extractor.classes)
