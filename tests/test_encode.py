"""encode: image shards in S3 -> latent shards, split over 2 processes; stream latents back."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_class_folders, run_dist_diffusion
from dist_diffusion.config import DataConfig, load_config
from dist_diffusion.core.models import build_vae
from dist_diffusion.data import storage
from dist_diffusion.data.prepare import prepare
from dist_diffusion.data.stream import ShardStream, StreamSpec, decode_image, load_manifest, parse_tar

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(0)
    scaled = load_config(ROOT / "configs/tiny.yaml", ["vae.scaling_factor=0.5"])
    build_vae(scaled.vae, scaled.data).save_pretrained(path)
    return path


def test_encode_with_two_processes_then_stream_latents(tmp_path, bucket, vae_dir):
    src = make_class_folders(tmp_path / "src", classes=3, per_class=20)
    images_url, latents_url = f"s3://{bucket}/images", f"s3://{bucket}/latents"
    prepare(src, images_url, DataConfig(resolution=32, samples_per_shard=16), progress=False)
    out = run_dist_diffusion(["encode", "--shards", images_url, "--out", latents_url, "--config", "configs/tiny.yaml",
                              "--nproc", "2", f"vae.pretrained={vae_dir}"], timeout=300)
    assert out.returncode == 0, out.stderr
    manifest = load_manifest(latents_url)
    assert manifest["kind"] == "latents" and manifest["num_samples"] == 60
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["scaling_factor"] == 0.5
    assert len(manifest["shards"]) == 4

    # stored mean equals the VAE's posterior mean of the stored image (float16 rounding)
    image_shard = parse_tar(storage.read_bytes(storage.parse(images_url).join("shard-000001.tar")))
    latent_shard = parse_tar(storage.read_bytes(storage.parse(latents_url).join("shard-000001.tar")))
    assert [s["__key__"] for s in image_shard] == [s["__key__"] for s in latent_shard]
    pointed = load_config("configs/tiny.yaml", [f"vae.pretrained={vae_dir}"])
    vae = build_vae(pointed.vae, pointed.data).eval()
    with torch.no_grad():
        mean = vae.encode(decode_image(image_shard[0])[None]).latent_dist.mean[0]
    stored = torch.from_numpy(np.load(io.BytesIO(latent_shard[0]["mean.npy"])).astype(np.float32))
    assert torch.allclose(stored, mean, atol=2e-3, rtol=2e-3)

    batch = next(iter(ShardStream(StreamSpec(url=latents_url, batch_size=8, num_workers=0))))
    assert batch["latent"].shape == (8, 4, 8, 8) and len(batch["label"]) == 8


def test_encode_needs_a_pretrained_vae(bucket):
    out = run_dist_diffusion(["encode", "--shards",
                              f"s3://{bucket}/x", "--out", f"s3://{bucket}/y", "--config", "configs/tiny.yaml"],
                             timeout=120)
    assert out.returncode == 2 and "encode needs vae.pretrained" in out.stderr
    assert "Traceback" not in out.stderr
