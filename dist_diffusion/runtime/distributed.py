"""The process group, one place: rank discovery (env.py) + initialisation + collectives.

torchrun / env:// variables, SLURM variables (master address from the node list), or a
process group someone else already made (Ray Train). NCCL on GPUs, gloo on CPU: the
device is chosen once (``runtime.device``), and every collective here moves its tensor
there, so an NCCL-only group never sees a CPU tensor.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ConfigError
from .env import ProcessEnv, free_ports, process_env

_DEVICE = torch.device("cpu")  # this process's device, chosen once by select_device()
_OWN_GROUP = False  # this module created the default process group (not Ray)


class RendezvousFailed(RuntimeError):
    """The process group could not form (a peer never came, or cannot be reached)."""


class PeerLost(RuntimeError):
    """A collective failed mid-run: another rank died, or its node became unreachable."""


# What gloo and NCCL say when the other end of a collective is gone (and nothing else: an
# NCCL setup error, IB/EFA or NVLS, is not a dead node). gloo raises plain RuntimeErrors, so
# the text is all there is to go by.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
              "Socket Timeout", "NCCL communicator was aborted", "Connection closed by remote peer",
              "remote process exited", "Watchdog caught collective operation timeout", "failed to recv, got 0 bytes")
NCCL_DEBUG_HINT = ("to see why, rerun with NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET (each rank logs how it "
                   "set up its transports: sockets, IB/EFA, NVLink)")


class CommunicationFailed(RuntimeError):
    """A collective failed for a reason other than a lost peer (e.g. an NCCL setup error)."""


def as_peer_lost(err: BaseException) -> PeerLost | None:
    """``err`` as a :class:`PeerLost` when it says a peer rank is gone, else None."""
    text = str(err)
    # DistNetworkError: the store's connection broke, and the store lives on rank 0's node
    if not (isinstance(err, dist.DistNetworkError) or any(marker in text for marker in _PEER_GONE)):
        return None
    who = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    return PeerLost(f"{who} lost contact with another rank mid-run ({text.splitlines()[0][:160]}); that rank or "
                    f"its node died, and its log says why. Nothing complete is lost: restarted, the run resumes "
                    f"from its newest complete checkpoint (SLURM requeues the job, Ray restarts the workers)")


def as_communication_failed(err: BaseException) -> CommunicationFailed | None:
    """Any other error of the process group (DeepSpeed's NCCL, torch's DistError): its own
    text, as it is, and the NCCL variables that explain it; None for an unrelated error."""
    text = str(err).strip()
    if as_peer_lost(err) is not None or not (isinstance(err, dist.DistError) or "NCCL" in text):
        return None
    who = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    return CommunicationFailed(f"{who}: a collective failed: {text}\n{NCCL_DEBUG_HINT}")


def init_process_group(requested_device: str = "auto", require_gpu: bool = False, socket_ifname: str = "",
                       timeout_s: float = 600.0) -> ProcessEnv:
    """Join (or create) the default process group on this process's device; returns who
    this process is. ``requested_device`` is ``runtime.device``; ``require_gpu`` is set
    when the launcher gave this process GPUs, so a CPU fallback is an error, not a slow run.
    ``timeout_s`` bounds the rendezvous and every collective: a dead peer stops the run."""
    if dist.is_available() and dist.is_initialized():  # Ray Train and friends
        env = ProcessEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        select_device(requested_device, env.local_rank, require_gpu)
        return env
    env = process_env()
    chosen = select_device(requested_device, env.local_rank, require_gpu)
    _default_rendezvous(env)
    bind_interface(socket_ifname)
    _quiet_known_noise(chosen)
    pin_op_build()
    import deepspeed

    global _OWN_GROUP
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if env.world_size == 1:  # no peer to meet: a store in memory, not a port another process can take first
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
    try:
        deepspeed.init_distributed(dist_backend=backend, rank=env.rank,
                                   world_size=env.world_size, timeout=timedelta(seconds=timeout_s), verbose=False)
    except (RuntimeError, ValueError) as err:  # DistStoreError and gloo's connect errors are RuntimeErrors
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise RendezvousFailed(f"rank {env.rank} of {env.world_size} could not form the process group at {where} "
                               f"within {timeout_s:g}s ({str(err).splitlines()[0][:200]}); did another rank or "
                               f"node fail to start? Check its log, or raise runtime.rendezvous_timeout_s") from None
    _OWN_GROUP = True
    return env


def shutdown() -> None:
    """Leave the process group this module made, after every rank got here: tearing it down
    in interpreter exit instead raced the backend's threads ("terminate called without an
    active exception")."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _OWN_GROUP = False


def bind_interface(ifname: str = "") -> None:
    """Make gloo and NCCL talk over ``ifname``, by default the interface that routes to the
    master: both otherwise take the address of this host's name, which on many nodes (and
    in a network namespace) resolves to loopback, and peers on other hosts cannot connect.
    Variables already set by the user win."""
    ifname = ifname or route_interface(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    if ifname:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)


def local_address(toward: str) -> str | None:
    """This host's address on the route to ``toward`` (None if it does not resolve)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((toward, 9))  # UDP: no packet is sent, the kernel only picks a route
            return probe.getsockname()[0]
    except OSError:
        return None


def route_interface(address: str) -> str | None:
    """The interface this host sends to ``address`` through (None for loopback, or when
    the address does not resolve)."""
    import fcntl
    import socket
    import struct

    local = local_address(address)
    if local is None or local.startswith("127."):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
    return None


def select_device(requested: str = "auto", local_rank: int = 0, require_gpu: bool = False) -> torch.device:
    """Resolve ``runtime.device`` for this process, check it is usable, make it current.
    Every collective and every model of this process then lives on :func:`device`."""
    global _DEVICE
    check_cuda_usable(requested, require_gpu)
    wants_cuda = requested == "cuda" or require_gpu or (requested == "auto" and torch.cuda.is_available())
    if wants_cuda:
        check_local_gpu(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        _DEVICE = torch.device("cuda", local_rank)
    else:
        _DEVICE = torch.device("cpu")
    _share_cpu_cores()
    return _DEVICE


def check_cuda_usable(requested: str, require_gpu: bool, driver: Callable[[], str | None] | None = None,
                      cuda_available: Callable[[], bool] | None = None) -> None:
    """Fail loudly, instead of training on the CPU, when a GPU was asked for (runtime.device=cuda,
    launch.gpus_per_worker > 0) or one is plainly there (``auto`` on a machine with an NVIDIA
    driver) but CUDA is unusable: a CUDA build of torch on a too-old driver reports no GPU, and
    the run only looks slow. Launchers call this before they start any worker. ``driver`` and
    ``cuda_available`` are the probes (tests inject them)."""
    if requested == "cpu" and not require_gpu or (cuda_available or torch.cuda.is_available)():
        return
    found = (driver or nvidia_driver)()
    if requested == "auto" and not require_gpu:
        if found is None:
            return  # a machine without NVIDIA GPUs: auto means the CPU
        why = f"runtime.device=auto found an NVIDIA driver ({found})"
    else:
        why = "runtime.device=cuda" if requested == "cuda" else "launch.gpus_per_worker > 0"
    raise ConfigError(f"{why} but CUDA is unavailable here: torch {torch.__version__} is built for CUDA "
                      f"{torch.version.cuda or 'none (a CPU build)'}, NVIDIA driver {found or 'not found'}. "
                      f"Install a driver that supports that CUDA (CUDA 13.0 needs >= 580, 12.x >= 525) or a torch "
                      f"build for your driver; set runtime.device=cpu (and launch.gpus_per_worker=0) to run on "
                      f"the CPU on purpose")


def check_local_gpu(local_rank: int, visible: int) -> None:
    """Local rank r binds cuda:r, so this process must see at least r+1 GPUs."""
    if local_rank < visible:
        return
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise ConfigError(f"local rank {local_rank} needs cuda:{local_rank} but this process sees {visible} GPU(s) "
                      f"(CUDA_VISIBLE_DEVICES={shown}); under SLURM --gpus-per-task binds one GPU per task: "
                      f"use --gpus-per-node (as slurm/train_latent.sh does) or --gpu-bind=none, or start "
                      f"at most {visible} processes per node")


def nvidia_driver() -> str | None:
    """The loaded NVIDIA kernel driver's version, read without CUDA (None if there is none)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else text.splitlines()[0].strip()


def placement(env: ProcessEnv) -> dict:
    """Where this rank runs and how it reaches the others (RUN/hosts/rankNNN.json)."""
    import socket

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
            "hostname": socket.gethostname(), "address": local_address(master), "master": master,
            "socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME") or route_interface(master),
            "backend": dist.get_backend() if dist.is_initialized() else None, "device": str(device()),
            # the CPUs this rank may run on (its loader workers inherit them): under SLURM,
            # --cpus-per-task of them where the scheduler binds tasks (task/affinity, cgroup)
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def describe(env: ProcessEnv) -> str:
    """One line for the start of a run: world layout, device, backend, GPU."""
    local_world = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "?"))
    backend = dist.get_backend() if dist.is_initialized() else "none"
    where = str(device())
    if device().type == "cuda":
        where += f" ({torch.cuda.get_device_name(device())}, CUDA {torch.version.cuda}, driver {nvidia_driver()})"
    return (f"{env.world_size} process(es), {local_world} per node; rank {env.rank} on {where}, "
            f"backend {backend}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


def _share_cpu_cores() -> None:
    """N ranks on one machine each default to every core: 2N threads fight over N cores
    (a CPU step got ~3x slower; on GPUs the data workers and launch threads starve). Give
    each rank its share (an explicit OMP_NUM_THREADS wins, applied here again: a rank forked
    from a process that imported torch under another value has that one). Under SLURM the
    share is the task's --cpus-per-task: the node's core count may include cores the job
    was not given."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["SLURM_CPUS_PER_TASK"])))
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    # the cores this process may run on (a launcher may have pinned it), not all the machine's
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, usable // max(1, local_world)))


def pin_op_build() -> None:
    """Build DeepSpeed's JIT ops once per environment, whoever starts the process.
    - The ops live inside the venv (``<venv>/torch_extensions``, unless TORCH_EXTENSIONS_DIR
      is set), so `make venv` builds them with the environment and a fresh home directory,
      a container user or a second checkout's venv never finds a stale or foreign build.
    - A `ninja` of another version (the system's 1.11 against this environment's 1.13, say)
      rebuilds the op from scratch, about a minute on 2 cores, every time the two alternate
      between processes. This interpreter's bin directory goes first on PATH when it holds
      a ninja, so every rank of every launcher builds with the same one."""
    import sys

    if sys.prefix != sys.base_prefix:  # a venv; a system Python keeps torch's default
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's bin, not the base Python's
    path = os.environ.get("PATH", "")
    if (Path(bin_dir) / "ninja").exists() and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def prebuild_cpu_ops() -> None:
    """Build DeepSpeed's CPU communication op (shared-memory collectives for gloo ranks on
    one machine) now, once, instead of in the first training run: about a minute on 2
    cores, which would otherwise land inside the first run and its timeouts. `make venv`
    calls this. GPU machines use NCCL and skip it."""
    if torch.cuda.is_available():
        return
    pin_op_build()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _quiet_known_noise(torch.device("cpu"))
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


def _quiet_known_noise(chosen: torch.device) -> None:
    """Name the accelerator instead of letting DeepSpeed probe and warn (and pick the GPU
    under runtime.device=cpu), and hide a deprecation warning DeepSpeed's own ZeRO code
    triggers on every save."""
    import warnings

    if chosen.type == "cpu":
        import logging

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # "No CUDA runtime is found": torch's CUDA build on a CPU run, on importing DeepSpeed
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)


def _default_rendezvous(env: ProcessEnv) -> None:
    """MASTER_ADDR/PORT for SLURM (first host of the job) or a lone process (loopback)."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        os.environ["MASTER_ADDR"] = _first_host(nodes) if nodes else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", 0))
        os.environ["MASTER_PORT"] = str(20000 + job % 20000) if job else str(free_ports(1)[0])
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))


def _first_host(nodelist: str) -> str:
    """The address of the job's first node: its SLURM NodeAddr (which may differ from its
    name, and is what the other nodes can reach), else its name."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    first = out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else nodelist.split(",")[0]
    node = subprocess.run(["scontrol", "show", "node", first, "-o"], capture_output=True, text=True)
    match = re.search(r"\bNodeAddr=(\S+)", node.stdout) if node.returncode == 0 else None
    return match.group(1) if match else first


def device() -> torch.device:
    """Where this process computes (set by :func:`select_device`): its GPU, or the CPU."""
    return _DEVICE


def _multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_group_device(t: torch.Tensor) -> torch.Tensor:
    """A private copy of ``t`` where the process group can carry it (NCCL: the GPU only).
    Every collective below passes its tensor through here."""
    return t.detach().to(device(), copy=True).contiguous()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a small float tensor over ranks (for logging); on :func:`device`."""
    if not _multi_process():
        return values
    t = _on_group_device(values)
    dist.all_reduce(t)
    return t / dist.get_world_size()


def all_gather_flat(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor (equal sizes) in rank order; on :func:`device`."""
    if not _multi_process():
        return local
    t = _on_group_device(local)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on some rank (e.g. a rank without a checkpoint)."""
    return bool(max_over_ranks(int(flag)))


def max_over_ranks(value: int) -> int:
    """The largest of every rank's small integer (e.g. why to stop: a preemption outranks Ctrl-C)."""
    return max_each_over_ranks([value])[0]


def max_each_over_ranks(values: list[int]) -> list[int]:
    """Elementwise largest of every rank's few small integers, in one collective (e.g. why to
    stop, and whether a timed checkpoint is due: any rank's clock decides for all)."""
    if not _multi_process():
        return list(values)
    t = _on_group_device(torch.tensor([float(v) for v in values]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def all_reduce_sum(values: "np.ndarray") -> "np.ndarray":
    """Elementwise float64 sum of a numpy vector over ranks (gloo and NCCL both carry f64)."""
    import numpy as np

    if not _multi_process():
        return values
    t = _on_group_device(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)))
    dist.all_reduce(t)
    return t.cpu().numpy()
