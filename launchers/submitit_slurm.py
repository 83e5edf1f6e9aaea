"""Train on SLURM through submitit: ``python launchers/submitit_slurm.py CONFIG [key=value...]``.

Submits ``train(cfg)`` with one task per worker (``launch.*`` sets nodes, tasks per
node, GPUs, CPUs, partition and time limit), waits, and prints the final summary.
The job is checkpointable: when SLURM signals a timeout or preemption, every rank
finishes its step and saves, then submitit requeues the job, which resumes from that
checkpoint. ``--local`` runs the same job with submitit's local executor (no SLURM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dist_diffusion.config import Config, ConfigError, derive, load_config  # noqa: E402
from dist_diffusion.extras import MissingExtra, require, require_trackers  # noqa: E402

try:
    submitit = require("submitit", "slurm", "launchers/submitit_slurm.py")
except MissingExtra as err:
    if __name__ != "__main__":
        raise
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None

SUBMITIT_SIGNAL = "SIGUSR2"  # what submitit asks SLURM to send before the time limit


class TrainJob(submitit.helpers.Checkpointable):
    """Pickled by submitit and run by every task; resumes from the run directory."""

    def __init__(self, config: str | None, overrides: list[str]):
        self.config, self.overrides = config, overrides

    def __call__(self) -> dict:
        from dist_diffusion.train import Preempted, train

        _export_local_ranks()
        cfg = load_config(self.config, self.overrides)
        cfg = derive(cfg, {"train.preempt_signals": sorted(set(cfg.train.preempt_signals) | {SUBMITIT_SIGNAL})})
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + scontrol requeue
        try:
            return train(cfg)
        except Preempted:
            # The checkpoint is on disk; now let submitit requeue. Only global rank 0
            # requeues; the others wait here for SLURM to stop them, since exiting
            # first could end the job step before rank 0 gets to it.
            if callable(requeue):
                requeue(signal.SIGUSR2, None)
            time.sleep(cfg.launch.signal_delay_s)
            raise


def _export_local_ranks() -> None:
    """submitit's local executor starts its tasks with SUBMITIT_LOCAL_* variables only
    (SLURM tasks have SLURM_*): turn them into torchrun's variables, with a rendezvous
    port all tasks derive from the job id."""
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ:
        return
    job = submitit.JobEnvironment()
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                      LOCAL_WORLD_SIZE=str(job.num_tasks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(20000 + int(job.job_id) % 20000))


def make_executor(cfg: Config, local: bool) -> submitit.Executor:
    launch = cfg.launch
    executor = submitit.AutoExecutor(folder=launch.job_dir, cluster="local" if local else "slurm")
    params = dict(nodes=launch.nodes, tasks_per_node=launch.workers_per_node, timeout_min=launch.time_limit_min,
                  cpus_per_task=launch.cpus_per_worker, name="dd-train")
    if launch.gpus_per_worker:
        params["gpus_per_node"] = launch.gpus_per_worker * launch.workers_per_node
    if not local:
        params["slurm_signal_delay_s"] = launch.signal_delay_s
        # SLURM 22.05-23.02: srun does not inherit the allocation's --cpus-per-task, so each
        # rank would get one CPU for its loader workers and threads
        params["slurm_srun_args"] = [f"--cpus-per-task={launch.cpus_per_worker}"]
        if launch.partition:
            params["slurm_partition"] = launch.partition
    executor.update_parameters(**params)
    return executor


def check_partition(partition: str) -> None:
    """An unknown partition fails here with the list of real ones, not in a pending job."""
    if shutil.which("sinfo") is None:
        raise ConfigError("sinfo not found: run on a SLURM login node, or pass --local")
    listed = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    if listed.returncode != 0:
        raise ConfigError(f"cannot reach SLURM (sinfo: {listed.stderr.strip()}); check SLURM_CONF")
    names = [p.rstrip("*") for p in listed.stdout.split()]
    if partition and partition not in names:
        raise ConfigError(f"launch.partition={partition!r} is not a partition of this cluster; "
                          f"use one of {names}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML recipe, e.g. configs/imagenet100_latent.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. launch.nodes=2")
    parser.add_argument("--local", action="store_true", help="submitit's local executor instead of SLURM")
    args = parser.parse_args(argv)
    from dist_diffusion.errors import expected, one_line
    from dist_diffusion.train.checks import preflight

    try:
        cfg = load_config(args.config, args.overrides)
        require_trackers(cfg.log.trackers)
        if not args.local:
            check_partition(cfg.launch.partition)
        preflight(cfg)
    except expected() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    job = make_executor(cfg, args.local).submit(TrainJob(args.config, args.overrides))
    print(f"submitted job {job.job_id}: {cfg.launch.world_size} tasks; logs in {cfg.launch.job_dir}", flush=True)
    summaries = job.results()  # one per task; rank 0's is the run's
    print(json.dumps(summaries[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
