"""Logging: every line the library writes is a record of ``logging.getLogger("dist_diffusion.<part>")``.

By default the ``dist_diffusion`` logger writes its records to stdout as ``[part]
message`` lines, through tqdm so progress bars stay whole (what Ray's and SLURM's job
logs capture), and does not propagate them. The level is ``DIST_DIFFUSION_LOG_LEVEL``
(default INFO; set it through Ray's ``runtime_env`` or SLURM's environment) or
``logging.getLogger("dist_diffusion").setLevel``. An application with its own handlers
calls :func:`route_to_application`: the default lines stop and the records propagate (the
same pattern as transformers' and diffusers' loggers).
"""

from __future__ import annotations

import functools
import logging
import os
import sys

ROOT = "dist_diffusion"


class _LineFormatter(logging.Formatter):
    """``[train] message``: the last part of the logger's name, then the message."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.name.rsplit('.', 1)[-1]}] {record.getMessage()}"


class _DefaultLines(logging.Handler):
    """One line on stdout per record, above any progress bar; stdout is looked up at each
    record, so captured or redirected streams work."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


def get_logger(part: str) -> logging.Logger:
    """``dist_diffusion.<part>``; the first call sets up the ``dist_diffusion`` logger."""
    _package_logger()
    return logging.getLogger(f"{ROOT}.{part}")


def route_to_application() -> None:
    """Hand the records to the application's handlers: no default lines, propagation on."""
    package = _package_logger()
    package.handlers = [h for h in package.handlers if not isinstance(h, _DefaultLines)]
    package.propagate = True


@functools.cache
def _package_logger() -> logging.Logger:
    package = logging.getLogger(ROOT)
    package.setLevel(os.environ.get("DIST_DIFFUSION_LOG_LEVEL", "INFO").upper())
    handler = _DefaultLines()
    handler.setFormatter(_LineFormatter())
    package.addHandler(handler)
    package.propagate = False
    return package
