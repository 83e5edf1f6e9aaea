"""Shards made elsewhere: `dist-diffusion index` gives them a manifest, and they stream and
train like prepare's. Also the other direction: upstream webdataset reads our shards."""

import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PIXEL16, make_class_folders, make_pairs, run_cli, run_dist_diffusion
from dist_diffusion.data.stream import (DataError, Position, ShardStream, StreamSpec, decode_image,
                                        load_manifest, parse_tar)

ROOT = Path(__file__).resolve().parents[1]


def streamed(url: str) -> dict[str, int]:
    """key -> label over one epoch, two workers."""
    spec = StreamSpec(url=url, batch_size=5, num_workers=2, hflip=False)
    loader = torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=2)
    seen = {}
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 16, 16) and batch["corrupt"] == 0
        seen.update(zip(batch["key"], batch["label"].tolist()))
    return seen


@pytest.fixture(scope="module")
def tarred_folder_in_s3(tmp_path_factory, s3_server):
    """Two shards made by plain `tar --sort=name -C folder .` (members './000000.cls',
    './000000.jpg'..., and the './' directory entry), uploaded to S3 as they are."""
    from dist_diffusion.data import storage

    tmp = tmp_path_factory.mktemp("tarred")
    storage.s3_client().create_bucket(Bucket="indexed")
    for part, start in (("a", 0), ("b", 20)):
        folder = make_pairs(tmp / part, count=20, start=start)
        subprocess.run(["tar", "--sort=name", "-cf", str(tmp / f"{part}.tar"), "-C", str(folder), "."], check=True)
        storage.put_file(tmp / f"{part}.tar", storage.parse(f"s3://indexed/tarred/part-{part}.tar"))
    return "s3://indexed/tarred", tmp


def test_plain_tar_shards_in_s3_are_indexed_and_streamed(tarred_folder_in_s3, capsys):
    url, tmp = tarred_folder_in_s3
    code, err = run_cli(["index", url], capsys)
    assert code == 0, err
    manifest = load_manifest(url)
    assert [s["name"] for s in manifest["shards"]] == ["part-a.tar", "part-b.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [20, 20]
    for s, part in zip(manifest["shards"], "ab"):
        data = (tmp / f"{part}.tar").read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    assert manifest["num_classes"] == 3 and manifest["resolution"] == 16 and manifest["image_format"] == "jpg"
    labels = streamed(url)
    assert labels == {f"{i:06d}": i % 3 for i in range(40)}


@pytest.fixture(scope="module")
def shardwriter_shards(tmp_path_factory):
    """Shards by upstream webdataset.ShardWriter, 10 samples each, labels in a .json field
    (as img2dataset-style metadata keeps them), class names in a file."""
    import webdataset as wds

    tmp = tmp_path_factory.mktemp("wds")
    pairs = make_pairs(tmp / "pairs", count=64, classes=4)
    (tmp / "shards").mkdir()
    with wds.ShardWriter(str(tmp / "shards/train-%06d.tar"), maxcount=10, verbose=0) as sink:
        for jpg in sorted(pairs.glob("*.jpg")):
            label = int(jpg.with_suffix(".cls").read_text())
            sink.write({"__key__": jpg.stem, "jpg": jpg.read_bytes(),
                        "json": {"label": label, "caption": f"a photo of class {label}"}})
    (tmp / "classes.txt").write_text("red\ngreen\nblue\ngray\n")
    return tmp


def test_shardwriter_shards_with_json_labels_are_indexed_streamed_and_trained_on(shardwriter_shards, capsys):
    shards, run = shardwriter_shards / "shards", shardwriter_shards / "run"
    code, err = run_cli(["index", str(shards), "--classes", str(shardwriter_shards / "classes.txt"),
                         "data.label_key=label"], capsys)
    assert code == 0, err
    manifest = load_manifest(str(shards))
    assert len(manifest["shards"]) == 7 and manifest["num_samples"] == 64
    assert manifest["classes"] == ["red", "green", "blue", "gray"] and manifest["label_key"] == "label"
    assert streamed(str(shards)) == {f"{i:06d}": i % 4 for i in range(64)}
    done = run_dist_diffusion(["train", "--config", "configs/tiny.yaml",
                               "--nproc", "1", f"train.run_dir={run}", f"data.shards={shards}", *PIXEL16,
                               "train.max_steps=3", "train.ckpt_every=3"], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_upstream_webdataset_reads_our_shards_as_we_do(tmp_path):
    """prepare's tars follow the convention: webdataset sees the same keys, labels and pixels."""
    import webdataset as wds

    from dist_diffusion.config import DataConfig
    from dist_diffusion.data.prepare import prepare

    src = make_class_folders(tmp_path / "src", classes=3, per_class=7)
    manifest = prepare(src, str(tmp_path / "shards"), DataConfig(resolution=16, samples_per_shard=8), progress=False)
    urls = [str(tmp_path / "shards" / s["name"]) for s in manifest["shards"]]
    theirs = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls"))
    ours = [s for url in urls for s in parse_tar(Path(url).read_bytes())]
    assert len(theirs) == len(ours) == 21
    for (key, rgb, label), sample in zip(theirs, ours):
        assert key == sample["__key__"] and label == int(sample["cls"])
        pixels = ((decode_image(sample) + 1.0) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
        assert np.array_equal(pixels, rgb)


@pytest.mark.parametrize("tar_format", ["gnu", "ustar", "pax", "v7"])
def test_the_in_memory_reader_reads_every_tar_format_as_tarfile_does(tmp_path, tar_format):
    """The stream's fast header reader (plain ustar/v7) and its tarfile fallback (pax, GNU
    long names) give the samples tarfile gives; a truncated shard still raises."""
    import tarfile

    from dist_diffusion.data import shards

    folder = make_pairs(tmp_path / "pairs", count=6)
    if tar_format != "v7":  # a path over 100 bytes: ustar's prefix field, GNU's and pax's long-name headers
        (folder / ("d" * 80)).mkdir()
        (folder / ("d" * 80) / ("k" * 40 + ".cls")).write_text("1")
    subprocess.run(["tar", f"--format={tar_format}", "--sort=name", "-cf", str(tmp_path / "s.tar"),
                    "-C", str(folder), "."], check=True, capture_output=True)
    data = (tmp_path / "s.tar").read_bytes()
    expected = list(shards.iter_samples(io.BytesIO(data)))
    assert [s["__key__"] for s in expected][:6] == [f"{i:06d}" for i in range(6)]
    assert shards.read_samples(data) == expected
    short = tmp_path / "short.tar"
    subprocess.run(["tar", f"--format={tar_format}", "-cf", str(short), "-C", str(folder), "000000.jpg"], check=True)
    assert shards._plain_ustar_members(short.read_bytes()) is not None or tar_format == "pax"
    with pytest.raises(tarfile.ReadError):
        shards.read_samples(data[:len(data) // 2 + 100])


@pytest.fixture(scope="module")
def original_size_shards_in_s3(tmp_path_factory, s3_server):
    """Three ShardWriter shards of original-size photos, as public ImageNet shard sets hold
    them: every image its own size (20 to 70 px a side, any aspect), JPEG and a few PNG."""
    import webdataset as wds
    from PIL import Image

    from dist_diffusion.data import storage

    tmp, rng = tmp_path_factory.mktemp("original"), np.random.default_rng(0)
    (tmp / "shards").mkdir()
    sizes = []
    with wds.ShardWriter(str(tmp / "shards/orig-%06d.tar"), maxcount=14, verbose=0) as sink:
        for i in range(40):
            w, h = (int(v) for v in rng.integers(20, 71, size=2))
            sizes.append((w, h))
            pixels = np.clip(rng.normal(40 + 80 * (i % 3), 25, (h, w, 3)), 0, 255).astype(np.uint8)
            buf, ext = io.BytesIO(), "png" if i % 10 == 0 else "jpg"
            Image.fromarray(pixels).save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", ext: buf.getvalue(), "cls": str(i % 3).encode()})
    storage.s3_client().create_bucket(Bucket="original")
    for tar in sorted((tmp / "shards").iterdir()):
        storage.put_file(tar, storage.parse(f"s3://original/in/{tar.name}"))
    return "s3://original/in", sizes


def test_shards_of_original_size_images_are_indexed_with_their_size_range(original_size_shards_in_s3, capsys):
    url, sizes = original_size_shards_in_s3
    code, err = run_cli(["index", url], capsys)
    assert code == 0, err
    manifest = load_manifest(url)
    assert manifest["num_samples"] == 40 and manifest["resolution"] is None and manifest["image_format"] == "jpg+png"
    widths, heights, aspects = [w for w, _ in sizes], [h for _, h in sizes], [w / h for w, h in sizes]
    assert manifest["image_size_range"] == {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)],
                                            "aspect": [round(min(aspects), 4), round(max(aspects), 4)]}
    from dist_diffusion.data.index import describe_sizes

    assert describe_sizes(manifest).startswith(f"{min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px")
    spec = StreamSpec(url=url, batch_size=6, num_workers=2, hflip=False, resolution=16)
    seen = {}
    for batch in torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=2):
        assert batch["image"].shape[1:] == (3, 16, 16) and batch["corrupt"] == 0
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        seen.update(zip(batch["key"], batch["label"].tolist()))
    assert seen == {f"{i:06d}": i % 3 for i in range(40)}
    with pytest.raises(DataError, match="original sizes .* set data.resolution"):
        ShardStream(StreamSpec(url=url, batch_size=6))


def test_random_crop_of_original_size_images_resumes_bit_for_bit(original_size_shards_in_s3, capsys):
    url, _ = original_size_shards_in_s3
    ensure_indexed(url, capsys)

    def images(crop: str, batches: int = 0) -> list[torch.Tensor]:
        spec = StreamSpec(url=url, batch_size=4, num_workers=2, seed=5, resolution=16, crop=crop)
        stream = ShardStream(spec, Position(epoch=1, batches=batches))
        return [b["image"] for b in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)]

    full = images("random")
    assert all(torch.equal(a, b) for a, b in zip(full, images("random"))) and len(full) == 10
    assert all(torch.equal(a, b) for a, b in zip(full[3:], images("random", batches=3), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(full, images("center")))


def test_training_on_original_size_shards_resizes_them_to_data_resolution(original_size_shards_in_s3, tmp_path, capsys):
    url, _ = original_size_shards_in_s3
    ensure_indexed(url, capsys)
    run = tmp_path / "run"
    done = run_dist_diffusion(["train", "--config", "configs/tiny.yaml", "--nproc", "1", f"train.run_dir={run}",
                               f"data.shards={url}", *PIXEL16, "data.crop=random", "train.max_steps=2",
                               "train.ckpt_every=2"], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2


def ensure_indexed(url: str, capsys) -> None:
    """`index` URL, unless the first test of these (run alone with -k, it may not be) did."""
    from dist_diffusion.data import storage

    if not storage.exists(storage.parse(url).join("manifest.json")):
        assert run_cli(["index", url], capsys)[0] == 0
