"""Read an ``.npz`` of plain numeric arrays from a file nobody vouches for, within a byte budget.

VecNormalize's statistics beside a checkpoint are such a file (:mod:`dppo_ckpt.envs`). Handing
it to ``np.load`` would trust it too far: opening a FIFO blocks until a writer appears, a
member may inflate far beyond the file's size, and an array header may declare a shape whose
allocation alone exhausts memory. So the file is checked in three steps, each before the next
one costs anything:

1. the path is a regular file no larger than the budget (``stat``, before it is opened);
2. the zip directory declares few members, stored or deflated, whose uncompressed sizes add
   up to no more than the budget (before any member is inflated);
3. each member's ``.npy`` header declares real numbers (no object arrays: those would need
   pickle) of exactly the size the member holds (before the array is allocated).

What fails a check is refused with :class:`NpzRefused`. A file that passes the checks but is
damaged (CRC, truncated, not an ``.npy``) raises :class:`ValueError`. Numpy is imported by the
functions that use it, never at the top.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dppo_ckpt._untrusted_files import (
    FileTooLarge,
    NotRegularFile,
    declared_zip_directory,
    open_regular,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["NpzRefused", "read_arrays", "read_regular_file"]

# np.savez writes one member per array; VecNormalize's statistics are three per observation
# key and four more.
_MAX_MEMBERS = 1024
# Bytes of zip directory per member: its fixed fields, a name and the zip64 extra field.
_DIRECTORY_BYTES_PER_MEMBER = 46 + 1024
# An .npy header is at most 10 bytes of magic, version and length, and numpy's 10,000
# characters of dictionary.
_MAX_NPY_HEADER_BYTES = 16 * 1024
# Real numbers: what VecNormalize computes with. Anything else is not its statistics.
_NUMBER_KINDS = "fiu"
class NpzRefused(Exception):
    """The file is refused before it is read: reading it could hang, exhaust memory or need
    pickle. The message is one line saying why."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, read only when it is a regular file of at most ``limit`` bytes
    (:func:`~dppo_ckpt._untrusted_files.open_regular`: checked before it is opened, and again
    on what was opened, so a file swapped in between cannot make the read hang).

    :raises NpzRefused: not a regular file, or larger than ``limit``
    :raises OSError: missing (:class:`FileNotFoundError`) or unreadable
    """
    try:
        with open_regular(path, limit) as handle:
            data = handle.read(limit + 1)
    except (NotRegularFile, FileTooLarge) as exc:
        raise NpzRefused(str(exc)) from None
    if len(data) > limit:  # it grew after the check
        raise NpzRefused(f"is more than the {limit:,} bytes it may take")
    return data


def _check_directory(stream: io.BytesIO) -> None:
    """Refuse a zip directory too large for this many members before ``zipfile`` parses it;
    without a readable end record, zipfile reports the damage and the member count is
    checked after parsing."""
    declared = declared_zip_directory(stream)
    if declared is None:
        return
    count, size = declared
    if count > _MAX_MEMBERS:
        raise NpzRefused(f"declares {count:,} members, more than {_MAX_MEMBERS:,}")
    if size > _MAX_MEMBERS * _DIRECTORY_BYTES_PER_MEMBER:
        raise NpzRefused(f"has a zip directory of {size:,} bytes")


def _check_members(infos: list[zipfile.ZipInfo], limit: int) -> None:
    """Refuse members that would inflate beyond ``limit`` in total, before any is inflated.

    ``zipfile`` never yields more of a member than its declared size, so the declared sizes
    bound what reading can cost.
    """
    if len(infos) > _MAX_MEMBERS:
        raise NpzRefused(f"holds {len(infos):,} members, more than {_MAX_MEMBERS:,}")
    total = 0
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and lzma allocate what their own headers ask for.
            raise NpzRefused(
                f"member {info.filename!r} uses compression method {info.compress_type} "
                "(statistics are stored or deflated)"
            )
        total += info.file_size
        if total > limit:
            raise NpzRefused(
                f"member {info.filename!r} brings the uncompressed size to {total:,} bytes, "
                f"more than the {limit:,} it may take"
            )


def _parse_header(head: bytes, member: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and header length of the ``.npy`` that ``head`` starts."""
    from numpy.lib import format as npy_format

    stream = io.BytesIO(head)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]}")
    except Exception as exc:  # numpy raises several kinds for a header it cannot parse
        text = str(exc).strip().splitlines()
        raise ValueError(f"{member} is not an .npy array ({text[0] if text else exc!r})") from None
    return tuple(shape), bool(fortran), dtype, stream.tell()


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    import numpy as np

    name = info.filename.removesuffix(".npy")
    with archive.open(info) as stream:
        head = stream.read(min(info.file_size, _MAX_NPY_HEADER_BYTES))
        shape, fortran, dtype, offset = _parse_header(head, repr(info.filename))
        if dtype.hasobject:
            raise NpzRefused(
                f"array {name!r} holds Python objects ({dtype}): reading them would need pickle"
            )
        if dtype.kind not in _NUMBER_KINDS or dtype.subdtype is not None:
            raise NpzRefused(f"array {name!r} holds {dtype} values, not numbers")
        if any(extent < 0 for extent in shape):
            raise ValueError(f"array {name!r} has shape {shape}")
        declared = math.prod(shape) * dtype.itemsize
        held = info.file_size - offset
        if declared > held:
            raise NpzRefused(
                f"array {name!r} declares shape {shape} of {dtype} ({declared:,} bytes), "
                f"but its member holds {held:,}"
            )
        if declared < held:
            raise ValueError(f"array {name!r} is followed by {held - declared:,} stray bytes")
        body = head[offset:] + stream.read(declared - (len(head) - offset))
        if len(body) != declared or stream.read(1):  # read to its end: zipfile checks the CRC
            raise ValueError(f"array {name!r} is truncated")
    array = np.frombuffer(body, dtype=dtype)
    # As numpy reads them: a Fortran-ordered array is the transpose of the reversed shape.
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def read_arrays(data: bytes, limit: int) -> dict[str, Any]:
    """The arrays of an ``.npz`` held in ``data``, by name (without ``.npy``), read-only.

    :param limit: the most bytes the file and its arrays may take, each
    :raises NpzRefused: over ``limit``, too many members, another compression, an array
        that is not numbers or declares more than its member holds
    :raises ValueError: not a zip of ``.npy`` members, or damaged
    """
    if len(data) > limit:
        raise NpzRefused(f"is {len(data):,} bytes, more than the {limit:,} it may take")
    stream = io.BytesIO(data)
    _check_directory(stream)
    try:
        archive = zipfile.ZipFile(stream)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not an .npz ({exc})") from None
    except (OSError, EOFError, ValueError, NotImplementedError, OverflowError) as exc:
        raise ValueError(f"damaged zip archive ({exc})") from None
    with archive:
        infos = archive.infolist()
        _check_members(infos, limit)
        arrays: dict[str, Any] = {}
        for info in infos:
            name = info.filename.removesuffix(".npy")
            if name == info.filename or name in arrays:
                raise ValueError(f"member {info.filename!r} is not one array of an .npz")
            if info.flag_bits & 0x1:
                raise ValueError(f"member {info.filename!r} is encrypted")
            if info.flag_bits & (0x20 | 0x40):
                raise ValueError(f"member {info.filename!r} uses a zip feature not supported")
            try:
                arrays[name] = _read_member(archive, info)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                    RuntimeError) as exc:  # fmt: skip
                raise ValueError(f"member {info.filename!r} is damaged ({exc})") from None
    return arrays
