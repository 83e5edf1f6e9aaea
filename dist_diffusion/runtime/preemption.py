"""The preemption protocol shared by every launcher: a signal (``train.preempt_signals``)
or the wall-time limit asks the loop to stop; it finishes its step, saves a checkpoint,
leaves ``RUN/REQUEUE`` and exits with :data:`REQUEUE_EXIT_CODE`.

Launchers read either signal: submitit and Ray catch :class:`Preempted`, and
``slurm/train_latent.sh`` requeues when ``RUN/REQUEUE`` names its job (torchrun turns
exit code 124 into 1, so the file is what survives every launcher).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 124  # launchers treat it as "preempted, checkpoint saved: run me again"
REQUEUE_MARKER = "REQUEUE"  # the same news as a file in the run directory


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


class PreemptionGuard:
    """Remembers that a preemption signal arrived, or that the wall-time limit passed."""

    def __init__(self, names: list[str], wall_time_limit_s: float = 0):
        self.requested, self.limit, self.started = False, wall_time_limit_s, time.monotonic()
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """This rank's view; the loop agrees across ranks (a collective) every few steps."""
        return self.requested or bool(self.limit) and time.monotonic() - self.started > self.limit


def mark_requeue(run_dir: Path, step: int, is_main: bool) -> None:
    """RUN/REQUEUE names the SLURM job that should run again (written by rank 0); no rank
    exits (and gets the others killed by srun) before the marker exists."""
    from .distributed import barrier  # here: launchers import Preempted without torch

    if is_main:
        marker = {"step": step, "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
        (Path(run_dir) / REQUEUE_MARKER).write_text(json.dumps(marker) + "\n")
    barrier()
