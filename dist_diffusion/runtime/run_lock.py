"""One trainer per run directory.

Two trainers on one run directory would interleave their checkpoints, metrics and
``config.yaml``. Rank 0 holds an exclusive ``flock`` on ``RUN/.lock`` for the life of its
process; the kernel drops it when that process ends, however it ends (kill -9, a lost
node), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from ..config import ConfigError

LOCK_NAME = ".lock"
_held: list[IO] = []  # open lock files of this process: closing one would release it


def hold(run_dir: Path, is_main: bool) -> None:
    """Rank 0 takes the run directory's lock; every rank stops with one line if it is held."""
    refusal = None if not is_main else _take(run_dir)
    from .distributed import any_rank  # torch: only where ranks take the lock, not in check_free

    if any_rank(refusal is not None):
        raise ConfigError(refusal or f"train.run_dir={run_dir} is in use by another trainer (see rank 0's log)")


def check_free(run_dir: Path) -> None:
    """Before any rank starts: the one-line refusal if another trainer holds ``run_dir``."""
    refusal = _take(run_dir)
    if refusal:
        raise ConfigError(refusal)
    _release(run_dir)


def _take(run_dir: Path) -> str | None:
    """Lock ``run_dir`` for this process; the refusal naming the holder if another has it.
    (A run_dir that is a file was refused before, by checkpoint.stored_run_config.)"""
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(Path(held.name).parent == run_dir for held in _held):
        return None  # this process has it already (a second run in one process)
    f = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return (f"train.run_dir={run_dir} is in use by another trainer ({holder}); wait for it to end, stop "
                f"it, or choose another train.run_dir")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    f.flush()
    _held.append(f)
    return None


def _release(run_dir: Path) -> None:
    for f in [f for f in _held if Path(f.name).parent == run_dir]:
        _held.remove(f)
        f.close()  # closing the last descriptor of the open file drops the flock
