"""The training job: ``train(cfg)``, which every launcher calls (local, torchrun, SLURM,
Ray), and ``python -m dist_diffusion.train`` (``__main__``), one rank of it.

- ``loop``: the driver of named steps, which knows no objective;
- ``objectives``: what a ``train.target`` builds, feeds and optimises, and what it exports;
- ``state``: the step, data position and skipped steps a checkpoint carries (``TrainState``);
- ``checks``: the launchers' torch-free preflight;
- ``log`` (stdout, metrics.jsonl, TensorBoard) and ``grids`` (EMA sample grids).

The loop's names are loaded on first use: a launcher imports ``train.checks`` before any
rank starts and should not pay for torch, diffusers and DeepSpeed there.
"""

from __future__ import annotations

import importlib

from ..errors import TrainingStopped
from ..runtime.preemption import REQUEUE_EXIT_CODE, Preempted  # the launchers' protocol

_FROM_LOOP = ("train", "build_run", "stream_batches", "train_step", "save", "restore", "Run")
__all__ = ["REQUEUE_EXIT_CODE", "Preempted", "TrainingStopped", *_FROM_LOOP]


def __getattr__(name: str):
    if name in _FROM_LOOP:
        return getattr(importlib.import_module(".loop", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
