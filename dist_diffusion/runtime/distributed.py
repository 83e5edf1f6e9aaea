"""The process group, one place: rank discovery (env.py) + initialisation + collectives.

torchrun / env:// variables, SLURM variables (master address from the node list), or a
process group someone else already made (Ray Train). NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

from .env import ProcessEnv, process_env


def init_process_group() -> ProcessEnv:
    """Join (or create) the default process group; returns who this process is."""
    if dist.is_available() and dist.is_initialized():  # Ray Train and friends
        return ProcessEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env = process_env()
    _default_rendezvous(env)
    _quiet_known_noise()
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, rank=env.rank, world_size=env.world_size,
                               timeout=timedelta(minutes=30), verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    else:
        _share_cpu_cores()
    return env


def _share_cpu_cores() -> None:
    """On CPU, N ranks on one machine each default to every core: 2N threads fight over N
    cores and a step gets ~3x slower. Give each rank its share (an explicit
    OMP_NUM_THREADS wins: torch has already applied it)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


def _quiet_known_noise() -> None:
    """Name the accelerator instead of letting DeepSpeed probe and warn, and hide a
    deprecation warning DeepSpeed's own ZeRO code triggers on every save."""
    import warnings

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)


def _default_rendezvous(env: ProcessEnv) -> None:
    """MASTER_ADDR/PORT for SLURM (first host of the job) or a lone process (loopback)."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        os.environ["MASTER_ADDR"] = _first_host(nodes) if nodes else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", 0))
        os.environ["MASTER_PORT"] = str(20000 + job % 20000) if job else str(_free_port())
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))


def _first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else nodelist.split(",")[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """Where this process computes: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a small float tensor over ranks (for logging)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_gather_flat(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor (equal sizes) in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on some rank (e.g. a preemption signal)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(values: "np.ndarray") -> "np.ndarray":
    """Elementwise float64 sum of a numpy vector over ranks (gloo and NCCL both carry f64)."""
    import numpy as np

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device())
    dist.all_reduce(t)
    return t.cpu().numpy()
