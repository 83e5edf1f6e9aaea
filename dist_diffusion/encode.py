"""``dist-diffusion encode``: image shards -> latent shards, once, so training skips the
VAE encoder. Each sample keeps the posterior's mean and std as float16 (training samples
z = mean + std * eps itself), its class and source path. Shard i is encoded by rank
i mod world; rank 0 writes the manifest once every shard's sidecar exists.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from .config import Config, ConfigError
from .core.models import build_vae
from .data import shards, storage
from .data.stream import decode_image, load_manifest, parse_tar
from .runtime.distributed import select_device
from .runtime.env import ProcessEnv

BATCH = 64


def encode_dataset(cfg: Config, src_url: str, out_url: str, env: ProcessEnv,
                   wait_timeout: float = 3600.0) -> dict | None:
    """Encode the shards of rank ``env.rank`` of ``env.world_size``; rank 0 also writes and
    returns the manifest."""
    if not cfg.vae.pretrained:
        raise ConfigError("encode needs vae.pretrained: a trained VAE directory (diffusers "
                          "format, e.g. an SD-VAE or the export of the VAE recipe)")
    source = load_manifest(src_url)
    storage.check_bucket(out_url)
    where = select_device(cfg.runtime.device, env.local_rank)  # cuda:LOCAL_RANK, not every rank on cuda:0
    vae = build_vae(cfg).eval().to(where)
    mine = [e for i, e in enumerate(source["shards"]) if i % env.world_size == env.rank]
    for entry in tqdm(mine, desc=f"encode rank {env.rank}", unit="shard", disable=not env.is_main):
        encode_shard(vae, src_url, out_url, entry, source.get("label_key", ""))
    if not env.is_main:
        return None
    entries = _wait_for_sidecars(out_url, source["shards"], wait_timeout)
    result = shards.manifest("latents", source["classes"], entries, resolution=source["resolution"],
                             latent_shape=list(_latent_shape(vae, source["resolution"])),
                             scaling_factor=float(vae.config.scaling_factor),
                             vae=str(cfg.vae.pretrained), source=src_url)
    storage.write_bytes(storage.parse(out_url).join(shards.MANIFEST), shards.dumps(result))
    return result


@torch.no_grad()
def encode_shard(vae, src_url: str, out_url: str, entry: dict, label_key: str = "") -> dict:
    """Encode one image shard into a latent shard; labels are written as ``.cls`` whatever
    field they came from (``label_key``: the source's label field in ``.json``)."""
    out = storage.parse(out_url)
    sidecar = out.join(shards.sidecar_name(entry["name"]))
    if storage.exists(sidecar):
        return json.loads(storage.read_bytes(sidecar))
    samples = parse_tar(storage.read_bytes(storage.parse(src_url).join(entry["name"])))
    encoded = []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        images = torch.stack([decode_image(s) for s in chunk]).to(vae.device)
        posterior = vae.encode(images).latent_dist
        means, stds = posterior.mean.cpu(), posterior.std.cpu()  # one copy to the host per batch
        for s, mean, std in zip(chunk, means, stds):
            encoded.append((s["__key__"], {"mean.npy": _npy(mean), "std.npy": _npy(std),
                                           "cls": str(shards.sample_label(s, label_key)).encode(), "path.txt": s.get("path.txt", b"")}))
    info = shards.upload_tar(out.join(entry["name"]), encoded)
    result = {"name": entry["name"], **info}
    storage.write_bytes(sidecar, shards.dumps(result))
    return result


def _npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.to(torch.float16).numpy())
    return buf.getvalue()


def _latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, resolution // factor, resolution // factor


def _wait_for_sidecars(out_url: str, source_shards: list[dict], timeout: float) -> list[dict]:
    out, deadline, pending = storage.parse(out_url), time.monotonic() + timeout, list(source_shards)
    found: dict[str, dict] = {}
    while pending:
        for entry in list(pending):
            sidecar = out.join(shards.sidecar_name(entry["name"]))
            if storage.exists(sidecar):
                found[entry["name"]] = json.loads(storage.read_bytes(sidecar))
                pending.remove(entry)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"encode: {len(pending)} shards never completed in {out_url} "
                               f"(did another rank fail?); rerun, finished shards are kept")
        time.sleep(0.5 if pending else 0)
    return [found[e["name"]] for e in source_shards]
