"""The failures a user causes and can fix, for every entry point (CLI, launchers) to turn
into one `error:` line instead of a traceback."""

from __future__ import annotations


def expected() -> tuple[type, ...]:
    """Each of these carries a message that names the key, file or URL, and the fix."""
    from .config import ConfigError
    from .data.prepare import PrepareError
    from .data.storage import StorageError
    from .data.shards import DataError  # torch-free: a bad-input answer does not wait for torch

    return ConfigError, StorageError, PrepareError, DataError


def one_line(err: Exception) -> str:
    """The message of ``err``. Re-raised from a DataLoader worker, it carries the worker's
    traceback; its last line is the original message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(("dist_diffusion.", type(err).__name__)) else last
