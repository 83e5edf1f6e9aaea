"""``dist-diffusion index URL``: a manifest for WebDataset shards made elsewhere.

Shards written by webdataset's ``ShardWriter``, img2dataset or ``tar`` over a folder of
``<key>.jpg`` + ``<key>.cls`` pairs carry no ``manifest.json``, which training needs (the
stream's exact resume is built on per-shard sample counts and checksums). This reads
every ``.tar`` under URL once, streamed (memory holds one sample), in a few threads, and
writes ``URL/manifest.json``: per shard its count, bytes and sha256; the classes; the
image sizes and extension. Images may be of any size (original photos, as most public
ImageNet shard sets hold them): the manifest records the range of their widths, heights
and aspect ratios, and ``resolution`` is their side only when all are one square size
(else null: the stream resizes and crops them to ``data.resolution``). Shards that break
the convention are reported, one line each naming the shard and the sample, and no
manifest is written.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from . import shards, storage
from .prepare import PrepareError

MAX_REPORTED = 10  # problem lines shown; the count says how many more


@dataclass
class ShardScan:
    """What one shard holds, and the first thing wrong with it (if any)."""

    entry: dict
    labels: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)  # (width, height) of the images
    exts: Counter = field(default_factory=Counter)
    problem: str = ""


def index(url: str, label_key: str = "", class_names: list[str] | None = None, num_classes: int = 0,
          overwrite: bool = False, threads: int = 8, progress: bool = True) -> dict:
    """Scan the shards under ``url`` and write (and return) its manifest."""
    root = storage.check_bucket(url)
    names = _shard_names(root, url, overwrite)
    with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
        scans = list(tqdm(pool.map(lambda n: scan_shard(root, n, label_key), names), total=len(names),
                          desc="index", unit="shard", disable=not progress))
    classes = _classes(scans, class_names, num_classes, url)
    _raise_problems([s.problem for s in scans if s.problem], url)
    sizes = _sizes(scans, url)
    result = shards.manifest("images", classes, [s.entry for s in scans], resolution=_resolution(sizes),
                             image_size_range=size_range(sizes), image_format=_image_format(scans),
                             label_key=label_key, source="index")
    storage.write_bytes(root.join(shards.MANIFEST), shards.dumps(result))
    return result


def _shard_names(root: storage.Location, url: str, overwrite: bool) -> list[str]:
    listed = storage.list_names(root)
    if shards.MANIFEST in listed and not overwrite:
        raise PrepareError(f"{url} already has a {shards.MANIFEST} (from prepare, encode or an earlier index); "
                           f"pass --overwrite to replace it")
    names = [n for n in listed if n.endswith(".tar") and not Path(n).name.startswith(".")]
    if not names:
        raise PrepareError(f"{url} holds no .tar shards; give the directory or s3:// prefix the shards are in "
                           f"(for a folder of images, use `dist-diffusion prepare`)")
    return names


def scan_shard(root: storage.Location, name: str, label_key: str) -> ShardScan:
    """Count, checksum and check one shard, read as a stream from a local copy."""
    loc = root.join(name)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(loc.key) if not loc.is_s3 else Path(tmp) / "shard.tar"
        if loc.is_s3:
            storage.get_file(loc, local)
        digest = storage.file_sha256(local)
        scan = ShardScan({"name": name, "samples": 0, "bytes": local.stat().st_size, "sha256": digest})
        try:
            _check_samples(scan, local, label_key, loc)
        except tarfile.TarError as err:
            scan.problem = f"{loc}: not a readable tar ({err}); rewrite or remove it"
    return scan


def _check_samples(scan: ShardScan, local: Path, label_key: str, loc: storage.Location) -> None:
    """Check every sample; a key whose files are not adjacent (``tar`` without
    ``--sort=name``) is reported before anything else it causes."""
    seen, first_problem = set(), ""
    with open(local, "rb") as f:
        for sample in shards.iter_samples(f):
            if sample["__key__"] in seen:
                scan.problem = (f"{loc}: sample {sample['__key__']} has files apart from each other in the tar, so "
                                f"readers see two samples; write it with all files of a key together "
                                f"(`tar --sort=name`, or webdataset's TarWriter)")
                return
            seen.add(sample["__key__"])
            if not first_problem:
                _check_sample(scan, sample, label_key, loc)
                first_problem = scan.problem
    scan.problem = first_problem


def _check_sample(scan: ShardScan, sample: dict, label_key: str, loc: storage.Location) -> None:
    ext = shards.image_field(sample)
    where = f"{loc}: sample {sample['__key__']}"
    if ext is None:
        fields = ", ".join(f".{f}" for f in sorted(sample) if f != "__key__")
        scan.problem = f"{where} has no image (.{'/.'.join(shards.IMAGE_EXTS)}); it has {fields}"
        return
    try:
        label = shards.sample_label(sample, label_key)
        with Image.open(io.BytesIO(sample[ext])) as img:  # the header only: cheap
            size = img.size
    except (KeyError, ValueError) as err:
        scan.problem = f"{where}: {err.args[0] if err.args else err}"
        return
    except OSError as err:  # PIL: not an image at all
        scan.problem = f"{where}: .{ext} is not an image ({err})"
        return
    if label < 0:
        scan.problem = f"{where}: label {label} is negative; class indices start at 0"
        return
    scan.entry["samples"] += 1
    scan.labels[label] += 1
    scan.sizes[size] += 1
    scan.exts[ext] += 1


def _classes(scans: list[ShardScan], class_names: list[str] | None, num_classes: int, url: str) -> list[str]:
    """Class names: given, or ``class_000``... for labels 0..max (or ``num_classes``)."""
    seen = [label for s in scans for label in s.labels]
    count = len(class_names) if class_names else num_classes or (max(seen) + 1 if seen else 0)
    for scan in scans:
        outside = sorted(label for label in scan.labels if label >= count)
        if outside and not scan.problem:
            scan.problem = (f"{url}/{scan.entry['name']}: label {outside[0]} is out of range for {count} classes; "
                            f"fix the labels, or give the class list (--classes FILE / --num-classes N)")
    return list(class_names) if class_names else [f"class_{i:03d}" for i in range(count)]


def _sizes(scans: list[ShardScan], url: str) -> Counter:
    """(width, height) -> count over every shard; no samples at all is a clear error."""
    sizes = Counter()
    for s in scans:
        sizes.update(s.sizes)
    if not sizes:
        raise PrepareError(f"{url}: its shards hold no samples; check that the .tar files are WebDataset "
                           f"shards (<key>.jpg next to <key>.cls)")
    return sizes


def _resolution(sizes: Counter) -> int | None:
    """The side when every image is one square size (batched as stored), else None: the
    stream resizes and crops each image to ``data.resolution``."""
    if len(sizes) == 1:
        (width, height), = sizes
        if width == height:
            return width
    return None


def size_range(sizes: Counter) -> dict:
    """{width, height, aspect (width / height)}: each [min, max] over the images."""
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    aspects = [w / h for w, h in sizes]
    return {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)],
            "aspect": [round(min(aspects), 4), round(max(aspects), 4)]}


def describe_sizes(manifest: dict) -> str:
    """``128 px``, or ``160-500 x 161-499 px (original sizes, ...)`` for the summary line."""
    if manifest.get("resolution"):
        return f"{manifest['resolution']} px"
    span = manifest["image_size_range"]
    width, height = (f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in (span["width"], span["height"]))
    return f"{width} x {height} px (original sizes: resized and cropped to data.resolution while streaming)"


def _image_format(scans: list[ShardScan]) -> str:
    exts = Counter()
    for s in scans:
        exts.update(s.exts)
    return "+".join(sorted(exts)) if exts else ""


def _raise_problems(problems: list[str], url: str) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise PrepareError(f"{problems[0]}; fix or remove that shard, then rerun index")
    lines = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more shards" if len(problems) > MAX_REPORTED else ""
    raise PrepareError(f"{len(problems)} shards under {url} break the WebDataset convention; fix or remove "
                       f"them, then rerun index:\n  " + "\n  ".join(lines) + more)


def read_class_names(path: str) -> list[str]:
    """One class name per line; line i names label i."""
    if not Path(path).is_file():
        raise PrepareError(f"--classes {path} does not exist; give a file with one class name per line "
                           f"(line i names label i), or leave it out")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
