"""Where a run writes: checked before anything loads, and a full disk told in one line.

A run that cannot write its ``output_dir`` should say so before minutes of model
loading, naming the path and the reason, not with a traceback from deep inside a save.
The plan checks without writing anything (``--dry-run`` changes nothing on disk); the
pipelines then create the directory and write and remove a probe file in it, which
also catches what a permission check cannot see.  A disk that fills up during a save
surfaces as an ``OSError`` (``ENOSPC``) or, from ``torch.save``, as a ``RuntimeError``
about an "unexpected pos"; :func:`disk_full_error` turns either into one line.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from vistune.errors import VistuneError

#: errno values a write gets when the disk, or the user's quota on it, is full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: What the errors of a full disk say when they carry no errno: torch.save's zip writer notices a short write
#: only as an "unexpected pos", safetensors and others quote the OS's message.
DISK_FULL_TEXTS = ("No space left on device", "unexpected pos", "StorageFull", "Disk quota exceeded")
PROBE_PREFIX = ".vistune-write-probe-"


def _existing_ancestor(directory: Path) -> Path:
    """``directory`` itself or its nearest ancestor that exists (as a file or a directory)."""
    path = directory
    while True:
        try:
            if path.exists() or path.is_symlink():
                return path
        except OSError:  # an ancestor that cannot be searched: it is the one to report
            return path
        if path.parent == path:
            return path
        path = path.parent


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def unwritable_reason(directory: str | Path) -> str | None:
    """Why ``directory`` could not be created or written to, found without writing anything; None when it can.

    Used by the plan, so that ``--dry-run`` reports it along with every other problem.
    """
    directory = Path(directory).expanduser().absolute()
    existing = _existing_ancestor(directory)
    if not existing.is_dir():
        if existing == directory:
            return f"{directory} is a file, not a directory"
        return f"{existing} is a file, so {directory} cannot be created under it"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    why = "is on a read-only file system" if _read_only(existing) else "is not writable (permission denied)"
    return f"{existing} {why}" + ("" if existing == directory else f", so {directory} cannot be created")


def prepare_output_dir(directory: str | Path, where: str = "output_dir") -> Path:
    """Create ``directory`` and prove it writable by writing and removing a probe file in it.

    :param where: what names the path in the message (``run.yaml:7: output_dir``).
    :raises VistuneError: one line naming the path and the operating system's reason.
    """
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise VistuneError(f"{where}: cannot write to {directory}: {_os_reason(exc, directory)}") from None
    return directory


def _os_reason(exc: OSError, directory: Path) -> str:
    """The operating system's reason for a failed write, naming the path at fault."""
    if isinstance(exc, FileExistsError) or exc.errno == errno.ENOTDIR:
        reason = unwritable_reason(directory)  # mkdir met a file where a directory was needed: say which
        if reason:
            return reason
    text = exc.strerror or str(exc)
    # an ancestor that mkdir could not create is worth naming; the directory itself or its probe file are not
    culprit = Path(exc.filename) if exc.filename else None
    if culprit is None or directory in (culprit, culprit.parent):
        return text
    return f"{text} ({culprit})"


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, is how a full disk shows while writing."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, path: str | Path, what: str, outcome: str = "") -> VistuneError | None:
    """One line for a save that ran out of disk space; None for other errors.

    :param what: what was being saved (``checkpoint-40``); ``path`` is where.
    :param outcome: what the failed save left behind, for the user's next step.
    """
    if not is_disk_full(exc):
        return None
    return VistuneError(f"No space left on device while saving {what} to {path}" + (f"; {outcome}" if outcome else ""))
