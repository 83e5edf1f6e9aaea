"""`make demo`: the product end to end on the embedded stack, on CPU.

Real handwritten digits (scikit-learn's 1,797 8x8 scans) are written as a class-folder
tree of 32x32 RGB PNGs (the ImageNet-100 layout) and prepared into WebDataset shards in
the embedded S3 (SeaweedFS on loopback). Then, each as a user would run it: the small
VAE trains (`configs/vae_tiny.yaml`, 2 DeepSpeed processes), is exported and encodes the
shards into 8x8x4 latent shards (2 processes); the class-conditional latent UNet trains
on them from S3 (`configs/tiny.yaml`, 2 processes, ZeRO-2, bf16, CFG label dropout, EMA)
and is exported; DDIM + CFG samples one row per class, decoded by the VAE, into PNG
grids beside a grid of real digits. The stack is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel
from tqdm import tqdm

from .config import Config, load_config
from .core.models import decode_latents
from .data import storage
from .data.prepare import prepare
from .data.stream import ShardStream, StreamSpec
from .export import export_model
from .generate import class_rows, generate
from .imaging import save_grid
from .stack import start_s3, stop_s3

# The latent UNet run (configs/tiny.yaml: 32 px digits -> 8x8x4 latents) and its VAE run.
UNET_OVERRIDES = ["data.samples_per_shard=256", "data.hflip=false", "model.num_classes=10",
                  "data.num_workers=1", "train.ckpt_every=200", "train.max_steps=600", "train.lr=2e-3",
                  "train.warmup_steps=20", "train.ema_half_life_steps=50", "sample.steps=50"]
VAE_OVERRIDES = ["data.hflip=false", "data.num_workers=1", "train.warmup_steps=20"]


def write_digit_folders(root: Path, size: int = 32) -> int:
    """scikit-learn's digits as ROOT/<digit>/<index>.png, size x size RGB; returns the count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N,1,8,8) in [0,1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    for i, (img, label) in enumerate(zip(pixels.numpy(), digits.target)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return len(pixels)


@torch.no_grad()
def sample_class_rows(cfg: Config, unet, vae, per_class: int, cfg_scale: float) -> torch.Tensor:
    """per_class images of every class, class-major; sample i seeded from (seed, i)."""
    labels = class_rows(cfg, per_class)
    latents = generate(cfg, unet, labels, range(len(labels)), cfg_scale,
                       progress=lambda it: tqdm(it, desc=f"sample cfg={cfg_scale}", unit="step"))
    return decode_latents(vae, latents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the UNet run")
    parser.add_argument("--out", default="runs/demo", help="where the demo writes everything")
    parser.add_argument("--vae-steps", type=int, default=400, help="VAE training steps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    unet_overrides = UNET_OVERRIDES + args.overrides + [f"train.run_dir={out / 'unet'}"]
    vae_overrides = VAE_OVERRIDES + [f"train.max_steps={args.vae_steps}", f"train.ckpt_every={args.vae_steps}",
                                     f"train.run_dir={out / 'vae'}"]
    cfg = load_config("configs/tiny.yaml", unet_overrides)  # validated before anything starts
    load_config("configs/vae_tiny.yaml", vae_overrides)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    server = _stage(stages, "stack up", lambda: _stack_up(out / "stack"))
    try:
        report = _run_stages(cfg, unet_overrides, vae_overrides, out, stages)
    finally:
        _stage(stages, "stack down", lambda: stop_s3(server.pid))
    report["stages"] = stages
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"[done] {sum(stages.values()):.0f}s; compare {out}/real.png with the sample grids")
    return 0


def _run_stages(cfg: Config, unet_overrides: list[str], vae_overrides: list[str], out: Path,
                stages: dict) -> dict:
    images_url, latents_url = "s3://demo/digits", "s3://demo/digits-latents"
    manifest = _prepare_data(cfg, out, images_url, stages)
    _stage(stages, "train vae", lambda: _cli("train", "--config", "configs/vae_tiny.yaml", "--nproc", "2",
                                             *vae_overrides, f"data.shards={images_url}"))
    vae_dir = _stage(stages, "export vae", lambda: export_model(out / "vae", out / "vae_model"))
    with_vae = [f"vae.pretrained={vae_dir}"]
    _stage(stages, "encode", lambda: _cli("encode", "--nproc", "2", "--shards", images_url, "--out", latents_url,
                                          "--config", "configs/tiny.yaml", *with_vae))
    _stage(stages, "train unet", lambda: _cli("train", "--config", "configs/tiny.yaml", "--nproc", "2",
                                              *unet_overrides, *with_vae, f"data.shards={latents_url}"))
    losses = [json.loads(line)["loss"] for line in (out / "unet/metrics.jsonl").read_text().splitlines()]
    print(f"        {cfg.train.max_steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    unet_dir = _stage(stages, "export unet", lambda: export_model(out / "unet", out / "unet_model"))
    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    for scale in (1.0, cfg.sample.cfg_scale):
        grid = _stage(stages, f"sample cfg {scale:g}", lambda: save_grid(
            sample_class_rows(cfg, unet, vae, 8, scale), out / f"samples_cfg{scale:g}.png", nrow=8, scale=4))
        print(f"        DDIM-{cfg.sample.steps} CFG {scale:g}, one row per class -> {grid}")
    return {"loss_first": losses[0], "loss_last": losses[-1], "num_samples": manifest["num_samples"]}


def _prepare_data(cfg: Config, out: Path, url: str, stages: dict) -> dict:
    count = _stage(stages, "digits", lambda: write_digit_folders(out / "digits"))
    print(f"        {count} real digits as a class-folder tree in {out / 'digits'}")
    storage.s3_client().create_bucket(Bucket="demo")
    manifest = _stage(stages, "prepare", lambda: prepare(out / "digits", url, cfg.data))
    print(f"        {manifest['num_samples']} samples in {len(manifest['shards'])} shards at {url}")
    spec = StreamSpec(url=url, batch_size=cfg.train.batch_size, num_workers=0, seed=cfg.train.seed,
                      hflip=cfg.data.hflip)
    batch = next(iter(ShardStream(spec)))
    print(f"        streamed back: images {tuple(batch['image'].shape)}, labels {batch['label'][:12].tolist()}...")
    save_grid(_real_rows(batch["image"], batch["label"], 4), out / "real.png", nrow=4, scale=4)
    return manifest


def _cli(*args: str) -> None:
    """A product command as a user runs it (the trainer starts its 2 DeepSpeed processes)."""
    subprocess.run([sys.executable, "-m", "dist_diffusion.cli", *args], check=True)


def _stage(stages: dict, name: str, work):
    """Run one named stage and print it with its time (one line per stage)."""
    started = time.perf_counter()
    result = work()
    stages[name] = round(time.perf_counter() - started, 2)
    print(f"[{name}] {stages[name]:.1f}s")
    return result


def _stack_up(root: Path):
    """The embedded S3 for this run; its keys go into this process's environment."""
    server = start_s3(root)
    os.environ.update(server.env())
    storage.s3_client.cache_clear()
    print(f"        SeaweedFS S3 on {server.endpoint} (pid {server.pid})")
    return server


def _real_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Real images grouped by class, up to per_class each (gaps filled with blanks)."""
    rows = []
    for c in range(int(labels.max()) + 1):
        row = images[labels == c][:per_class]
        rows.append(torch.cat([row, -torch.ones(per_class - len(row), *images.shape[1:])]))
    return torch.cat(rows)


if __name__ == "__main__":
    raise SystemExit(main())
