"""First contact with a file nobody vouches for: open it only if it is a regular file, and
read a zip's own claim of its directory size before :mod:`zipfile` acts on it.

Opening a FIFO blocks until a writer appears, and opening a device can have effects of its
own, so the path is checked with ``stat`` before it is opened; it is opened non-blocking and
checked again on the descriptor, so nothing swapped in between can hang the read. Each caller
(checkpoints, VecNormalize statistics, a sweep's run folder) words the refusal its own way.
"""

from __future__ import annotations

import os
import stat
import zipfile
from typing import BinaryIO

__all__ = ["FileTooLarge", "NotRegularFile", "declared_zip_directory", "open_regular"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(Exception):
    """The path is not a regular file; ``kind`` says what it is (``"a FIFO"``)."""

    def __init__(self, mode: int) -> None:
        self.kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        super().__init__(f"is {self.kind}, not a regular file")


class FileTooLarge(Exception):
    """The file holds more than the caller allows."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"is {size:,} bytes, more than the {limit:,} it may take")


def open_regular(path: str | os.PathLike[str], limit: int | None = None) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file of at most ``limit`` bytes.

    :raises NotRegularFile: a directory, FIFO, device or socket (checked before opening and
        again on what was opened)
    :raises FileTooLarge: larger than ``limit``
    :raises OSError: missing or unreadable
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    handle = os.fdopen(fd, "rb")
    try:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(info.st_mode)
        if limit is not None and info.st_size > limit:
            raise FileTooLarge(info.st_size, limit)
    except BaseException:
        handle.close()
        raise
    return handle


def declared_zip_directory(fileobj: BinaryIO) -> tuple[int, int] | None:
    """The member count and central-directory size a zip's end record declares, as
    :mod:`zipfile` finds that record (zip64 included); the stream is rewound afterwards.

    ``zipfile`` parses as many entries as the declared *size* holds, whatever count it gives,
    and builds an object per entry: a caller bounds both before opening the zip.

    :return: ``(count, size)``, or None when there is no readable end record (``zipfile``
        then reports the damage itself) or this Python's ``zipfile`` lacks its helpers
    """
    end_record = getattr(zipfile, "_EndRecData", None)
    count_index = getattr(zipfile, "_ECD_ENTRIES_TOTAL", None)
    size_index = getattr(zipfile, "_ECD_SIZE", None)
    if end_record is None or count_index is None or size_index is None:
        return None
    try:
        record = end_record(fileobj)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        record = None
    finally:
        fileobj.seek(0)
    return (record[count_index], record[size_index]) if record else None
