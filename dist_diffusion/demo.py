"""`make demo`: the product end to end on the embedded stack, on CPU.

Real handwritten digits (scikit-learn's 1,797 8x8 scans) are written as a class-folder
tree of 32x32 RGB PNGs (the ImageNet-100 layout), prepared into WebDataset shards in the
embedded S3 (SeaweedFS on loopback), and streamed back to train a class-conditional tiny
UNet in pixel space at 16x16 with CFG label dropout and an EMA (one process for now; the
DeepSpeed trainer replaces this loop). DDIM + CFG then samples one row per class into
PNG grids beside a grid of real digits. The stack is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import Config, load_config, to_yaml
from .core.ema import ema_decay, ema_update_
from .core.losses import diffusion_loss, drop_labels
from .core.models import as_denoiser, build_unet, null_label
from .core.schedule import make_schedule
from .data import storage
from .data.prepare import prepare
from .data.stream import Position, ShardStream, StreamSpec
from .generate import class_rows, generate
from .imaging import save_grid
from .stack import start_s3, stop_s3

DEMO_OVERRIDES = ["vae.enabled=false", "data.resolution=16", "data.samples_per_shard=256", "data.hflip=false",
                  "model.num_classes=10",
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


def endless_batches(spec: StreamSpec):
    """Epoch after epoch of the shard stream (each epoch in its own seeded order)."""
    for epoch in itertools.count():
        loader = torch.utils.data.DataLoader(ShardStream(spec, Position(epoch=epoch)), batch_size=None,
                                             num_workers=spec.num_workers)
        for batch in loader:
            yield batch["image"], batch["label"]


def train_in_process(cfg: Config, batches) -> tuple:
    """A plain single-process loop over the core math: returns (ema_unet, losses)."""
    torch.manual_seed(cfg.train.seed)
    unet, schedule = build_unet(cfg), make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_train_timesteps)
    ema_unet = build_unet(cfg).requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rng, losses = torch.Generator().manual_seed(cfg.train.seed), []
    bar = tqdm(range(cfg.train.max_steps), desc="train", unit="step")
    for step in bar:
        images, labels = next(batches)
        loss = _train_step(cfg, unet, schedule, opt, images, labels, rng, step)
        ema_update_(list(ema_unet.parameters()), list(unet.parameters()),
                    ema_decay(step, cfg.train.ema_decay, cfg.train.ema_half_life_steps, cfg.train.ema_warmup))
        losses.append(loss)
        if step % cfg.train.log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema_unet.eval(), losses


def _train_step(cfg: Config, unet, schedule, opt, x0, labels, rng, step: int) -> float:
    n = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=rng)
    noise = torch.randn(x0.shape, generator=rng)
    labels = drop_labels(labels, cfg.diffusion.label_dropout, null_label(cfg), torch.rand(n, generator=rng))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.runtime.precision == "bf16"):
        loss = diffusion_loss(as_denoiser(unet), schedule, x0, labels, t, noise,
                              cfg.diffusion.prediction, cfg.diffusion.min_snr_gamma).mean()
    for group in opt.param_groups:  # linear warm-up, then constant
        group["lr"] = cfg.train.lr * min(1.0, (step + 1) / max(1, cfg.train.warmup_steps))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
    opt.step()
    return loss.item()


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
        report = _run_stages(cfg, run_dir, stages)
    finally:
        _stage(stages, "stack down", lambda: stop_s3(server.pid))
    report["stages"] = stages
    (run_dir / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"[done] {sum(stages.values()):.0f}s; compare {run_dir}/real.png with the sample grids")
    return 0


def _run_stages(cfg: Config, run_dir: Path, stages: dict) -> dict:
    count = _stage(stages, "digits", lambda: write_digit_folders(run_dir / "digits"))
    print(f"        {count} real digits as a class-folder tree in {run_dir / 'digits'}")
    url = "s3://demo/digits"
    storage.s3_client().create_bucket(Bucket="demo")
    manifest = _stage(stages, "prepare", lambda: prepare(run_dir / "digits", url, cfg.data))
    print(f"        {manifest['num_samples']} samples in {len(manifest['shards'])} shards at {url}")
    spec = StreamSpec(url=url, batch_size=cfg.train.batch_size, num_workers=1, seed=cfg.train.seed,
                      hflip=cfg.data.hflip)
    batches = endless_batches(spec)
    real, labels = next(batches)
    print(f"        streamed back: images {tuple(real.shape)}, labels {labels[:12].tolist()}...")
    save_grid(_real_rows(real, labels, 4), run_dir / "real.png", nrow=4, scale=4)
    ema_unet, losses = _stage(stages, "train", lambda: train_in_process(cfg, batches))
    window = min(50, len(losses))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"        {len(losses)} steps, loss {first:.4f} -> {last:.4f}")
    for scale in (1.0, cfg.sample.cfg_scale):
        grid = _stage(stages, f"sample cfg {scale:g}", lambda: save_grid(
            sample_class_rows(cfg, ema_unet, 8, scale), run_dir / f"samples_cfg{scale:g}.png", nrow=8, scale=4))
        print(f"        DDIM-{cfg.sample.steps} CFG {scale:g}, one row per class -> {grid}")
    return {"loss_first50": first, "loss_last50": last, "num_samples": manifest["num_samples"]}


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
