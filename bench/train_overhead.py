"""The framework's training step against a minimal plain-PyTorch loop, one process.

Framework: `train.train_step` (DeepSpeed engine with bf16 and ZeRO-2, the stream reading
and decoding a local shard directory in-process, CFG label dropout, per-step generators)
plus the EMA update. (In-process because on a 2-core machine a dataloader worker takes a
core from the step itself: measured 1.12 with one worker, against 0.96 in-process.)
Plain: the same UNet, batch and precision (bf16 autocast where runtime.precision=auto
resolved to bf16, fp32 on a CPU without native bf16, as the framework) with torch AdamW on
tensors already in memory. Both run in this process after a warm-up, alternating in 7 rounds of 10 steps; the figure
is the median over rounds of (framework seconds per step / plain seconds per step), so a
noisy neighbour slows both sides of a round alike. Prints `train_overhead_ratio=<x>`
(goal <= 1.10).

Then the cost of post-hoc EMA (train.ema.posthoc_sigma_rels=[0.05, 0.10]): the same steps with
the EMA alone and with the EMA and two power-function profiles (one more lerp each per step),
alternating; prints `train_with_posthoc_ema_ratio` (goal <= 1.05).

Then the cost of checkpoints: the framework's steps with a checkpoint every SAVE_EVERY steps,
written in the background (train.background_checkpoints) and blocking (each save waits until
its files are on disk), against the same steps without a save, alternating in rounds that
end with every checkpoint complete. Prints `train_with_background_checkpoints_ratio`
(goal <= 1.05) last, and the seconds each save adds in either mode (context).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_class_folders  # noqa: E402

from dist_diffusion.config import load_config, unet_input_shape  # noqa: E402
from dist_diffusion.core.ema import ema_decay  # noqa: E402
from dist_diffusion.core.losses import diffusion_loss  # noqa: E402
from dist_diffusion.core.models import as_denoiser, build_unet  # noqa: E402
from dist_diffusion.data.prepare import prepare  # noqa: E402
from dist_diffusion.train import build_run, stream_batches, train_step  # noqa: E402
from dist_diffusion.train.loop import finish_pending, save  # noqa: E402
from dist_diffusion.runtime.ema import EngineEMA  # noqa: E402

STEPS = 10
ROUNDS = 7
SAVE_EVERY = 5


def plain_loop(cfg, run) -> float:
    """Seconds per step of the textbook loop on the same model, batch and precision."""
    torch.manual_seed(0)
    unet = build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data))
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    x0 = torch.randn(cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution)
    labels = torch.randint(0, cfg.model.num_classes, (cfg.train.batch_size,))
    start = time.perf_counter()
    for _ in range(STEPS):
        t = torch.randint(0, 1000, (x0.shape[0],))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.runtime.precision == "bf16"):
            loss = diffusion_loss(as_denoiser(unet), run.process.schedule, x0, labels, t,
                                  torch.randn_like(x0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    return (time.perf_counter() - start) / STEPS


def framework_loop(run, batches, saves: str = "none") -> float:
    """Seconds per step; ``saves``: none, background (every SAVE_EVERY steps, complete by the
    round's end) or blocking (each save complete before the next step)."""
    start = time.perf_counter()
    for _ in range(STEPS):
        train_step(run, batches)
        run.state.step += 1
        run.ema.update(ema_decay(run.state.step, 0.9999), run.state.step)
        if saves != "none" and run.state.step % SAVE_EVERY == 0:
            save(run)
            if saves == "blocking":
                finish_pending(run)
    finish_pending(run)
    return (time.perf_counter() - start) / STEPS


def checkpoint_rounds(run, batches) -> list[tuple[float, float, float]]:
    """(no saves, background saves, blocking saves) seconds per step, alternating per round."""
    framework_loop(run, batches, "background")  # warm-up: the first save creates the folders
    return [(framework_loop(run, batches), framework_loop(run, batches, "background"),
             framework_loop(run, batches, "blocking")) for _ in range(ROUNDS)]


def profile_rounds(run, batches) -> list[tuple[float, float]]:
    """(the EMA alone, the EMA and two post-hoc EMA profiles) seconds per step, alternating:
    the same engine and steps, the EMA object swapped between rounds."""
    plain = run.ema
    profiled = EngineEMA(run.engine, run.runtime.zero_stage, (0.05, 0.10))
    rounds = []
    for _ in range(ROUNDS):
        run.ema = plain
        alone = framework_loop(run, batches)
        run.ema = profiled
        rounds.append((alone, framework_loop(run, batches)))
    run.ema = plain
    return rounds


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_class_folders(root / "src", classes=4, per_class=100)
        cfg = load_config("configs/tiny.yaml", [
            "vae.enabled=false", "data.resolution=32", "model.num_classes=4", "train.batch_size=32",
            "data.num_workers=0", f"data.shards={root / 'shards'}", f"train.run_dir={root / 'run'}",
            "runtime.zero_stage=2", "data.samples_per_shard=100"])
        prepare(root / "src", str(root / "shards"), cfg.data, progress=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        run = build_run(cfg)
        batches = stream_batches(run)
        framework_loop(run, batches), plain_loop(cfg, run)  # warm-up both
        rounds = [(framework_loop(run, batches), plain_loop(cfg, run)) for _ in range(ROUNDS)]
        saving = checkpoint_rounds(run, batches)
        profiles = profile_rounds(run, batches)
        run.logger.close()
    print("rounds (framework_s, plain_s): " + " ".join(f"({f:.3f},{p:.3f})" for f, p in rounds))
    print(f"train_overhead_ratio={median([f / p for f, p in rounds]):.3f}")
    print("checkpoint rounds (none_s, background_s, blocking_s per step): "
          + " ".join(f"({n:.3f},{b:.3f},{k:.3f})" for n, b, k in saving))
    per_save = STEPS / SAVE_EVERY
    print(f"background_save_cost_s={median([(b - n) * STEPS / per_save for n, b, _ in saving]):.3f}")
    print(f"blocking_save_cost_s={median([(k - n) * STEPS / per_save for n, _, k in saving]):.3f}")
    print("post-hoc EMA rounds (ema_s, ema_and_2_profiles_s per step): "
          + " ".join(f"({a:.3f},{b:.3f})" for a, b in profiles))
    print(f"posthoc_profiles_cost_ms_per_step={1000 * median([b - a for a, b in profiles]):.2f}")
    print(f"train_with_background_checkpoints_ratio={median([b / n for n, b, _ in saving]):.3f}")
    print(f"train_with_posthoc_ema_ratio={median([b / a for a, b in profiles]):.3f}")


if __name__ == "__main__":
    main()
