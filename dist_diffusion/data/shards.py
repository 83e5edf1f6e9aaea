"""The shard format: deterministic WebDataset tars plus a JSON manifest.

A shard ``<prefix>-000000.tar`` holds samples ``<key>.<ext>``; its sidecar
``<prefix>-000000.json`` (written after the tar) marks it complete and carries its
sample count, byte size and sha256. ``manifest.json`` lists every shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Iterable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sidecar_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".json"


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict:
    """Write samples (key, {ext: bytes}) as a byte-for-byte reproducible tar
    (fixed mtime, owner and mode); returns {samples, bytes, sha256}."""
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(fields[ext]), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(fields[ext]))
            count += 1
    data = path.read_bytes()
    return {"samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest(kind: str, classes: list[str], shards: list[dict], **extra) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": kind, "classes": classes,
            "num_classes": len(classes), "num_samples": sum(s["samples"] for s in shards),
            "shards": shards, **extra}


def dumps(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
