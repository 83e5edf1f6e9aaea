"""Who am I: rank, world size and local rank from the launcher's environment.

torchrun / env:// (RANK, WORLD_SIZE, LOCAL_RANK) wins, then SLURM (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID); with neither, a single process. Reading the environment
never imports torch.distributed, so data jobs can split work without a process group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_env(environ: dict | None = None) -> ProcessEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                          int(env.get("SLURM_LOCALID", 0)))
    return ProcessEnv()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel says are free on ``host`` now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
