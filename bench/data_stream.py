"""Streaming throughput from the embedded S3 against local disk, same shards, one run.

Prepares 4,000 synthetic 64 px images into 16 shards, once into a local directory and
once into SeaweedFS on loopback, then streams a full epoch from each with a DataLoader
of 2 workers, alternating three times and keeping each side's best. Prints
`s3_vs_local_ratio=<x>` last (goal >= 0.9).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_class_folders  # noqa: E402

from dist_diffusion.config import DataConfig  # noqa: E402
from dist_diffusion.data import storage  # noqa: E402
from dist_diffusion.data.prepare import prepare  # noqa: E402
from dist_diffusion.data.stream import ShardStream, StreamSpec  # noqa: E402
from dist_diffusion.stack import start_s3, stop_s3  # noqa: E402


def samples_per_second(url: str) -> float:
    spec = StreamSpec(url=url, batch_size=64, num_workers=2)
    loader = torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=2)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["key"])
    return count / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_s3(root / "s3")
        try:
            os.environ.update(server.env())
            storage.s3_client.cache_clear()
            storage.s3_client().create_bucket(Bucket="bench")
            src = make_class_folders(root / "src", classes=10, per_class=400)
            data = DataConfig(resolution=64, samples_per_shard=250, prepare_workers=2)
            local, s3 = str(root / "shards"), "s3://bench/shards"
            prepare(src, local, data, progress=False)
            prepare(src, s3, data, progress=False)
            best = {"local": 0.0, "s3": 0.0}
            for _ in range(3):
                best["local"] = max(best["local"], samples_per_second(local))
                best["s3"] = max(best["s3"], samples_per_second(s3))
        finally:
            stop_s3(server.pid)
    print(f"local_samples_per_s={best['local']:.0f} s3_samples_per_s={best['s3']:.0f}")
    print(f"s3_vs_local_ratio={best['s3'] / best['local']:.3f}")


if __name__ == "__main__":
    main()
