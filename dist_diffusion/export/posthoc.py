"""``dist-diffusion ema-reconstruct``: the EMA of relative length ``sigma_rel`` at a step,
rebuilt after training from the run's post-hoc EMA snapshots (``train.ema``; the math is
core.posthoc_ema), and written as a normal export.

It works one rank's file at a time: each snapshot holds each rank's partition of every
profile (ZeRO-3) or one full copy (ZeRO 0-2), and the combination sum_i x_i snapshot_i is
elementwise, so partition r of the result is computed from partition r of the snapshots
alone and equals the same part of the gathered computation bit for bit. Only the export
itself, a whole diffusers model, joins them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..core.posthoc_ema import combine, error_bound, gamma_from_sigma_rel, reconstruction_weights
from ..runtime.checkpoint import COMPLETE, SNAPSHOTS, ema_file, profile_key, profiles_file
from .writer import export_ema_files


@dataclass(frozen=True)
class Snapshot:
    folder: Path
    step: int
    meta: dict  # its COMPLETE: world_size, zero_stage, sigma_rels, gammas

    @property
    def files(self) -> int:
        """Profile files: one per rank under ZeRO-3, else rank 0's full copy."""
        return self.meta["world_size"] if self.meta["zero_stage"] == 3 else 1


def snapshots(run_dir: Path, until: int | None = None) -> list[Snapshot]:
    """The run's complete snapshots, oldest first, up to step ``until``."""
    found = []
    for marker in sorted((Path(run_dir) / SNAPSHOTS).glob(f"step*/{COMPLETE}")):
        meta = json.loads(marker.read_text())
        if until is None or meta["step"] <= until:
            found.append(Snapshot(marker.parent, meta["step"], meta))
    if not found:
        raise ConfigError(f"{run_dir} has no post-hoc EMA snapshot{f' up to step {until}' if until else ''}: train "
                          f"with train.ema.posthoc_sigma_rels=[0.05,0.1] (snapshots are taken with checkpoints)")
    return found


@dataclass(frozen=True)
class Plan:
    """Which snapshot tensors combine, with which weights, into the target profile."""

    terms: list[tuple[Snapshot, str]]  # (snapshot, profile key)
    weights: list[float]
    target_step: int
    sigma_rel: float
    bound: tuple[float, float]  # core.posthoc_ema.error_bound's residual norms

    def record(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "step": self.target_step, "gamma": gamma_from_sigma_rel(self.sigma_rel),
                "snapshots": [{"step": s.step, "profile": key, "weight": w}
                              for (s, key), w in zip(self.terms, self.weights)],
                "residual_l1": self.bound[0], "residual_sum": self.bound[1]}


def plan(run_dir: Path, sigma_rel: float, step: int | None = None) -> Plan:
    found = snapshots(run_dir, step)
    target = (step or found[-1].step, gamma_from_sigma_rel(sigma_rel))
    terms = [(s, profile_key(sr)) for s in found for sr in s.meta["sigma_rels"]]
    points = [(s.step, g) for s in found for g in s.meta["gammas"]]
    weights = reconstruction_weights(points, target)
    return Plan(terms, [float(w) for w in weights], target[0], sigma_rel, error_bound(points, target, weights))


def reconstruct_files(p: Plan, folder: Path) -> None:
    """The reconstructed EMA as a checkpoint's EMA files in ``folder``, one rank's file at a
    time (each from that rank's partitions of the snapshots)."""
    first = p.terms[0][0]
    for rank in range(first.files):
        parts = [(load_file(str(s.folder / profiles_file(rank))), key) for s, key in p.terms]
        names = [n[len(p.terms[0][1]) + 1:] for n in parts[0][0] if n.startswith(p.terms[0][1] + "/")]
        result = {name: combine([tensors[f"{key}/{name}"] for tensors, key in parts], p.weights) for name in names}
        save_file(result, str(folder / ema_file(rank)))
    (folder / COMPLETE).write_text(json.dumps({"step": p.target_step, "world_size": first.meta["world_size"],
                                               "zero_stage": first.meta["zero_stage"]}))


def reconstruct_ema(run_dir: Path, out: Path, sigma_rel: float, step: int | None = None) -> tuple[Path, Plan]:
    """``dist-diffusion ema-reconstruct``: the export of the EMA of ``sigma_rel`` at ``step``
    (default: the last snapshot's)."""
    p = plan(Path(run_dir), sigma_rel, step)
    with tempfile.TemporaryDirectory(prefix="ema-reconstruct-") as tmp:
        reconstruct_files(p, Path(tmp))
        export_ema_files(Path(run_dir), Path(tmp), Path(out), {"weights": "posthoc_ema", "posthoc_ema": p.record(),
                                                              "checkpoint": str(p.terms[-1][0].folder)})
    return Path(out), p
