"""How runs stop: the ways users and schedulers end them, one protocol for every launcher.

- A preemption signal (``train.preempt_signals``: SIGTERM from ``timeout``, ``docker stop``,
  systemd, ``scancel`` and SLURM's preemption; SIGUSR1 from ``--signal``) or the wall-time
  limit: the loop finishes its step, saves a checkpoint, leaves ``RUN/REQUEUE`` and exits
  with :data:`REQUEUE_EXIT_CODE`.
- Ctrl-C (SIGINT): the same stop at the next step boundary, with a checkpoint, and exit
  :data:`INTERRUPT_EXIT_CODE` without the requeue marker (a person stopped it). A second
  Ctrl-C ends the process at once: the first one restores SIGINT's default action.
- DataLoader workers ignore all of these (:func:`ignore_stop_signals`): they are signalled
  with their rank when a whole process group is, and a worker that died first would turn
  the rank's orderly stop into "DataLoader worker exited unexpectedly". Their rank ends them.

Launchers read either news: submitit and Ray catch :class:`Preempted`, and
``slurm/train_latent.sh`` requeues when ``RUN/REQUEUE`` names its job (torchrun turns
exit code 124 into 1, so the file is what survives every launcher).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 124  # launchers treat it as "preempted, checkpoint saved: run me again"
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
REQUEUE_MARKER = "REQUEUE"  # the same news as a file in the run directory

# Why a run stops, ordered so that the maximum over ranks is the reason every rank acts on.
NO_STOP, INTERRUPTED, PREEMPTED = 0, 1, 2


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


class Interrupted(SystemExit):
    """Ctrl-C: the run stopped at a boundary, its work so far is saved."""

    def __init__(self):
        super().__init__(INTERRUPT_EXIT_CODE)


class StopRequests:
    """Remembers that a preemption signal, the wall-time limit or Ctrl-C asked this process
    to stop at its next boundary (a training step, a sample shard). Handlers are installed
    only from the main thread (Python allows no other); :meth:`close` puts back the old ones."""

    def __init__(self, names: list[str], wall_time_limit_s: float = 0):
        self.preempted = self.interrupted = False
        self.limit, self.started = wall_time_limit_s, time.monotonic()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for number in {_signal_number(name) for name in names} - {signal.SIGINT}:
            self._previous[number] = signal.signal(number, self._preempt)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _preempt(self, signum, frame) -> None:
        self.preempted = True

    def _interrupt(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once

    def reason(self) -> int:
        """This process's view (NO_STOP, INTERRUPTED or PREEMPTED); the loop agrees across ranks."""
        if self.preempted or bool(self.limit) and time.monotonic() - self.started > self.limit:
            return PREEMPTED
        return INTERRUPTED if self.interrupted else NO_STOP

    def close(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def stop_exception(reason: int) -> SystemExit:
    return Preempted() if reason == PREEMPTED else Interrupted()


def _signal_number(name: str) -> int:
    return int(getattr(signal, name))


def ignore_stop_signals(names: list[str], worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (with ``functools.partial(ignore_stop_signals, names)``):
    the worker ignores Ctrl-C and the preemption signals; its rank ends it."""
    for number in {signal.SIGINT, signal.SIGTERM, *(_signal_number(name) for name in names)}:
        signal.signal(number, signal.SIG_IGN)


def mark_requeue(run_dir: Path, step: int, is_main: bool) -> None:
    """RUN/REQUEUE names the SLURM job that should run again (written by rank 0); no rank
    exits (and gets the others killed by srun) before the marker exists."""
    from .distributed import barrier  # here: launchers import Preempted without torch

    if is_main:
        marker = {"step": step, "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
        (Path(run_dir) / REQUEUE_MARKER).write_text(json.dumps(marker) + "\n")
    barrier()
