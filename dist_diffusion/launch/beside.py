"""Local ``dist-diffusion train`` with ``eval.during_training``: the eval watcher runs as a
process beside the trainer's ranks, each side on cores of its own where the machine has
enough (the watcher on the last ``eval.cpus``, the trainer on the rest), so sampling never
takes a training step's core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ..config import EvalConfig
from ..evaluate.beside import mark_training_ended, mark_training_started
from ..logs import get_logger
from ..runtime.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

LOG = get_logger("train")


def split_cores(cores: list[int], watcher_cpus: int) -> tuple[list[int], list[int]]:
    """(trainer's, watcher's) of the cores this process may use; both all of them when
    there are too few to leave the trainer at least one of its own."""
    if len(cores) <= watcher_cpus:
        return cores, cores
    return cores[:-watcher_cpus], cores[-watcher_cpus:]


class WatcherBeside:
    """``with WatcherBeside(run_dir, cfg.eval): code = <train>; watcher.training_ended(code)``.
    Entered before the trainer's ranks start (they inherit its core set)."""

    def __init__(self, run_dir: Path, ev: EvalConfig):
        self.run_dir, self.eval, self.proc = Path(run_dir), ev, None

    def __enter__(self) -> "WatcherBeside":
        mark_training_started(self.run_dir)
        cores = sorted(os.sched_getaffinity(0))
        trainer, watcher = split_cores(cores, self.eval.cpus)
        if trainer == watcher:
            LOG.warning(f"eval.during_training: {len(cores)} cores cannot give the watcher eval.cpus="
                        f"{self.eval.cpus} of its own; it shares them with training")
        else:
            LOG.info(f"eval.during_training: training on cores {trainer}, the watcher on {watcher}")
        self.proc = subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", "watch", "--run-dir",
                                      str(self.run_dir), "--nproc", str(self.eval.nproc), "--until-marked"],
                                     preexec_fn=lambda: os.sched_setaffinity(0, watcher))
        os.sched_setaffinity(0, trainer)
        return self

    def training_ended(self, code: int) -> int:
        """Training returned ``code``: after a stop (preemption, Ctrl-C) the watcher stops too,
        resumable; otherwise it evaluates what is complete, and ends. Returns the command's
        exit code: training's, else the watcher's."""
        if code in (REQUEUE_EXIT_CODE, INTERRUPT_EXIT_CODE):
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
        else:
            mark_training_ended(self.run_dir)
        if self.proc.poll() is None:
            LOG.info("training ended; waiting for the eval watcher to finish the remaining checkpoints")
        watched = self.proc.wait()
        if code == 0 and watched != 0:
            LOG.error(f"training finished, but the eval watcher failed (exit code {watched}; its error is above); "
                      f"`dist-diffusion watch --run-dir {self.run_dir}` evaluates what is left")
        return code or watched

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:  # the launcher itself failed
            self.proc.terminate()
            self.proc.wait()
