"""Open a stable-baselines3 checkpoint zip as untrusted input, within explicit limits.

An SB3 checkpoint is a zip holding

- ``data``: JSON of the algorithm's attributes; attributes that are not JSON-serialisable are
  stored as ``{":type:": ..., ":serialized:": base64(cloudpickle bytes)}``;
- ``policy.pth``, ``policy.optimizer.pth``, ``pytorch_variables.pth``: ``torch.save`` archives,
  themselves zips (``<prefix>/data.pkl``, ``<prefix>/data/0``, ``<prefix>/byteorder``, ...);
- ``_stable_baselines3_version`` and ``system_info.txt``: text;
- ``dppo_ckpt.json``: this package's own plain-JSON record (see :mod:`.metadata`), optional.

This module reads all of that without importing torch and without executing any pickle. It
refuses malformed or hostile zips (path traversal, duplicate names, zip bombs, corruption)
with an :class:`ArchiveError` carrying a one-line reason. Sizes declared in the zip headers
are checked up front *and* every read is streamed through a counting reader, so a header that
lies cannot make a read exceed the limits.
"""

from __future__ import annotations

import binascii
import copy
import io
import json
import os
import posixpath
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from dppo_ckpt._base64 import decode_strict
from dppo_ckpt._untrusted_files import (
    FileTooLarge,
    NotRegularFile,
    declared_zip_directory,
    open_regular,
)
from dppo_ckpt.checkpoint.data_outline import DataOutline, outline_data
from dppo_ckpt.checkpoint.metadata import (
    MAX_METADATA_BYTES,
    METADATA_MEMBER,
    MetadataError,
    parse_metadata,
)

__all__ = [
    "DATA_MEMBER",
    "SERIALIZED_KEY",
    "ArchiveError",
    "CheckpointArchive",
    "CheckpointError",
    "Limits",
    "MemberInfo",
    "ZipMembers",
    "is_zip_bytes",
    "open_checkpoint",
    "open_torch_archive",
    "read_checkpoint_bytes",
    "torch_archive_pickles",
    "torch_data_pkl_name",
]

_KiB = 1024
_MiB = 1024 * _KiB
_GiB = 1024 * _MiB

#: Name of the JSON member holding the algorithm's attributes.
DATA_MEMBER = "data"
#: Key SB3 uses for base64-encoded cloudpickle payloads inside ``data``.
SERIALIZED_KEY = ":serialized:"

_ZIP_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_ZIP_EMPTY_ARCHIVE_MAGIC = b"PK\x05\x06"
_SUPPORTED_COMPRESSION = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflated",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# Spool inner torch archives in memory up to this size, on disk beyond it.
_SPOOL_MAX_MEMORY = 64 * _MiB
_CHUNK = 1 * _MiB
# The buffer of the CRC pass over a stored member (one per check, reused). Larger ones measured
# no faster: the pass is bound by crc32 itself (some 4 GB/s), and they cost memory.
_CRC_CHUNK = _CHUNK
# Stored bytes above which the CRC pass of check_members runs on two threads.
_PARALLEL_CRC_BYTES = 32 * _MiB
_LOCAL_HEADER_SIZE = 30
_UTF8_NAME_FLAG = 0x800
# Encrypted (bit 0), compressed patched data (bit 5), strong encryption (bit 6): such members
# go through zipfile, which refuses them with its own reason.
_FLAGS_ZIPFILE_REFUSES = 0x1 | 0x20 | 0x40
#: Bytes a central-directory entry may take on average: 46 fixed, then the name, extra field
#: and comment. SB3 and torch write names of a few dozen characters and no comments.
_MAX_DIRECTORY_ENTRY = 1024


class CheckpointError(Exception):
    """Base class of every error raised for a checkpoint that cannot be used as given.

    :param reason: one line saying what is wrong with the input (no traceback needed).
    """

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(str(reason).split())
        super().__init__(self.reason)


class ArchiveError(CheckpointError):
    """The file is not a usable checkpoint zip: missing, unreadable, not a zip, truncated,
    corrupt (CRC), over a limit, hostile member names, or bad ``data`` JSON / base64.

    Commands map it to exit code 2 ("the input could not be used").

    :param reason: one line saying what is wrong.
    :param path: the file concerned, when known; prefixed to the message.
    :param member: the zip member concerned, when there is one.
    """

    def __init__(self, reason: str, *, path: str | None = None, member: str | None = None) -> None:
        self.path = path
        self.member = member
        super().__init__(reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class BudgetExceeded(ArchiveError):
    """A file needs more than one of its budgets allows (exit code 2).

    :param budget: the budget's name (``max_memory``, ``timeout``, ...).
    :param reason: what would have exceeded it.
    """

    def __init__(self, budget: str, reason: str, *, path: str | None = None) -> None:
        self.budget = budget
        super().__init__(f"budget {budget} exceeded: {reason}", path=path)


class _Tally:
    """Decompressed bytes over a checkpoint and every archive nested in it.

    Each member counts once, by its place in the nesting, however often it is re-read.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._seen: set[tuple[str, str]] = set()

    def add(self, label: str, member: str, size: int) -> None:
        if (label, member) in self._seen:
            return
        self._seen.add((label, member))
        self.total += size
        if self.total > self.limit:
            raise BudgetExceeded(
                "max_decompressed",
                f"the file and the archives nested in it inflate to more than {self.limit} bytes",
                path=label,
            )


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every zip read, the checkpoint and the ``.pth`` zips in it.

    The defaults admit a policy of a few hundred MB (its Adam state is twice that) and refuse
    zip bombs: SB3 stores members uncompressed, so a high compression ratio on a large member
    means the file was built to inflate.

    :param max_members: most members one zip may hold (SB3 writes 6; a torch archive holds
        one member per tensor storage plus a handful of records).
    :param max_member_bytes: largest uncompressed size of a single member.
    :param max_total_bytes: largest sum of uncompressed member sizes of one zip.
    :param max_compression_ratio: largest uncompressed/compressed ratio of a member, checked
        for members of every size.
    :param ratio_floor_bytes: bytes a member may inflate beyond that ratio (a small JSON or
        zero-filled record compresses arbitrarily well, and bounded slack cannot bomb
        anything: nested archives share :attr:`max_decompressed_bytes`).
    :param max_file_bytes: largest checkpoint file accepted (``safe_load`` reads it whole).
    :param max_decompressed_bytes: decompressed bytes over the checkpoint and every archive
        nested in it (``.pth`` members, tensor blobs), each member counted once.
    """

    max_members: int = 4096
    max_member_bytes: int = 1 * _GiB
    max_total_bytes: int = 2 * _GiB
    max_compression_ratio: float = 100.0
    ratio_floor_bytes: int = 64 * 1024
    max_file_bytes: int = 2 * _GiB
    max_decompressed_bytes: int = 4 * _GiB

    def __post_init__(self) -> None:
        for name in (
            "max_members",
            "max_member_bytes",
            "max_total_bytes",
            "max_compression_ratio",
            "max_file_bytes",
            "max_decompressed_bytes",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")
        if self.ratio_floor_bytes < 0:
            raise ValueError("Limits.ratio_floor_bytes must be >= 0")


@dataclass(frozen=True)
class MemberInfo:
    """One zip member as declared by the central directory (sizes are not trusted for reads).

    :param name: member name.
    :param compressed_size: declared compressed size in bytes.
    :param uncompressed_size: declared uncompressed size in bytes.
    :param compress_type: zip compression method number (0 stored, 8 deflated, ...).
    :param crc: declared CRC-32 of the uncompressed data.
    """

    name: str
    compressed_size: int
    uncompressed_size: int
    compress_type: int
    crc: int

    @property
    def compression(self) -> str:
        """Human name of the compression method."""
        return _SUPPORTED_COMPRESSION.get(self.compress_type, f"method {self.compress_type}")

    @property
    def ratio(self) -> float:
        """Declared uncompressed/compressed size ratio."""
        return self.uncompressed_size / max(self.compressed_size, 1)


def _check_member_name(raw_name: str, name: str, label: str) -> None:
    """Refuse names that could escape an extraction directory or mean different files to
    different zip readers."""
    if not name:
        raise ArchiveError("member with an empty name", path=label)
    if raw_name != name or any(ord(ch) < 0x20 for ch in raw_name):
        raise ArchiveError(f"member name {raw_name!r} contains control characters", path=label)
    if "\\" in name:
        raise ArchiveError(f"member name {name!r} contains a backslash", path=label, member=name)
    if name.startswith("/"):
        raise ArchiveError(f"member name {name!r} is an absolute path", path=label, member=name)
    if _DRIVE_LETTER.match(name):
        raise ArchiveError(f"member name {name!r} has a drive letter", path=label, member=name)
    if ".." in name.split("/"):
        raise ArchiveError(
            f"member name {name!r} contains a '..' component", path=label, member=name
        )


class _BoundedReader(io.RawIOBase):
    """Read one member through a byte counter; never yields more than ``limit`` bytes.

    Zip errors surfacing during the read (CRC mismatch, bad compressed data, short data) are
    turned into :class:`ArchiveError` naming the member.
    """

    def __init__(
        self,
        raw: IO[bytes],
        *,
        limit: int,
        declared: int,
        member: str,
        label: str,
        on_complete: Any = None,
    ):
        super().__init__()
        self._on_complete = on_complete
        self._raw = raw
        self._limit = limit
        self._declared = declared
        self._member = member
        self._label = label
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        # Ask for one byte more than the limit allows so an oversized member is detected.
        want = min(len(view), self._limit + 1 - self._count)
        if want <= 0:
            want = 1
        try:
            chunk = self._raw.read(want)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise self._error(_describe_read_error(exc)) from None
        except RuntimeError as exc:  # encrypted members, lzma/bz2 internals
            raise self._error(f"cannot read member: {exc}") from None
        n = len(chunk)
        self._count += n
        if self._count > self._limit:
            raise self._error(
                f"member inflates beyond {self._limit} bytes "
                f"(declared {self._declared}); refusing to read further"
            )
        if n == 0 and self._count != self._declared:
            raise self._error(
                f"member is {self._count} bytes long but declares {self._declared} (truncated?)"
            )
        if n == 0 and self._on_complete is not None:
            # Read to its end without error: zipfile has checked the CRC.
            self._on_complete()
            self._on_complete = None
        view[:n] = chunk
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()

    def _error(self, reason: str) -> ArchiveError:
        return ArchiveError(
            f"member {self._member!r}: {reason}", path=self._label, member=self._member
        )


def _describe_read_error(exc: BaseException) -> str:
    text = str(exc)
    if "CRC" in text:
        return "CRC mismatch: the file is corrupt"
    if isinstance(exc, zlib.error):
        return f"corrupt compressed data ({text})"
    if isinstance(exc, EOFError):
        return "unexpected end of data: the file is truncated"
    return f"cannot read member: {text or type(exc).__name__}"


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``start`` of a shared file.

    A stored (uncompressed) member is a byte range of the zip itself, so a torch archive
    inside one can be opened in place: only what is read of it is read, and nothing is
    copied or buffered beyond the reader's own chunks. The file's position is set before
    every read, as :mod:`zipfile` does for the file it shares.
    """

    def __init__(self, fileobj: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._file = fileobj
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        if want == 0:
            return 0
        self._file.seek(self._start + self._pos)
        chunk = self._file.read(want)
        view[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


class ZipMembers:
    """A zip opened with :class:`Limits`: a validated member table and bounded reads.

    Used for the checkpoint itself (:class:`CheckpointArchive`) and for the torch archives
    nested inside it. Construction validates every member name, the member count and the
    declared sizes; reads are bounded and surface CRC errors.

    :param fileobj: a seekable binary file holding the zip.
    :param limits: limits to enforce.
    :param label: name used in error messages (the path, or ``outer.zip:policy.pth``).
    :param owns_file: close ``fileobj`` on :meth:`close`.
    :param tally: the decompressed-bytes count of the enclosing checkpoint, for a nested
        archive (a new one is started otherwise).
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        limits: Limits,
        label: str,
        *,
        owns_file: bool = False,
        tally: _Tally | None = None,
    ) -> None:
        self.limits = limits
        self.label = label
        self.tally = tally if tally is not None else _Tally(limits.max_decompressed_bytes)
        self._fileobj = fileobj
        self._owns_file = owns_file
        # Members read to their end with a good CRC.
        self._checked: set[str] = set()
        self._zip: zipfile.ZipFile | None = None
        try:
            self._zip = _open_zip(fileobj, limits, label)
            self._infos = self._validate(self._zip.infolist())
        except BaseException:
            self.close()
            raise
        self.members: tuple[MemberInfo, ...] = tuple(
            MemberInfo(
                name=info.filename,
                compressed_size=info.compress_size,
                uncompressed_size=info.file_size,
                compress_type=info.compress_type,
                crc=info.CRC,
            )
            for info in self._infos.values()
        )

    def _validate(self, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
        limits, label = self.limits, self.label
        if len(infos) > limits.max_members:
            raise ArchiveError(
                f"{len(infos)} members, more than the limit of {limits.max_members}", path=label
            )
        table: dict[str, zipfile.ZipInfo] = {}
        folded: dict[str, str] = {}
        total = 0
        for info in infos:
            name = info.filename
            _check_member_name(info.orig_filename, name, label)
            if name in table:
                raise ArchiveError(f"duplicate member name {name!r}", path=label, member=name)
            # torch finds records by a lookup that ignores case: two such names would let the
            # loader read a member other than the one scanned.
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                raise ArchiveError(
                    f"member names {other!r} and {name!r} differ only in case",
                    path=label,
                    member=name,
                )
            if info.flag_bits & 0x1:
                raise ArchiveError(f"member {name!r} is encrypted", path=label, member=name)
            if info.compress_type not in _SUPPORTED_COMPRESSION:
                raise ArchiveError(
                    f"member {name!r} uses unsupported compression method {info.compress_type}",
                    path=label,
                    member=name,
                )
            if info.file_size > limits.max_member_bytes:
                raise ArchiveError(
                    f"member {name!r} declares {info.file_size} bytes, more than the limit of "
                    f"{limits.max_member_bytes}",
                    path=label,
                    member=name,
                )
            ratio = info.file_size / max(info.compress_size, 1)
            allowed = limits.max_compression_ratio * info.compress_size + limits.ratio_floor_bytes
            if info.file_size > allowed:
                raise ArchiveError(
                    f"member {name!r} has compression ratio {ratio:.0f}:1, more than the limit "
                    f"of {limits.max_compression_ratio:.0f}:1 (zip bomb?)",
                    path=label,
                    member=name,
                )
            total += info.file_size
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    f"members declare more than {limits.max_total_bytes} bytes in total",
                    path=label,
                )
            table[name] = info
        return table

    # -- member access -------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def names(self) -> tuple[str, ...]:
        """Member names in central-directory order."""
        return tuple(self._infos)

    def member(self, name: str) -> MemberInfo:
        """The :class:`MemberInfo` of ``name`` (:class:`ArchiveError` if absent)."""
        for info in self.members:
            if info.name == name:
                return info
        raise ArchiveError(f"no member {name!r}", path=self.label, member=name)

    def open_member(self, name: str) -> io.BufferedReader:
        """Open ``name`` as a stream that never yields more than the limits allow.

        Reading raises :class:`ArchiveError` on CRC mismatch, corrupt or truncated data.
        """
        info = self._infos.get(name)
        if info is None:
            raise ArchiveError(f"no member {name!r}", path=self.label, member=name)
        if self._zip is None:
            raise ArchiveError("archive is closed", path=self.label)
        try:
            raw = self._zip.open(info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise ArchiveError(
                f"member {name!r}: {_describe_read_error(exc)}", path=self.label, member=name
            ) from None
        except (RuntimeError, NotImplementedError) as exc:
            raise ArchiveError(
                f"member {name!r}: cannot open ({exc})", path=self.label, member=name
            ) from None
        self.tally.add(self.label, name, info.file_size)
        limit = min(info.file_size, self.limits.max_member_bytes)
        reader = _BoundedReader(
            raw, limit=limit, declared=info.file_size, member=name, label=self.label,
            on_complete=lambda: self._checked.add(name),
        )  # fmt: skip
        return io.BufferedReader(reader, buffer_size=_CHUNK)

    def read_member(self, name: str) -> bytes:
        """Read the whole of ``name`` (bounded by the limits, CRC checked).

        A stored member is read straight from the file in one piece, its CRC computed over
        it: no zip reader's chunks, nor a joined copy of them, beside the result (``data``
        of a large layout-1 checkpoint is hundreds of MB).
        """
        start = self._stored_start(name)
        if start is None:
            with self.open_member(name) as stream:
                return stream.read()
        size = self._admit_stored(name)
        self._fileobj.seek(start)
        data = self._fileobj.read(size)
        if len(data) != size:
            raise self._truncated(name)
        self._check_crc(name, zlib.crc32(data))
        return data

    def check_member(self, name: str) -> None:
        """Read ``name`` to its end with bounded buffers, keeping nothing, so that a damaged
        or truncated member is found (CRC mismatch, bad compressed data, lying sizes).

        A stored member is read straight from the file (or memory) into one reused buffer, its CRC
        computed over memoryview slices of it as it goes (no copies, no zip reader in
        between); anything else goes through the bounded inflating reader. A member read
        whole before is not read again.

        :raises ArchiveError: the member is damaged, or breaks a limit.
        """
        if name in self._checked:
            return
        start = self._stored_start(name)
        if start is None:
            with self.open_member(name) as stream:
                while stream.read(_CHUNK):
                    pass
            return
        size = self._admit_stored(name)
        source = _crc_source(self._fileobj)
        crc = _stored_crc(self._fileobj if source is None else source, start, size)
        if crc is None:
            raise self._truncated(name)
        self._check_crc(name, crc)

    def check_members(self, names: Sequence[str]) -> None:
        """:meth:`check_member` of every name, in order; the first damaged one raises.

        Stored members of a file on disk or in memory, when they add up to more than
        :data:`_PARALLEL_CRC_BYTES`, have their CRCs computed two members at a time, in
        threads (with positioned reads from a file): both ``pread`` and ``crc32`` release the
        GIL, so the CRC pass, which bounds ``verify --static`` on large files, runs on two
        cores. Errors come in member order, as one member after the other would give them.

        :raises ArchiveError: a member is damaged, or breaks a limit.
        """
        pending = [name for name in dict.fromkeys(names) if name not in self._checked]
        source = _crc_source(self._fileobj)
        stored = sum(
            self._infos[name].file_size
            for name in pending
            if name in self._infos and self._infos[name].compress_type == zipfile.ZIP_STORED
        )
        if source is None or stored <= _PARALLEL_CRC_BYTES:
            for name in pending:
                self.check_member(name)
            return
        # Imported here: the pre-commit path checks small files and starts no thread.
        from concurrent.futures import ThreadPoolExecutor

        queued: list[tuple[str, Any]] = []

        def settle() -> None:
            # The CRCs of earlier members, in order, before anything about a later one.
            while queued:
                name, crc = queued.pop(0)
                value = crc.result()
                if value is None:
                    raise self._truncated(name)
                self._check_crc(name, value)

        pool = ThreadPoolExecutor(max_workers=2)
        try:
            for name in pending:
                try:
                    start = self._stored_start(name)
                    if start is not None:
                        size = self._admit_stored(name)
                except BaseException:
                    settle()
                    raise
                if start is None:
                    settle()
                    self.check_member(name)
                else:
                    queued.append((name, pool.submit(_stored_crc, source, start, size)))
            settle()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _admit_stored(self, name: str) -> int:
        """Count a stored member about to be read whole against the limits; its size."""
        info = self._infos[name]
        if info.file_size > self.limits.max_member_bytes:
            raise ArchiveError(
                f"member {name!r}: {info.file_size} bytes, more than the limit of "
                f"{self.limits.max_member_bytes}",
                path=self.label,
                member=name,
            )
        self.tally.add(self.label, name, info.file_size)
        return info.file_size

    def _check_crc(self, name: str, crc: int) -> None:
        if crc != self._infos[name].CRC:
            raise ArchiveError(
                f"member {name!r}: CRC mismatch: the file is corrupt", path=self.label, member=name
            )
        self._checked.add(name)

    def _truncated(self, name: str) -> ArchiveError:
        return ArchiveError(
            f"member {name!r}: unexpected end of data: the file is truncated",
            path=self.label,
            member=name,
        )

    def _stored_start(self, name: str) -> int | None:
        """Where a stored, unencrypted member's bytes begin in the file (``None`` for any
        other member, which is read through :mod:`zipfile`).

        The local header is checked as :mod:`zipfile` checks it before a read: its
        signature, and the name it gives, which must be the directory's (a reader that
        walks the local headers would otherwise see another member). A stored member's two
        declared sizes must agree, since its bytes are its content.
        """
        info = self._infos.get(name)
        if info is None:
            raise ArchiveError(f"no member {name!r}", path=self.label, member=name)
        if self._fileobj is None:
            raise ArchiveError("archive is closed", path=self.label)
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & _FLAGS_ZIPFILE_REFUSES:
            return None
        self._fileobj.seek(info.header_offset)
        header = self._fileobj.read(_LOCAL_HEADER_SIZE)
        if len(header) != _LOCAL_HEADER_SIZE or header[:4] != _ZIP_LOCAL_HEADER_MAGIC:
            raise ArchiveError(f"member {name!r}: bad local header", path=self.label, member=name)
        (flags,) = struct.unpack_from("<H", header, 6)
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        raw_name = self._fileobj.read(name_len)
        try:
            local_name = raw_name.decode("utf-8" if flags & _UTF8_NAME_FLAG else "cp437")
        except UnicodeDecodeError:
            local_name = None
        if local_name != info.orig_filename:
            raise ArchiveError(
                f"member {name!r}: the local header names it {raw_name!r}",
                path=self.label,
                member=name,
            )
        if info.compress_size != info.file_size:
            raise ArchiveError(
                f"member {name!r} is stored but declares {info.compress_size} bytes in the "
                f"file and {info.file_size} uncompressed",
                path=self.label,
                member=name,
            )
        return info.header_offset + _LOCAL_HEADER_SIZE + name_len + extra_len

    def stored_window(self, name: str) -> BinaryIO | None:
        """A seekable view of a stored member's bytes inside the zip, or ``None`` when the
        member is compressed or encrypted (it must then be inflated to be read).

        The member's CRC is checked first by one streamed read (bounded buffers, nothing
        kept), unless a full read of it already checked it (``verify``'s ``DPPO001``).

        :raises ArchiveError: a CRC mismatch, or a local header that disagrees with the
            directory.
        """
        start = self._stored_start(name)
        if start is None:
            return None
        self.check_member(name)
        size = self._infos[name].file_size
        return io.BufferedReader(_Window(self._fileobj, start, size), _CHUNK)  # type: ignore[return-value,arg-type]

    def spool_member(self, name: str) -> IO[bytes]:
        """Copy ``name`` into a seekable temporary file (memory up to 64 MiB, disk beyond)."""
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX_MEMORY)  # noqa: SIM115
        try:
            with self.open_member(name) as stream:
                while chunk := stream.read(_CHUNK):
                    spool.write(chunk)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool

    def read_raw(self) -> bytes:
        """The whole zip file as bytes, bounded by ``limits.max_file_bytes``: read afresh from
        a file, or, for an archive opened on bytes, those very bytes (not a copy)."""
        if self._fileobj is None:
            raise ArchiveError("archive is closed", path=self.label)
        if isinstance(self._fileobj, _MemoryFile):
            return self._fileobj.data  # within the limit: checked when it was opened
        self._fileobj.seek(0)
        raw = self._fileobj.read(self.limits.max_file_bytes + 1)
        if len(raw) > self.limits.max_file_bytes:
            raise ArchiveError(
                f"more than the limit of {self.limits.max_file_bytes} bytes", path=self.label
            )
        return raw

    def rewritten(self, replacements: dict[str, bytes]) -> bytes:
        """This zip with the members named in ``replacements`` holding new contents; every
        member is read through the bounded reader and written back in the same order, with
        the same header and compression.

        :raises ArchiveError: a member named in ``replacements`` is absent, or a read fails
        """
        missing = sorted(set(replacements) - set(self._infos))
        if missing:
            raise ArchiveError(f"no member {missing[0]!r}", path=self.label, member=missing[0])
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for name, info in self._infos.items():
                data = replacements.get(name)
                if data is None:
                    data = self.read_member(name)
                # A copy: writing fills in the header fields of the new zip.
                target.writestr(copy.copy(info), data)
        return out.getvalue()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the zip and, when owned, the underlying file."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._owns_file and self._fileobj is not None:
            self._fileobj.close()
        self._fileobj = None  # type: ignore[assignment]

    def __enter__(self) -> ZipMembers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_declared_member_count(fileobj: BinaryIO, limits: Limits, label: str) -> None:
    """Refuse an oversized central directory before ``zipfile`` parses all of it.

    ``zipfile`` reads as many entries as the directory's declared *size* holds, whatever
    count the end record gives, and builds an object per entry: so the size is bounded too,
    at ``_MAX_DIRECTORY_ENTRY`` bytes per member the limit allows. Without a readable end
    record, ``zipfile`` reports the damage and the member count is checked after parsing.
    """
    declared = declared_zip_directory(fileobj)
    if declared is None:
        return
    count, size = declared
    if count > limits.max_members:
        raise ArchiveError(
            f"{count} members, more than the limit of {limits.max_members}", path=label
        )
    directory_limit = limits.max_members * _MAX_DIRECTORY_ENTRY
    if size > directory_limit:
        raise ArchiveError(
            f"a central directory of {size} bytes, more than the limit of "
            f"{directory_limit} ({_MAX_DIRECTORY_ENTRY} bytes per member for "
            f"{limits.max_members} members)",
            path=label,
        )


def _check_no_prefix(archive: zipfile.ZipFile, fileobj: BinaryIO, label: str) -> None:
    """Refuse a zip whose central directory is not where its end record says.

    ``zipfile`` takes the difference as bytes prepended to the archive and shifts every
    offset by it; torch's reader takes the offsets as written. Such a file holds two
    archives, one for the scan and another for the loader.
    """
    end_record = getattr(zipfile, "_EndRecData", None)
    index = getattr(zipfile, "_ECD_OFFSET", None)
    if end_record is None or index is None:
        return
    try:
        record = end_record(fileobj)
    finally:
        fileobj.seek(0)
    if record and archive.start_dir != record[index]:
        archive.close()
        raise ArchiveError(
            f"{archive.start_dir - record[index]} bytes before its central directory that "
            "the end record does not account for (two archives in one file?)",
            path=label,
        )


def _open_zip(fileobj: BinaryIO, limits: Limits, label: str) -> zipfile.ZipFile:
    """``zipfile.ZipFile(fileobj)`` with its many failure modes turned into one-line reasons."""
    try:
        fileobj.seek(0)
        head = fileobj.read(4)
        fileobj.seek(0)
    except OSError as exc:
        raise ArchiveError(f"cannot read: {exc.strerror or exc}", path=label) from None
    if not head:
        raise ArchiveError("empty file, not a zip archive", path=label)
    _check_declared_member_count(fileobj, limits, label)
    try:
        archive = zipfile.ZipFile(fileobj)
        _check_no_prefix(archive, fileobj, label)
        return archive
    except zipfile.BadZipFile as exc:
        if head == _ZIP_LOCAL_HEADER_MAGIC:
            raise ArchiveError(f"truncated or damaged zip archive ({exc})", path=label) from None
        raise ArchiveError("not a zip archive", path=label) from None
    except (OSError, EOFError, ValueError, NotImplementedError, OverflowError) as exc:
        raise ArchiveError(f"damaged zip archive ({exc})", path=label) from None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # json.loads would silently keep the last one; a reader that keeps the first
            # would see a different checkpoint.
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


class CheckpointArchive(ZipMembers):
    """A stable-baselines3 checkpoint zip, validated against :class:`Limits`.

    Obtain one with :func:`open_checkpoint`; use it as a context manager so the file is closed.
    Nothing here imports torch or unpickles anything.

    Attributes: ``path`` (the file, or ``"<memory>"``), ``limits``, ``members``
    (:class:`MemberInfo` in central-directory order).
    """

    def __init__(
        self, fileobj: BinaryIO, limits: Limits, path: str, *, owns_file: bool = False
    ) -> None:
        super().__init__(fileobj, limits, path, owns_file=owns_file)
        self.path = path
        self._data: dict[str, Any] | None = None
        self._entries: dict[str, bytes] | None = None
        self._metadata: dict[str, Any] | None = None
        if DATA_MEMBER not in self:
            self.close()
            raise ArchiveError("no 'data' member: not a stable-baselines3 checkpoint", path=path)

    @property
    def data(self) -> dict[str, Any]:
        """The ``data`` member parsed as a JSON object (parsed once, then cached).

        :raises ArchiveError: invalid UTF-8, invalid JSON, duplicate keys, too deeply nested,
            or a top level that is not an object.
        """
        if self._data is None:
            raw = self.read_member(DATA_MEMBER)
            try:
                text = raw.decode("utf-8")
                del raw  # the text replaces it; large checkpoints hold hundreds of MB here
            except UnicodeDecodeError as exc:
                raise ArchiveError(
                    f"'data' is not valid UTF-8 (byte {exc.start})", path=self.path, member="data"
                ) from None
            try:
                parsed = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
            except RecursionError:
                raise ArchiveError(
                    "'data' JSON is nested too deeply", path=self.path, member="data"
                ) from None
            except ValueError as exc:
                raise ArchiveError(
                    f"'data' is not valid JSON ({exc})", path=self.path, member="data"
                ) from None
            if not isinstance(parsed, dict):
                raise ArchiveError(
                    f"'data' must be a JSON object, found {type(parsed).__name__}",
                    path=self.path,
                    member="data",
                )
            self._data = parsed
        return self._data

    def drop_caches(self) -> None:
        """Let go of the parsed ``data`` and the decoded entries (parsed again on demand):
        for a layout-1 file with a large policy they hold the scaler's statistics twice."""
        self._data = None
        self._entries = None

    def detach_payload(self, key: str) -> DataOutline | None:
        """Parse ``data`` leaving out the text of entry ``key``'s large ``:serialized:``
        payload (see :mod:`.data_outline`), for a caller that needs its bytes, not its text.

        Afterwards :attr:`data` holds an empty string in that payload's place and
        :meth:`serialized_entries` its decoded bytes, taken from the member's bytes with no
        copy of the text: a layout-1 file's scaler is then in memory once, decoded, instead
        of as the text, the parsed string and the decoded bytes at once.

        :return: the outline (its text is ``data``'s with the payload a placeholder), or
            ``None`` when ``data`` is parsed already or is not of that shape: nothing has
            changed then, and ``data`` is parsed as usual when asked for.
        :raises ArchiveError: the member cannot be read.
        """
        if self._data is not None:
            return None
        raw = self.read_member(DATA_MEMBER)
        found = outline_data(raw, key, _reject_duplicate_keys)
        del raw  # the payload is decoded; the bytes are the bulk of what is left
        if found is None:
            return None
        self._data = found.data
        entries = self._decode_entries(skip=key)
        entries[key] = found.payload
        self._entries = entries
        return found

    def serialized_entries(self) -> dict[str, bytes]:
        """Base64-decoded ``:serialized:`` payloads of ``data``, by attribute name.

        An entry is serialised exactly when SB3's loader would unpickle it: its value is a
        JSON object with a ``:serialized:`` key.

        Decoded once and cached: the scan, the legacy check and the loader all need them, and
        for a large policy the scaler's statistics make these payloads the bulk of the file.

        :raises ArchiveError: the payload is not a string or not valid base64.
        """
        if self._entries is None:
            self._entries = self._decode_entries()
        return dict(self._entries)

    def decoded_entry(self, key: str) -> bytes | None:
        """Entry ``key``'s payload if :meth:`serialized_entries` decoded it already (else
        ``None``), so that a caller needing one entry does not decode it a second time."""
        return None if self._entries is None else self._entries.get(key)

    def _decode_entries(self, skip: str | None = None) -> dict[str, bytes]:
        entries: dict[str, bytes] = {}
        for key, value in self.data.items():
            if key == skip or not (isinstance(value, dict) and SERIALIZED_KEY in value):
                continue
            encoded = value[SERIALIZED_KEY]
            if not isinstance(encoded, str):
                raise ArchiveError(
                    f"entry {key!r}: ':serialized:' holds {type(encoded).__name__}, not a string",
                    path=self.path,
                    member="data",
                )
            try:
                # From the string itself: an ASCII str is its own buffer, so no encoded copy
                # of it is made (b64decode(validate=True) is this same call).
                entries[key] = decode_strict(encoded)
            except (binascii.Error, ValueError) as exc:
                raise ArchiveError(
                    f"entry {key!r}: ':serialized:' is not valid base64 ({exc})",
                    path=self.path,
                    member="data",
                ) from None
        return entries

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The ``dppo_ckpt.json`` member, validated, or ``None`` when the file has none.

        :raises ArchiveError: the member is larger than a record of this package can be, or
            does not have its shape.
        """
        if METADATA_MEMBER not in self:
            return None
        if self._metadata is None:
            declared = self.member(METADATA_MEMBER).uncompressed_size
            if declared > MAX_METADATA_BYTES:
                raise ArchiveError(
                    f"member {METADATA_MEMBER!r} declares {declared:,} bytes, more than the "
                    f"{MAX_METADATA_BYTES:,} of its format",
                    path=self.path,
                    member=METADATA_MEMBER,
                )
            try:
                self._metadata = parse_metadata(self.read_member(METADATA_MEMBER))
            except MetadataError as exc:
                raise ArchiveError(
                    f"member {METADATA_MEMBER!r}: {exc}", path=self.path, member=METADATA_MEMBER
                ) from None
        return self._metadata

    def text_member(self, name: str) -> str:
        """A text member (``_stable_baselines3_version``, ``system_info.txt``) as UTF-8.

        :raises ArchiveError: missing member or invalid UTF-8.
        """
        raw = self.read_member(name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ArchiveError(
                f"member {name!r} is not valid UTF-8 (byte {exc.start})",
                path=self.path,
                member=name,
            ) from None

    @property
    def sb3_version(self) -> str | None:
        """The SB3 version that wrote the file, or ``None`` when the member is absent."""
        if "_stable_baselines3_version" not in self:
            return None
        return self.text_member("_stable_baselines3_version").strip()

    def pth_members(self) -> tuple[str, ...]:
        """Members SB3's loader passes to ``torch.load``: those whose extension is ``.pth``."""
        return tuple(n for n in self.names() if posixpath.splitext(n)[1] == ".pth")

    def pth_is_zip(self, name: str) -> bool:
        """Whether the ``.pth`` member is a zip-format torch archive (else a legacy stream)."""
        start = self._stored_start(name)
        if start is not None:  # its first bytes, straight from the file
            self._fileobj.seek(start)
            return _is_zip_head(self._fileobj.read(min(4, self.member(name).uncompressed_size)))
        with self.open_member(name) as stream:
            return _is_zip_head(stream.read(4))

    def open_pth(self, name: str) -> ZipMembers:
        """Open the torch archive stored in member ``name`` with the same limits.

        :raises ArchiveError: the member is not a zip, or the inner zip breaks a rule.
        """
        # A stored member (SB3 writes them so) is opened in place; a compressed one is
        # inflated into a spool first.
        spool = self.stored_window(name) or self.spool_member(name)
        return ZipMembers(
            spool,  # type: ignore[arg-type]
            self.limits,
            f"{self.path}:{name}",
            owns_file=True,
            tally=self.tally,
        )

    def pth_pickles(self, name: str) -> dict[str, bytes]:
        """Every pickle (``*.pkl`` member) of the torch archive in ``name``, by inner name.

        ``torch.load`` unpickles ``<prefix>/data.pkl``; the other ``.pkl`` names are returned
        too so that nothing pickled inside goes unscanned.
        """
        with self.open_pth(name) as inner:
            return torch_archive_pickles(inner)

    def pth_data_pkl(self, name: str) -> bytes:
        """The ``data.pkl`` bytes that ``torch.load`` would unpickle from member ``name``.

        Like torch's reader, the record prefix is taken from the first member's directory.
        """
        with self.open_pth(name) as inner:
            return inner.read_member(torch_data_pkl_name(inner))

    def iter_pth(self) -> Iterator[tuple[str, ZipMembers | None]]:
        """Yield ``(name, inner)`` for every ``.pth`` member; ``inner`` is ``None`` for a
        legacy (non-zip) stream. Each inner archive is closed when the next is yielded."""
        for name in self.pth_members():
            if not self.pth_is_zip(name):
                yield name, None
                continue
            with self.open_pth(name) as inner:
                yield name, inner


def _is_zip_head(head: bytes) -> bool:
    return head[:4] in (_ZIP_LOCAL_HEADER_MAGIC, _ZIP_EMPTY_ARCHIVE_MAGIC)


def torch_data_pkl_name(inner: ZipMembers) -> str:
    """Name of the ``data.pkl`` record ``torch.load`` reads from a torch zip archive.

    :raises ArchiveError: the archive has no member in a subdirectory, or no ``data.pkl``.
    """
    names = inner.names()
    if not names or "/" not in names[0]:
        raise ArchiveError(
            "not a torch archive: first record is not in a directory", path=inner.label
        )
    candidate = names[0].split("/", 1)[0] + "/data.pkl"
    # As torch's reader finds it: ignoring case (names differing only in case are refused).
    found = next((n for n in names if n.casefold() == candidate.casefold()), None)
    if found is None:
        raise ArchiveError(f"not a torch archive: no {candidate!r}", path=inner.label)
    return found


def torch_archive_pickles(inner: ZipMembers) -> dict[str, bytes]:
    """Every pickle (``*.pkl`` member) of a torch zip archive, by inner name.

    :raises ArchiveError: the archive is not laid out as ``torch.load`` expects.
    """
    torch_data_pkl_name(inner)  # refuse archives torch itself would not read
    return {n: inner.read_member(n) for n in inner.names() if n.casefold().endswith(".pkl")}


def open_torch_archive(
    data: bytes, limits: Limits, label: str, tally: _Tally | None = None
) -> ZipMembers:
    """Open a torch zip archive held in memory (e.g. a tensor blob nested in a pickle).

    :param tally: the enclosing checkpoint's decompressed-bytes count.
    """
    return ZipMembers(io.BytesIO(data), limits, label, owns_file=True, tally=tally)


def is_zip_bytes(data: bytes) -> bool:
    """Whether ``data`` starts like a zip archive (the test ``torch.load`` itself applies)."""
    return _is_zip_head(data[:4])


class _MemoryFile(io.BytesIO):
    """A file over bytes that it keeps: they can be handed out, or read from threads,
    without a copy."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.data = data


def _crc_source(fileobj: Any) -> int | memoryview | None:
    """Where threads can read ``fileobj``'s bytes without its shared position: the
    descriptor of a regular file, or the memory of a :class:`_MemoryFile`; None for
    other streams."""
    if isinstance(fileobj, _MemoryFile):
        return memoryview(fileobj.data)
    # Only a plain file's descriptor holds its bytes: a wrapper (gzip, say) would hand out
    # the descriptor of what it decompresses.
    raw = getattr(fileobj, "raw", fileobj) if isinstance(fileobj, io.BufferedReader) else fileobj
    if not isinstance(raw, io.FileIO):
        return None
    try:
        return raw.fileno()
    except (OSError, ValueError):
        return None


def _stored_crc(source: int | memoryview | IO[bytes], start: int, size: int) -> int | None:
    """The CRC-32 of ``size`` bytes at ``start`` of memory, of a descriptor (positioned
    reads: no shared file position, safe in a thread) or of a stream (seek, then read), read
    into one reused buffer; None when the data ends first."""
    if isinstance(source, memoryview):
        if start + size > len(source):
            return None
        return zlib.crc32(source[start : start + size])
    buffer = bytearray(min(_CRC_CHUNK, max(size, 1)))
    view = memoryview(buffer)
    if not isinstance(source, int):
        source.seek(start)
    crc, done = 0, 0
    while done < size:
        want = view[: min(len(view), size - done)]
        if isinstance(source, int):
            n = os.preadv(source, [want], start + done)
        else:
            n = _read_into(source, want)
        if not n:
            return None
        crc = zlib.crc32(want[:n], crc)
        done += n
    return crc


def _read_into(stream: IO[bytes], want: memoryview) -> int:
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto(want)
    chunk = stream.read(len(want))  # a file object without readinto (a caller's stream)
    want[: len(chunk)] = chunk
    return len(chunk)


def open_checkpoint(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
    limits: Limits | None = None,
    *,
    in_memory: bool = False,
) -> CheckpointArchive:
    """Open an SB3 checkpoint zip as untrusted input.

    :param source: a path, the file's bytes, or a seekable binary file object (not closed by
        the archive).
    :param limits: resource limits (defaults to :class:`Limits`).
    :param in_memory: with a path, read the file whole first and work on those bytes: every
        later read, :meth:`CheckpointArchive.read_raw` included, sees the very same bytes
        (and ``read_raw`` returns them without a copy), whatever happens to the file.
    :return: the open archive; use it as a context manager.
    :raises ArchiveError: missing or unreadable file, not a regular file, too large, not a
        zip, truncated or damaged zip, a member name with ``..``, an absolute path, a
        backslash or a drive letter, duplicate names, too many members, a member or total
        size over the limits, a compression ratio over the limit, encrypted members, or no
        ``data`` member.
    """
    limits = limits if limits is not None else Limits()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > limits.max_file_bytes:
            raise ArchiveError(
                f"{len(source)} bytes, more than the limit of {limits.max_file_bytes}",
                path="<memory>",
            )
        return CheckpointArchive(_MemoryFile(bytes(source)), limits, "<memory>", owns_file=True)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if in_memory:
            raw = read_checkpoint_bytes(path, limits)
            return CheckpointArchive(_MemoryFile(raw), limits, path, owns_file=True)
        fileobj = _open_regular_file(path, limits)
        return CheckpointArchive(fileobj, limits, path, owns_file=True)
    label = str(getattr(source, "name", "<stream>"))
    return CheckpointArchive(source, limits, label, owns_file=False)


def _open_regular_file(path: str, limits: Limits) -> BinaryIO:
    try:
        return open_regular(path, limits.max_file_bytes)
    except NotRegularFile as exc:
        reason = (
            "is a directory, not a checkpoint file" if exc.kind == "a directory"
            else "not a regular file"
        )  # fmt: skip
        raise ArchiveError(reason, path=path) from None
    except FileTooLarge as exc:
        raise ArchiveError(
            f"{exc.size} bytes, more than the limit of {exc.limit}", path=path
        ) from None
    except FileNotFoundError:
        raise ArchiveError("no such file", path=path) from None
    except IsADirectoryError:
        raise ArchiveError("is a directory, not a checkpoint file", path=path) from None
    except PermissionError:
        raise ArchiveError("cannot read: permission denied", path=path) from None
    except OSError as exc:
        raise ArchiveError(f"cannot read: {exc.strerror or exc}", path=path) from None


def read_checkpoint_bytes(source: str | os.PathLike[str], limits: Limits | None = None) -> bytes:
    """Read a checkpoint file whole, refusing files larger than ``limits.max_file_bytes``.

    Loading from these bytes (rather than the path) guarantees that what was scanned is what
    gets loaded, even if the file changes in between.
    """
    limits = limits if limits is not None else Limits()
    path = os.fspath(source)
    with _open_regular_file(path, limits) as fileobj:
        data = fileobj.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise ArchiveError(f"more than the limit of {limits.max_file_bytes} bytes", path=path)
    return data
