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


def spawn_local(argv: list[str], nproc: int) -> int:
    """Run ``python -m dist_diffusion.cli ARGV`` as nproc local ranks with a loopback
    rendezvous; the first failure stops the others and its exit code is returned."""
    import subprocess
    import sys
    import time

    port = free_ports(1)[0]
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", *argv],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one rank failed: the others would wait for it forever
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


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
