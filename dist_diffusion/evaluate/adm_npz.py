"""The samples of one sweep point as an ADM-style ``.npz`` (guided-diffusion's
``evaluator.py``, and the suites that copied it): ``arr_0`` uint8 (N, H, W, 3) in sample
order, ``arr_1`` int64 labels. Written from the finished shards, one shard in memory at a
time: the array is streamed into the zip member, so 50,000 128 px samples (2.4 GB) never
sit in memory at once."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import storage


def npz_name(num_samples: int, side: int) -> str:
    """ADM's file name: samples_<N>x<H>x<W>x3.npz."""
    return f"samples_{num_samples}x{side}x{side}x3.npz"


def write_adm_npz(point_out: storage.Location, shards: int, num_samples: int, side: int) -> storage.Location:
    """``point_out``'s sample shards (samples-000000.tar ...) -> ``point_out/<npz_name>``."""
    target = point_out.join(npz_name(num_samples, side))
    labels = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "samples.npz"
        with zipfile.ZipFile(local, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": (num_samples, side, side, 3)})
                written = 0
                for k in range(shards):
                    images, shard_labels = _shard_arrays(point_out.join(f"samples-{k:06d}.tar"))
                    member.write(np.ascontiguousarray(images).tobytes())
                    labels.append(shard_labels)
                    written += len(images)
            if written != num_samples:
                raise RuntimeError(f"{point_out}: {written} samples in the shards, {num_samples} expected")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.concatenate(labels).astype(np.int64))
            zf.writestr("arr_1.npy", buf.getvalue())
        storage.put_file(local, target)
    return target


def _shard_arrays(tar: storage.Location) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, H, W, 3), labels (n,)) of one sample shard, in sample order."""
    from ..data.stream import parse_tar

    samples = sorted(parse_tar(storage.read_bytes(tar)), key=lambda s: int(s["__key__"]))
    images = np.stack([np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples])
    return images, np.array([int(s["cls"]) for s in samples])
