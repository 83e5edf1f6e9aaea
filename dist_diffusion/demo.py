"""`make demo`: the diffusion core end to end in one process on CPU.

Real handwritten digits (scikit-learn's 1,797 8x8 scans, upsampled to 16x16 RGB) train a
class-conditional tiny UNet in pixel space with CFG label dropout and an EMA; DDIM + CFG
then samples one row per class into a PNG grid beside a grid of real digits. Later stages
of the product (S3 shards, DeepSpeed, distributed sampling) replace these pieces.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import Config, load_config, to_yaml
from .core.ema import ema_decay, ema_update_
from .core.guidance import Guidance
from .core.losses import diffusion_loss, drop_labels
from .core.models import as_denoiser, build_unet, null_label
from .core.samplers import per_sample_randn, run_sampler, sample_generators
from .core.schedule import make_schedule
from .imaging import save_grid

DEMO_OVERRIDES = ["vae.enabled=false", "data.resolution=16", "model.num_classes=10",
                  "train.max_steps=600", "train.lr=2e-3", "train.warmup_steps=20",
                  "train.ema_half_life_steps=50", "train.run_dir=runs/demo", "sample.steps=50",
                  "sample.clip_x0=true"]


def load_digits_tensor(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N,3,R,R) images in [-1, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N,1,8,8) in [0,1]
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (images * 2 - 1).repeat(1, 3, 1, 1), torch.tensor(digits.target, dtype=torch.long)


def train_in_process(cfg: Config, images: torch.Tensor, labels: torch.Tensor) -> tuple:
    """A plain single-process loop over the core math: returns (ema_unet, losses)."""
    torch.manual_seed(cfg.train.seed)
    unet, schedule = build_unet(cfg), make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_train_timesteps)
    ema_unet = build_unet(cfg).requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rng, losses = torch.Generator().manual_seed(cfg.train.seed), []
    bar = tqdm(range(cfg.train.max_steps), desc="train", unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.train.batch_size,), generator=rng)
        loss = _train_step(cfg, unet, schedule, opt, images[idx], labels[idx], rng, step)
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


@torch.no_grad()
def sample_class_rows(cfg: Config, unet, per_class: int, cfg_scale: float) -> torch.Tensor:
    """per_class samples of every class, class-major; sample i seeded from (seed, i)."""
    s = cfg.sample
    labels = torch.arange(cfg.model.num_classes).repeat_interleave(per_class)
    gens = sample_generators(s.seed, range(len(labels)))
    noise = per_sample_randn(gens, (cfg.data.image_channels, cfg.data.resolution, cfg.data.resolution))
    guidance = Guidance(null_label(cfg), cfg_scale, tuple(s.guidance_interval) or None)
    return run_sampler(s.sampler, as_denoiser(unet), make_schedule(cfg.diffusion.schedule), noise, labels,
                       guidance, steps=s.steps, spacing=s.spacing, eta=s.eta, generators=gens,
                       prediction=cfg.diffusion.prediction, clip_x0=s.clip_x0,
                       progress=lambda it: tqdm(it, desc=f"sample cfg={cfg_scale}", unit="step"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config("configs/tiny.yaml", DEMO_OVERRIDES + args.overrides)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    stages, started = {}, time.perf_counter()

    images, labels = load_digits_tensor(cfg.data.resolution)
    print(f"[data] {len(images)} real digits, {cfg.model.num_classes} classes, {cfg.data.resolution}px")
    save_grid(_real_rows(images, labels, 8), run_dir / "real.png", nrow=8, scale=4)
    ema_unet, losses = train_in_process(cfg, images, labels)
    stages["train"] = time.perf_counter() - started
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    print(f"[train] {len(losses)} steps in {stages['train']:.0f}s, loss {first:.4f} -> {last:.4f}")
    for scale in (1.0, cfg.sample.cfg_scale):
        grid = save_grid(sample_class_rows(cfg, ema_unet, 8, scale), run_dir / f"samples_cfg{scale:g}.png",
                         nrow=8, scale=4)
        print(f"[sample] DDIM-{cfg.sample.steps} CFG {scale:g}: one row per class -> {grid}")
    stages["total"] = time.perf_counter() - started
    (run_dir / "demo.json").write_text(json.dumps({"stages": stages, "loss_first50": first,
                                                   "loss_last50": last}, indent=2))
    print(f"[done] {stages['total']:.0f}s; compare {run_dir}/real.png with the sample grids")
    return 0


def _real_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    rows = [images[labels == c][:per_class] for c in range(int(labels.max()) + 1)]
    return torch.cat(rows)


if __name__ == "__main__":
    raise SystemExit(main())
