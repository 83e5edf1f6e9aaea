"""The command lines every entry point shares: ``CONFIG [key=value ...]`` for the rank
entry points that torchrun, srun and `ray job submit` start, and an argparse parser whose
complaint is the one `error:` line every command ends with. Torch-free."""

from __future__ import annotations

import argparse
import sys

from .. import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its complaint as the one `error:` line every command ends with."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def recipe_arguments(prog: str, description: str, argv: list[str] | None = None) -> tuple[str, list[str]]:
    """(config path, overrides) for the entry points that torchrun, srun and `ray job submit`
    start: ``CONFIG [key=value ...]`` or ``--config CONFIG [key=value ...]``, the shape of
    every `dist-diffusion` command. ``--help`` exits 0; a missing recipe is one line, exit 2."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dist-diffusion {__version__}")
    parser.add_argument("--config", help="YAML recipe, e.g. configs/tiny.yaml (or as the first argument)")
    parser.add_argument("rest", nargs="*", metavar="key=value", help="overrides, e.g. train.max_steps=20")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    positional = [a for a in args.rest if "=" not in a]
    if len(positional) > 1 or (positional and args.config):
        parser.error(f"one recipe, not {positional if not args.config else [args.config, *positional]}; "
                     f"overrides are key=value")
    config = args.config or (positional[0] if positional else None)
    if config is None:
        parser.error("no recipe: pass --config CONFIG (e.g. configs/tiny.yaml)")
    return config, [a for a in args.rest if "=" in a]
