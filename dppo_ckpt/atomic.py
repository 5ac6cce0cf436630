"""Crash-safe file writes: a path is always absent, its old content, or the complete new one.

Torch-free, so that the light command paths (``verify --static`` with ``--output``) can use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

#: Suffix of the temporary files, named ``.<final name>.<random><TEMP_SUFFIX>`` beside the
#: target; a writer killed mid-way leaves only such a file behind.
TEMP_SUFFIX = ".tmp"


def fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (silently skipped where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, or the one a plain ``open()`` would give."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder."""
    folder = path.parent if str(path.parent) else Path(".")
    mode = _file_mode(path)
    fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        # mkstemp creates the file private (0600).
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    fsync_directory(folder)
