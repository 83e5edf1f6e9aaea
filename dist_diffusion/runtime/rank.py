"""One rank's work, ended the way every command line promises: the result, or a failure the
user can act on as one `error:` line and an exit code. The CLI's ranks and the rank entry
point that torchrun and srun start (``python -m dist_diffusion.train``) both end here."""

from __future__ import annotations

import sys
from typing import Callable

from ..errors import TrainingStopped, expected, one_line
from .distributed import RendezvousFailed, as_communication_failed, as_peer_lost, shutdown


def run_rank(work: Callable[[], object]) -> tuple[object, int]:
    """``work()`` in this rank, then leave the process group: (its result, 0), or a
    failure the user can act on as one line on stderr and (None, exit code): 2 for bad
    input (config, storage, data, a refused write), 3 for a run that stopped (a NaN, a
    peer that never came or died)."""
    try:
        result = work()
        shutdown()
        return result, 0
    except expected() as err:  # found once the ranks started (e.g. the run directory is in use)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return None, 2
    except (TrainingStopped, RendezvousFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 3
    except RuntimeError as err:
        lost = as_peer_lost(err) or as_communication_failed(err)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        return None, 3
