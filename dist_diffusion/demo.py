"""`make demo`: the product end to end on the embedded stack, on CPU.

Real handwritten digits (scikit-learn's 1,797 8x8 scans) are written as a class-folder
tree of 32x32 RGB PNGs (the ImageNet-100 layout), prepared into WebDataset shards in the
embedded S3 (SeaweedFS on loopback), and streamed from S3 by `dist-diffusion train` with
2 DeepSpeed processes (ZeRO-2, bf16) training a class-conditional tiny UNet in pixel space
at 16x16 with CFG label dropout and an EMA. The EMA UNet is exported (safetensors) and
DDIM + CFG samples one row per class into PNG grids beside a grid of real digits. The
stack is stopped at the end, whatever happens.
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
from diffusers import UNet2DModel
from tqdm import tqdm

from .config import Config, load_config, to_yaml
from .data import storage
from .data.prepare import prepare
from .data.stream import ShardStream, StreamSpec
from .export import export_model
from .generate import class_rows, generate
from .imaging import save_grid
from .stack import start_s3, stop_s3

DEMO_OVERRIDES = ["vae.enabled=false", "data.resolution=16", "data.samples_per_shard=256", "data.hflip=false",
                  "model.num_classes=10", "data.num_workers=1", "train.ckpt_every=200",
                  "train.max_steps=600", "train.lr=2e-3", "train.warmup_steps=20",
                  "train.ema_half_life_steps=50", "train.run_dir=runs/demo", "sample.steps=50",
                  "sample.clip_x0=true"]


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


def sample_class_rows(cfg: Config, unet, per_class: int, cfg_scale: float) -> torch.Tensor:
    """per_class samples of every class, class-major; sample i seeded from (seed, i)."""
    labels = class_rows(cfg, per_class)
    return generate(cfg, unet, labels, range(len(labels)), cfg_scale,
                    progress=lambda it: tqdm(it, desc=f"sample cfg={cfg_scale}", unit="step"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config("configs/tiny.yaml", DEMO_OVERRIDES + args.overrides)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    stages: dict[str, float] = {}
    server = _stage(stages, "stack up", lambda: _stack_up(run_dir / "stack"))
    try:
        report = _run_stages(cfg, DEMO_OVERRIDES + args.overrides, run_dir, stages)
    finally:
        _stage(stages, "stack down", lambda: stop_s3(server.pid))
    report["stages"] = stages
    (run_dir / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"[done] {sum(stages.values()):.0f}s; compare {run_dir}/real.png with the sample grids")
    return 0


def _run_stages(cfg: Config, overrides: list[str], run_dir: Path, stages: dict) -> dict:
    count = _stage(stages, "digits", lambda: write_digit_folders(run_dir / "digits"))
    print(f"        {count} real digits as a class-folder tree in {run_dir / 'digits'}")
    url = "s3://demo/digits"
    storage.s3_client().create_bucket(Bucket="demo")
    manifest = _stage(stages, "prepare", lambda: prepare(run_dir / "digits", url, cfg.data))
    print(f"        {manifest['num_samples']} samples in {len(manifest['shards'])} shards at {url}")
    spec = StreamSpec(url=url, batch_size=cfg.train.batch_size, num_workers=0, seed=cfg.train.seed,
                      hflip=cfg.data.hflip)
    batch = next(iter(ShardStream(spec)))
    real, labels = batch["image"], batch["label"]
    print(f"        streamed back: images {tuple(real.shape)}, labels {labels[:12].tolist()}...")
    save_grid(_real_rows(real, labels, 4), run_dir / "real.png", nrow=4, scale=4)
    _stage(stages, "train", lambda: _train_with_deepspeed(overrides + [f"data.shards={url}"]))
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"        {cfg.train.max_steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    exported = _stage(stages, "export", lambda: export_model(run_dir, run_dir / "unet"))
    ema_unet = UNet2DModel.from_pretrained(exported).eval()
    for scale in (1.0, cfg.sample.cfg_scale):
        grid = _stage(stages, f"sample cfg {scale:g}", lambda: save_grid(
            sample_class_rows(cfg, ema_unet, 8, scale), run_dir / f"samples_cfg{scale:g}.png", nrow=8, scale=4))
        print(f"        DDIM-{cfg.sample.steps} CFG {scale:g}, one row per class -> {grid}")
    return {"loss_first": losses[0], "loss_last": losses[-1], "num_samples": manifest["num_samples"]}


def _train_with_deepspeed(overrides: list[str]) -> None:
    """The product's trainer, as a user runs it: 2 local DeepSpeed processes (ZeRO-2, bf16)."""
    cmd = [sys.executable, "-m", "dist_diffusion.cli", "train", "--config", "configs/tiny.yaml",
           "--nproc", "2", *overrides]
    subprocess.run(cmd, check=True)


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
