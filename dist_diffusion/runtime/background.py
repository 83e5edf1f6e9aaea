"""Checkpoint writes off the training path (``train.background_checkpoints``).

At a save, every tensor DeepSpeed, the EMA and the state hand over is copied to host memory
(pinned on a GPU: one device-to-host copy per tensor, one wait for all of them), and a
thread per rank writes the copies to disk, fsyncs each file, and uploads, while the next
steps run. The copy is taken between two optimizer steps, so it is exactly the state of the
step saved. The loop learns when every rank's writes are durable at its next preemption
check (one collective it makes anyway); only then is the checkpoint marked ``COMPLETE``
(runtime.checkpoint), so a crash before that leaves the previous one in charge.

The writes run in order on one thread: the next checkpoint's files start after the last
one's upload ended, and a folder is never pruned while it is still being uploaded.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

IDLE, BUSY, FAILED = 0, 1, 2  # a rank's writer, as the loop's collective carries it (max over ranks)


class BackgroundWriter:
    """One thread that runs write jobs in the order they were submitted. A job that fails
    stops the rest; its error is raised by the next :meth:`status` or :meth:`wait`."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._unfinished = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._unfinished += 1
            self._idle.clear()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self.error is None:  # after a failure the checkpoint can no longer complete
                    job()
            except BaseException as err:  # raised in the training thread, by status() or wait()
                self.error = err
            with self._lock:
                self._unfinished -= 1
                if self._unfinished == 0:
                    self._idle.set()

    def status(self) -> int:
        """IDLE, BUSY or FAILED: what this rank adds to the loop's collective."""
        if self.error is not None:
            return FAILED
        return IDLE if self._idle.is_set() else BUSY

    def wait(self) -> None:
        """Block until every submitted job ran; raise the first failure."""
        self._idle.wait()
        if self.error is not None:
            raise self.error


def host_copy(state: Any) -> Any:
    """``state`` with every tensor copied to host memory (containers copied, other values
    shared): what the writer thread saves while the training tensors change again."""
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return _to_host(value.detach(), copies)
        if isinstance(value, dict):
            copy = OrderedDict() if isinstance(value, OrderedDict) else {}
            for key, item in value.items():
                copy[key] = visit(item)
            if hasattr(value, "_metadata"):  # a module's state_dict carries its versions there
                copy._metadata = value._metadata
            return copy
        # containers are rebuilt with their own type; a torch.Size (ZeRO-3's shapes, read
        # back with .numel()) holds no tensor and is kept as it is
        if type(value) is list:
            return [visit(v) for v in value]
        if type(value) is tuple:
            return tuple(visit(v) for v in value)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(visit(v) for v in value))
        return value

    copied = visit(state)
    if any(src.is_cuda for src, _ in copies):
        torch.cuda.current_stream().synchronize()  # the non-blocking copies have landed
    return copied


def _to_host(t: torch.Tensor, copies: list) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copies.append((t, host))
    return host


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_durably(state: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def install_background_engine(engine, writer: BackgroundWriter) -> None:
    """Route DeepSpeed's checkpoint files through ``writer``: its save_checkpoint then takes
    host copies and returns, instead of waiting for torch.save of every shard. Loading is
    DeepSpeed's own (the files are the same torch.save files)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SnapshotCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            copied = host_copy(state_dict)
            writer.submit(lambda: torch_save_durably(copied, path))

    engine.checkpoint_engine = SnapshotCheckpointEngine(engine._config)
