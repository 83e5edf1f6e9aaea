"""The failures a user causes and can fix, for every entry point (CLI, launchers) to turn
into one `error:` line instead of a traceback."""

from __future__ import annotations

import errno
from pathlib import Path


class TrainingStopped(RuntimeError):
    """The run stopped cleanly for a reason a person must look at (e.g. a NaN loss)."""


class WriteRefused(OSError):
    """A write the file system refused (full disk, quota, read-only, permissions): one line
    naming the path and the fix; what was complete before stays complete."""


# errno -> (what happened, what to do about it)
_REFUSALS = {
    errno.ENOSPC: ("no space left on the device", "make room there (or point the output elsewhere)"),
    errno.EDQUOT: ("the disk quota is used up", "make room within the quota (or point the output elsewhere)"),
    errno.EROFS: ("the file system is read-only", "choose a writable path"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
}
# How libraries that bypass OSError say the same: torch.save's zip writer (a RuntimeError)
# and safetensors' Rust io::Error (its own exception type).
_TEXT_ERRNOS = (("No space left", errno.ENOSPC), ("StorageFull", errno.ENOSPC), ("code: 28", errno.ENOSPC),
                ("Disk quota exceeded", errno.EDQUOT), ("Read-only file system", errno.EROFS),
                ("ReadOnlyFilesystem", errno.EROFS), ("code: 30", errno.EROFS),
                ("Permission denied", errno.EACCES), ("PermissionDenied", errno.EACCES))


# torch.save's zip writer does not check its writes; a short one surfaces as these.
_SHORT_WRITE = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")
NEARLY_FULL_BYTES = 64 * 2**20  # a short write with less free space than this: the disk filled


def refused_errno(err: BaseException, path: str | Path | None = None) -> int | None:
    """The errno of a refused write anywhere in ``err``'s chain of causes, else None. A
    write that torch cut short without a reason is put down to the file system ``path``
    is on, when it is full or read-only."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _REFUSALS:
            return err.errno
        text = str(err)
        for marker, number in _TEXT_ERRNOS:
            if marker in text:
                return number
        if path is not None and any(marker in text for marker in _SHORT_WRITE):
            return _file_system_state(Path(path))
        err = err.__cause__ or err.__context__
    return None


def _file_system_state(path: Path) -> int | None:
    """ENOSPC or EROFS when the file system holding ``path`` is full or read-only, else None."""
    import os

    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    return errno.ENOSPC if stat.f_bavail * stat.f_frsize < NEARLY_FULL_BYTES else None


def write_refused(err: BaseException, path: str | Path, what: str = "", after: str = "") -> WriteRefused | None:
    """``err`` as one line naming ``path`` when it is a refused write, else None.
    ``what`` names the thing written (e.g. "checkpoint step00000040"); ``after`` adds what
    stays true (e.g. which checkpoint is still the resume point)."""
    number = refused_errno(err, path)
    if number is None:
        return None
    subject = f"writing {what} to {path}" if what else f"writing {path}"
    return WriteRefused(number, f"{subject} failed: {_refusal(number)}{'; ' + after if after else ''}")


def _refusal(number: int) -> str:
    """What happened, its errno name, and what to do: the tail of every refused-write line."""
    happened, fix = _REFUSALS[number]
    return f"{happened} ({errno.errorcode[number]}); {fix}"


def expected() -> tuple[type, ...]:
    """Each of these carries a message that names the key, file or URL, and the fix."""
    from .config import ConfigError
    from .data.prepare import PrepareError
    from .data.storage import StorageError
    from .data.shards import DataError  # torch-free: a bad-input answer does not wait for torch

    return ConfigError, StorageError, PrepareError, DataError, WriteRefused


def one_line(err: BaseException) -> str:
    """The message of ``err``. Re-raised from a DataLoader worker, it carries the worker's
    traceback; its last line is the original message. A refused write anywhere else is
    named with its path (the OSError's own filename)."""
    if isinstance(err, WriteRefused):
        return err.strerror
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(("dist_diffusion.", type(err).__name__)) else last


def as_refused_write(err: BaseException, output: str | None = None) -> WriteRefused | None:
    """A refused write (or read) that reached an entry point unexplained (an export, shards,
    a report): one line naming the file the OSError names (else the command's ``output``),
    or None when ``err`` is something else."""
    number = None if isinstance(err, WriteRefused) else refused_errno(err, getattr(err, "filename", None) or output)
    if number is None:
        return None
    path = getattr(err, "filename", None) or (f"the output, {output}" if output else "the output")
    return WriteRefused(number, f"{path}: {_refusal(number)}")


def failure_line(err: BaseException, output: str | None = None) -> str | None:
    """The one `error:` line of a failure the user can fix (bad input, a refused write; the
    command's ``output`` names the path when the OSError does not), else None: a bug."""
    if isinstance(err, expected()):
        return f"error: {one_line(err)}"
    refused = as_refused_write(err, output)
    return f"error: {one_line(refused)}" if refused is not None else None
