"""``python -m dist_diffusion.train CONFIG [key=value ...]``: one training rank, as torchrun,
srun or a container starts it (the rank, world and rendezvous come from their environment).
For a local run: `dist-diffusion train --nproc N`. It imports nothing above the training job:
the recipe's command line, the config, and the rank's one-line ending are below it."""

from __future__ import annotations

import sys
from functools import partial

from ..config import load_config
from ..config.command_line import recipe_arguments
from ..errors import failure_line

DESCRIPTION = ("One training rank, as torchrun or srun start it (the rank, world and rendezvous come from their "
               "environment). For a local run: dist-diffusion train --nproc N.")


def main(argv: list[str] | None = None) -> int:
    """Load the recipe, then train this rank; ``build_run`` runs the same preflight as every
    launcher (the objective's own rules, the run directory, the shards) before any step."""
    config, overrides = recipe_arguments("python -m dist_diffusion.train", DESCRIPTION, argv)
    try:
        cfg = load_config(config, overrides)
        from ..runtime.rank import run_rank
        from .loop import train

        return run_rank(partial(train, cfg))[1]
    except Exception as err:
        line = failure_line(err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
