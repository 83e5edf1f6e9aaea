"""prepare: class folders -> shards, into a local directory and into a real S3."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_class_folders
from dist_diffusion.config import DataConfig
from dist_diffusion.data import storage
from dist_diffusion.data.prepare import PrepareError, prepare

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = [(0, "truncated"), (1, "garbage"), (2, "empty")]


def data_config(**kw):
    return DataConfig(resolution=32, samples_per_shard=64, prepare_workers=2, **kw)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("src"), classes=4, per_class=60, corrupt=CORRUPT)


def read_tar(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_prepare_into_s3_writes_shards_and_a_correct_manifest(src, bucket):
    out = f"s3://{bucket}/imagenet-like/train"
    result = prepare(src, out, data_config(), progress=False)
    stored = json.loads(storage.read_bytes(storage.parse(out).join("manifest.json")))
    assert stored == result
    assert result["num_samples"] == 240 and result["source_files"] == 243
    assert result["classes"] == [f"n{c:08d}" for c in range(4)]
    assert sorted(s["path"].split("/")[1] for s in result["skipped"]) == [
        "bad_empty.jpg", "bad_garbage.png", "bad_truncated.jpg"]
    assert [s["name"] for s in result["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    labels, keys = [], set()
    for entry in result["shards"]:
        data = storage.read_bytes(storage.parse(out).join(entry["name"]))
        import hashlib
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        files = read_tar(data)
        shard_keys = {name.split(".")[0] for name in files}
        assert len(shard_keys) == entry["samples"]
        keys |= shard_keys
        for key in shard_keys:
            img = Image.open(io.BytesIO(files[f"{key}.jpg"] if f"{key}.jpg" in files else files[f"{key}.png"]))
            assert img.size == (32, 32)
            labels.append(int(files[f"{key}.cls"]))
            assert files[f"{key}.path.txt"].decode().startswith(f"n{labels[-1]:08d}/")
    assert len(keys) == 240 and sorted(set(labels)) == [0, 1, 2, 3]
    first_shard_labels = {int(v) for k, v in read_tar(storage.read_bytes(
        storage.parse(out).join("shard-000000.tar"))).items() if k.endswith(".cls")}
    assert len(first_shard_labels) > 1  # classes are mixed across shards


def test_same_input_gives_the_same_shards_and_rerun_skips(src, tmp_path):
    a = prepare(src, str(tmp_path / "a"), data_config(), progress=False)
    b = prepare(src, str(tmp_path / "b"), data_config(), progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    shard = tmp_path / "a" / "shard-000001.tar"
    before = shard.stat().st_mtime_ns
    (tmp_path / "a" / "shard-000002.json").unlink()  # as if the run died while writing shard 2
    again = prepare(src, str(tmp_path / "a"), data_config(), progress=False)
    assert again == a
    assert shard.stat().st_mtime_ns == before  # complete shard not rewritten


def test_rerun_with_other_settings_is_refused_unless_overwrite(src, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    first = prepare(src, str(out), data_config(), progress=False)
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    cmd = [sys.executable, "-m", "dist_diffusion.cli", "prepare", "--src", str(src), "--out", str(out),
           "data.resolution=24", "data.samples_per_shard=100"]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: {out} holds shards prepared with other settings (data.resolution: 32 -> 24; data.samples_per_shard: 64 -> "
        f"100); prepare into "
        f"another --out, or pass --overwrite to rewrite them"], refused.stderr
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    again = subprocess.run([*cmd, "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolution"] == 24 and manifest["num_samples"] == first["num_samples"]
    with Image.open(io.BytesIO(next(v for k, v in read_tar((out / "shard-000000.tar").read_bytes()).items()
                                    if k.endswith(".jpg")))) as img:
        assert img.size == (24, 24)  # rewritten, not reused


def test_png_format(src, tmp_path):
    result = prepare(src, str(tmp_path), data_config(image_format="png"), progress=False)
    names = read_tar((tmp_path / result["shards"][0]["name"]).read_bytes())
    assert any(n.endswith(".png") for n in names) and not any(n.endswith(".jpg") for n in names)


def test_missing_bucket_fails_before_any_work(src, s3_server):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        prepare(src, "s3://no-such-bucket/x", data_config(), progress=False)


def test_wrong_secret_is_refused_clearly(src, bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" * 8)
    storage.s3_client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="refused the credentials"):
            prepare(src, f"s3://{bucket}/x", data_config(), progress=False)
    finally:
        monkeypatch.undo()
        storage.s3_client.cache_clear()


def test_anonymous_requests_are_refused(s3_server, bucket):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    anon = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError, match="AccessDenied"):
        anon.list_objects_v2(Bucket=bucket)


def test_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match="is not a directory"):
        prepare(tmp_path / "missing", str(tmp_path / "out"), data_config(), progress=False)
    with pytest.raises(PrepareError, match="no class folders"):
        prepare(tmp_path, str(tmp_path / "out"), data_config(), progress=False)


def _gray(mode: str, level: float) -> Image.Image:
    """A 4x4 image of one gray ``level`` (0-1) in ``mode``, as a file of that mode would open."""
    import numpy as np

    if mode in ("I;16", "I"):
        image = Image.fromarray(np.full((4, 4), round(level * 65535), dtype=np.uint16 if mode == "I;16" else np.int32))
        assert image.mode == mode
        return image
    if mode == "F":
        return Image.fromarray(np.full((4, 4), level, dtype=np.float32))
    rgb = Image.new("RGB", (4, 4), (round(level * 255),) * 3)
    return rgb.convert(mode) if mode != "P" else rgb.quantize(colors=4)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "RGB"])
def test_every_image_mode_becomes_the_right_8bit_gray(mode):
    from dist_diffusion.data.prepare import to_rgb

    for level in (0.0, 0.25, 0.5, 1.0):
        out = to_rgb(_gray(mode, level))
        assert out.mode == "RGB" and abs(int(out.getpixel((1, 1))[0]) - round(level * 255)) <= 1, (mode, level)


def test_a_16bit_grayscale_png_is_not_stored_white(tmp_path):
    import numpy as np

    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(src / "ramp.png")
    result = prepare(tmp_path / "src", str(tmp_path / "out"), DataConfig(resolution=32, image_format="png"),
                     progress=False)
    (payload,) = [v for k, v in read_tar((tmp_path / "out" / result["shards"][0]["name"]).read_bytes()).items()
                  if k.endswith(".png")]
    stored = np.asarray(Image.open(io.BytesIO(payload)))[..., 0].astype(float)
    assert abs(stored.mean() - ramp.mean() / 257) < 1 and stored.min() == 0
