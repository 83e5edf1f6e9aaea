"""Training's step time while the eval watcher works beside it on its own cores, over
training alone on the same cores (eval.during_training, local launch).

Setup: a short run with a checkpoint every 3 steps gives the watcher a queue of checkpoints
to evaluate (each a `dist-diffusion export` and `eval` of 64 samples at 50 DDIM steps and
two CFG scales). The watcher (`dist-diffusion watch`) runs on the last core, as local
`train` places it; this process trains in-process (`train.train_step` + EMA, as
bench/train_overhead.py) on the other cores. Rounds of 10 steps alternate: the watcher
paused (SIGSTOP to its process group: training alone) and running. The figure is the
median over 7 rounds of (seconds per step beside the watcher / seconds per step alone), so
a noisy neighbour slows both sides of a round alike. Prints
`train_step_with_eval_vs_alone_ratio=<x>` (goal <= 1.05).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_class_folders  # noqa: E402

from dist_diffusion.config import load_config  # noqa: E402
from dist_diffusion.core.ema import ema_decay  # noqa: E402
from dist_diffusion.core.models import build_classifier  # noqa: E402
from dist_diffusion.data.prepare import prepare  # noqa: E402
from dist_diffusion.launch.beside import split_cores  # noqa: E402
from dist_diffusion.train import build_run, stream_batches, train_step  # noqa: E402

STEPS, ROUNDS = 10, 7
RECIPE = ["vae.enabled=false", "data.resolution=32", "model.num_classes=4", "train.batch_size=32",
          "data.num_workers=0", "data.samples_per_shard=100"]
EVAL = ["sample.num_samples=64", "eval.samples_per_shard=8", "sample.batch_size=8", "sample.steps=50",
        "eval.guidance_scales=[1,3]"]


def cli(*argv: str, cores: list[int] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", *argv], start_new_session=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None, **popen)


def checkpoints_to_evaluate(root: Path, cores: list[int]) -> Path:
    """A finished run with 10 checkpoints, none evaluated yet: the watcher's queue."""
    run_dir = root / "queued"
    overrides = [*RECIPE, f"data.shards={root / 'shards'}", f"train.run_dir={run_dir}", "train.max_steps=30",
                 "train.ckpt_every=3", "train.keep_last=10", f"eval.classifier={root / 'classifier'}",
                 f"eval.reference={root / 'shards'}", *EVAL]
    done = cli("train", "--config", "configs/tiny.yaml", *overrides, cores=cores, stdout=subprocess.DEVNULL)
    if done.wait() != 0:
        raise SystemExit("the queued run did not train")
    (run_dir / "eval").mkdir()
    (run_dir / "eval/TRAINING_ENDED").write_text("")
    return run_dir


def seconds_per_step(run, batches) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        train_step(run, batches)
        run.state.step += 1
        run.ema.update(ema_decay(run.state.step, 0.9999))
    return (time.perf_counter() - start) / STEPS


def rounds_beside(run, batches, watcher: subprocess.Popen) -> list[tuple[float, float]]:
    """(alone, beside) seconds per step, alternating."""
    out = []
    for _ in range(ROUNDS):
        os.killpg(watcher.pid, signal.SIGSTOP)
        alone = seconds_per_step(run, batches)
        os.killpg(watcher.pid, signal.SIGCONT)
        time.sleep(1.0)  # the watcher back at work
        out.append((alone, seconds_per_step(run, batches)))
        if watcher.poll() is not None:
            raise SystemExit("the watcher ran out of work before the last round; queue more checkpoints")
    return out


def main() -> None:
    trainer_cores, watcher_cores = split_cores(sorted(os.sched_getaffinity(0)), 1)
    if trainer_cores == watcher_cores:
        print("eval_beside bench skipped: one core cannot give training and the watcher a core each")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_class_folders(root / "src", classes=4, per_class=100)
        cfg = load_config("configs/tiny.yaml", [*RECIPE, f"data.shards={root / 'shards'}",
                                                f"train.run_dir={root / 'run'}"])
        prepare(root / "src", str(root / "shards"), cfg.data, progress=False)
        build_classifier(cfg.model, cfg.data).save_pretrained(root / "classifier")
        queued = checkpoints_to_evaluate(root, trainer_cores)
        watcher = cli("watch", "--run-dir", str(queued), cores=watcher_cores, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        try:
            os.sched_setaffinity(0, trainer_cores)
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
            run = build_run(cfg)
            torch.set_num_threads(len(trainer_cores))
            batches = stream_batches(run)
            seconds_per_step(run, batches)  # warm-up
            rounds = rounds_beside(run, batches, watcher)
            run.logger.close()
        finally:
            os.killpg(watcher.pid, signal.SIGCONT)
            os.killpg(watcher.pid, signal.SIGKILL)
            watcher.wait()
    print(f"training on cores {trainer_cores}, the watcher on {watcher_cores}")
    print("rounds (alone_s, beside_s per step): " + " ".join(f"({a:.3f},{b:.3f})" for a, b in rounds))
    ratios = sorted(b / a for a, b in rounds)
    print(f"train_step_with_eval_vs_alone_ratio={ratios[len(ratios) // 2]:.3f}")


if __name__ == "__main__":
    main()
