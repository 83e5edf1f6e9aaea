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

from ..config import Config, ConfigError
from ..core.models import build_vae, vae_latent_affine
from ..data import shards, storage
from ..data.shards import load_manifest
from ..data.stream import decode_image, parse_tar
from ..logs import get_logger
from ..runtime.distributed import select_device
from ..runtime.env import ProcessEnv

BATCH = 64
LOG = get_logger("encode")
STD_TOLERANCE = 0.1  # diffusion latents should have std 1 +- this over the data set


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
    vae = build_vae(cfg.vae, cfg.data).eval().to(where)
    mine = [e for i, e in enumerate(source["shards"]) if i % env.world_size == env.rank]
    for entry in tqdm(mine, desc=f"encode rank {env.rank}", unit="shard", disable=not env.is_main):
        encode_shard(vae, src_url, out_url, entry, source.get("label_key", ""))
    if not env.is_main:
        return None
    entries = _wait_for_sidecars(out_url, source["shards"], wait_timeout)
    shift, scale = vae_latent_affine(vae)
    result = shards.manifest("latents", source["classes"], entries, resolution=source["resolution"],
                             latent_shape=list(_latent_shape(vae, source["resolution"])),
                             scaling_factor=float(vae.config.scaling_factor), latent_shift=shift, latent_scale=scale,
                             latent_stats=_merged_stats(entries), vae=str(cfg.vae.pretrained), source=src_url)
    _check_unit_variance(result["latent_stats"], cfg.vae.pretrained)
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
    encoded, moments = [], LatentMoments(*vae_latent_affine(vae))
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        images = torch.stack([decode_image(s) for s in chunk]).to(vae.device)
        posterior = vae.encode(images).latent_dist
        means, stds = posterior.mean.cpu(), posterior.std.cpu()  # one copy to the host per batch
        moments.add(means.half().float(), stds.half().float())  # what the shard stores
        for s, mean, std in zip(chunk, means, stds):
            encoded.append((s["__key__"], {"mean.npy": _npy(mean), "std.npy": _npy(std),
                                           "cls": str(shards.sample_label(s, label_key)).encode(), "path.txt": s.get("path.txt", b"")}))
    info = shards.upload_tar(out.join(entry["name"]), encoded)
    result = {"name": entry["name"], **info, "latent_moments": moments.as_dict()}
    storage.write_bytes(sidecar, shards.dumps(result))
    return result


class LatentMoments:
    """Per-channel first and second moments of the diffusion latents z' = (z - shift) * scale
    a shard's posteriors N(mean, std^2) give: E[z'] = (mean - shift) * scale and
    E[z'^2] = ((mean - shift)^2 + std^2) * scale^2, summed over samples and positions."""

    def __init__(self, shift: list[float], scale: list[float]):
        self.shift, self.scale = torch.tensor(shift).view(1, -1, 1, 1), torch.tensor(scale).view(1, -1, 1, 1)
        self.count, self.sum, self.sum_sq = 0, torch.zeros(len(shift), dtype=torch.float64), \
            torch.zeros(len(shift), dtype=torch.float64)

    def add(self, means: torch.Tensor, stds: torch.Tensor) -> None:
        centred = (means - self.shift) * self.scale
        self.sum += centred.double().sum(dim=(0, 2, 3))
        self.sum_sq += (centred.double() ** 2 + (stds * self.scale).double() ** 2).sum(dim=(0, 2, 3))
        self.count += means.numel() // means.shape[1]

    def as_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sum_sq": self.sum_sq.tolist()}


def _merged_stats(entries: list[dict]) -> dict | None:
    """Mean and std of the diffusion latents over the whole data set, overall and per
    channel, from every shard's moments (None if a shard was encoded by an older version)."""
    if not all("latent_moments" in e for e in entries):
        return None
    count = sum(e["latent_moments"]["count"] for e in entries)
    total = np.sum([e["latent_moments"]["sum"] for e in entries], axis=0)
    square = np.sum([e["latent_moments"]["sum_sq"] for e in entries], axis=0)
    mean, second = total / count, square / count
    overall_mean = float(mean.mean())
    return {"mean": overall_mean, "std": float(np.sqrt(max(second.mean() - overall_mean ** 2, 0.0))),
            "channel_mean": mean.tolist(), "channel_std": np.sqrt(np.maximum(second - mean ** 2, 0.0)).tolist()}


def _check_unit_variance(stats: dict | None, vae_dir: str) -> None:
    """Diffusion assumes unit-variance latents: say so, once, when they are not."""
    if stats is None:
        return
    spread = ", ".join(f"{s:.2f}" for s in stats["channel_std"])
    LOG.info(f"latents: std {stats['std']:.3f} (per channel {spread}), mean {stats['mean']:.3f}")
    if max(abs(s - 1.0) for s in [stats["std"], *stats["channel_std"]]) > STD_TOLERANCE:
        LOG.warning(f"the latents of {vae_dir} are not unit-variance on this data (std {stats['std']:.3f}, per "
                    f"channel {spread}); measure its statistics with `dist-diffusion calibrate-vae --vae "
                    f"{vae_dir} --shards <image shards>` and encode again")


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
