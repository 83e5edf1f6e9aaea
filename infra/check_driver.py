"""Refuse to start a container whose host NVIDIA driver is too old for torch's CUDA.

infra/entrypoint.sh runs this first. On such a host torch sees no GPU, and with
``runtime.device: auto`` a run would train on the CPU, saying so in one log line; the
container stops instead, with one line naming the driver and the fix. A host without an
NVIDIA driver (a CPU node, the Ray head) passes: it has nothing to be too old.

    python infra/check_driver.py     # exit 0: fine or no driver; exit 2: one line on stderr
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

# The oldest Linux driver each CUDA major runs on (NVIDIA's minor-version compatibility:
# any 12.x needs >= 525, any 13.x >= 580). A newer major than these is not judged here.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def driver_problem(driver: str | None, cuda: str | None, torch_version: str = "") -> str | None:
    """One line when ``driver`` (e.g. "535.104.05") is too old for ``cuda`` (e.g. "13.0");
    None when it is new enough, absent, unparsable, or torch is a CPU build."""
    if not driver or not cuda:
        return None
    try:
        major, driver_major = int(cuda.split(".")[0]), int(driver.split(".")[0])
    except ValueError:
        return None
    needed = MIN_DRIVER.get(major)
    if needed is None or driver_major >= needed:
        return None
    torch_name = f"torch {torch_version}" if torch_version else "torch"
    return (f"error: NVIDIA driver {driver} is too old for {torch_name}, built for CUDA {cuda} "
            f"(needs driver >= {needed}); on it torch sees no GPU. Use a host image (AMI) with driver "
            f">= {needed}, or build infra/Dockerfile with a torch and CUDA_IMAGE for your driver")


def nvidia_driver() -> str | None:
    """The host's NVIDIA driver version (None without one), as the runtime reads it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install
    from dist_diffusion.runtime.distributed import nvidia_driver as probe

    return probe()


def torch_build() -> tuple[str, str | None]:
    """(torch's version, the CUDA it is built for; None for a CPU build)."""
    import torch

    return torch.__version__, torch.version.cuda


def main(probe: Callable[[], str | None] = nvidia_driver,
         build: Callable[[], tuple[str, str | None]] = torch_build) -> int:
    """Exit status for the entry point; ``probe`` and ``build`` are injectable for tests."""
    driver = probe()
    if driver is None:
        return 0  # a CPU node or the head: nothing to be too old
    torch_version, cuda = build()
    problem = driver_problem(driver, cuda, torch_version)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
