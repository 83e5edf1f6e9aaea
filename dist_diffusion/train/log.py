"""What a training run tells people: a readable line on stdout (rank 0), metrics.jsonl and
the trackers (rank 0: TensorBoard, W&B, MLflow; ``log.trackers``), a per-rank record of
which samples each step saw, and EMA sample grids (in the trackers as images too)."""

from __future__ import annotations

import hashlib
import json
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import LogConfig, TrainConfig
from ..logs import get_logger
from ..logs.trackers import Trackers

LOG = get_logger("train")


class TrainLogger:
    def __init__(self, train: TrainConfig, env, run_dir: Path, log: LogConfig | None = None,
                 hyperparams: dict | None = None):
        self.train, self.env, self.run_dir = train, env, run_dir
        self.main = env.is_main
        self.window_start, self.window_images, self.window_wait = time.perf_counter(), 0, 0.0
        self.corrupt_total = 0  # corrupt samples this rank skipped since the process started
        self.seen = open(run_dir / f"samples_rank{env.rank:03d}.jsonl", "a")
        self.unwritten: list[str] = []  # sample-key lines since the last flush_samples()
        self.metrics = open(run_dir / "metrics.jsonl", "a") if self.main else None
        self.trackers = Trackers(log or LogConfig(), run_dir, hyperparams or {}) if self.main else None
        self.bar = tqdm(total=train.max_steps, desc="train", unit="step", disable=not self.main,
                        dynamic_ncols=True)

    def start(self, step: int) -> None:
        """The step training starts from (after a resume), for the progress bar."""
        self.bar.n = step
        self.bar.refresh()

    def info(self, message: str) -> None:
        if self.main:
            LOG.info(message)

    def warning(self, message: str) -> None:
        if self.main:
            LOG.warning(message)

    def grid(self, step: int, path: Path) -> None:
        """An EMA sample grid rank 0 drew: its path on stdout, the picture in the trackers."""
        if self.main:
            LOG.info(f"EMA samples -> {path}")
            self.trackers.image("train/samples", path, step)

    def step(self, step: int, m: dict) -> None:
        self.bar.update(1)
        if m.get("nonfinite_skipped"):
            return
        digest = hashlib.sha1("\n".join(m["keys"]).encode()).hexdigest()
        self.unwritten.append(json.dumps({"step": step, "n": len(m["keys"]), "keys_sha1": digest,
                                          "keys": m["keys"]}) + "\n")
        self.window_images += len(m["keys"])
        self.corrupt_total += m["corrupt_samples"]
        self.window_wait += m["data_wait_s"]
        if step % self.train.log_every == 0 or step == self.train.max_steps:
            self.flush_samples()
            self._emit(step, m)

    def flush_samples(self) -> None:
        """Write and flush the buffered sample-key lines: at log steps, at checkpoints and at
        the end, not every step (16 ranks x 50 steps/s of flushes add up on NFS or Lustre). A
        checkpoint's record is on disk before it is complete, so a resume's record is whole."""
        if self.unwritten:
            self.seen.write("".join(self.unwritten))
            self.unwritten.clear()
        self.seen.flush()

    def _emit(self, step: int, m: dict) -> None:
        """The one place a step's device-side metrics are copied to the host."""
        from ..runtime.distributed import mean_over_ranks

        per_sample, level = m["per_sample"].cpu(), m["noise_level"].cpu()
        sums = mean_over_ranks(_loss_sums(per_sample, level))
        reduced = [(total / count).item() if count > 0 else float("nan") for total, count in sums.view(-1, 2)]
        elapsed = time.perf_counter() - self.window_start
        per_proc = self.window_images / elapsed
        row = {"step": step, "loss": reduced[0], **{f"loss_q{i + 1}": reduced[i + 1] for i in range(4)},
               "grad_norm": _as_float(m["grad_norm"]), "lr": m["lr"], "images_per_s": per_proc * self.env.world_size,
               "images_per_s_per_process": per_proc, "data_wait_fraction": self.window_wait / elapsed,
               "corrupt_samples_skipped": self.corrupt_total,
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            row["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.window_start, self.window_images, self.window_wait = time.perf_counter(), 0, 0.0
        if self.main:
            self._write(step, row)

    def _write(self, step: int, row: dict) -> None:
        # a quarter of the noise levels with no sample this window is NaN; JSON has no NaN: null
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        self.metrics.write(json.dumps(clean) + "\n")
        self.metrics.flush()
        self.trackers.scalars(step, {f"train/{key}": value for key, value in row.items() if key != "step"})
        LOG.info(f"step {step}/{self.train.max_steps} loss {row['loss']:.4f} grad {row['grad_norm']:.3f} "
                 f"lr {row['lr']:.2e} {row['images_per_s']:.1f} img/s data-wait {100 * row['data_wait_fraction']:.0f}%")

    def close(self) -> None:
        self.bar.close()
        self.flush_samples()
        self.seen.close()
        if self.main:
            self.metrics.close()
            self.trackers.close()


def _as_float(value) -> float:
    """A grad norm as DeepSpeed reports it (tensor, float or None) -> float (NaN if none)."""
    return float(value) if value is not None else float("nan")


def _loss_sums(per_sample: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """(sum, count) of the loss over all samples, then over those whose noise level (the
    forward process's, 0 data .. 1 noise; under ddpm t / T) falls in each quarter of [0, 1):
    averaged over ranks and divided, they give the global means even when ranks hold
    different counts (a rank whose micro-batch was all corrupt)."""
    masks = [torch.ones_like(per_sample, dtype=torch.bool)]
    if not (level < 0).all():  # a diffusion loss (VAE and classifier losses have no noise level)
        quarter = (level * 4).floor().clamp(max=3)
        masks += [quarter == q for q in range(4)]
    else:
        masks += [torch.zeros_like(per_sample, dtype=torch.bool)] * 4
    return torch.tensor([[per_sample[m].double().sum().item(), float(m.sum())] for m in masks],
                        dtype=torch.float64).flatten()
