"""Write a zip as a copy of another: every member kept is copied as raw bytes.

Members are copied with their local headers and compressed bytes as they are, in the same
order (in the kernel with ``copy_file_range`` where it can, as ``cp`` does, so the bytes never
pass through this process); only the members being replaced, dropped or added change, and
the central directory is the original's with offsets (and the new members' sizes and CRCs)
updated. Memory is bounded by the members being written, never by the file.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from dppo_ckpt.checkpoint.migrate.errors import MigrationError
from dppo_ckpt.checkpoint.results import EXIT_UNUSABLE

__all__ = ["ZipEdit", "copy_range", "write_zip"]

_CHUNK: Final = 1 << 20
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature .. extra length: 30 bytes
_CENTRAL_HEADER = struct.Struct("<4s6H3I5H2I")  # signature .. local header offset: 46 bytes
_END_RECORD = struct.Struct("<4s4H2IH")  # 22 bytes
_LOCAL_SIG: Final = b"PK\x03\x04"
_CENTRAL_SIG: Final = b"PK\x01\x02"
_END_SIG: Final = b"PK\x05\x06"
_ZIP64_EXTRA: Final = 0x0001
_U32_MAX: Final = 0xFFFFFFFF
_VERSION: Final = 20  # 2.0: deflate, folders; what SB3's (Python's) zip writer records


@dataclass
class ZipEdit:
    """What changes between the source zip and the copy.

    :param replace: new bytes of existing members (same compression, same place).
    :param drop: members left out.
    :param add: new members (stored, not compressed), written right after the member
        ``add_after`` (at the end when it is ``None`` or absent), in this order.
    :param add_after: see ``add``.
    """

    replace: dict[str, bytes] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    add: list[tuple[str, bytes | memoryview]] = field(default_factory=list)
    add_after: str | None = None


def copy_range(src: IO[bytes], dst: IO[bytes], offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src`` to the current position of ``dst``.

    In the kernel when it can (``copy_file_range``, as ``cp`` does), so that the bytes never
    pass through this process; through a small buffer otherwise.
    """
    dst.flush()
    dst_offset = dst.tell()
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            src_fd, dst_fd = src.fileno(), dst.fileno()
            done = 0
            while done < length:
                n = copy_file_range(
                    src_fd, dst_fd, min(length - done, 1 << 30), offset + done, dst_offset + done
                )
                if n == 0:
                    break
                done += n
            if done == length:
                dst.seek(dst_offset + length)
                return
        except OSError:
            pass  # e.g. across some file systems: copy through user space
    src.seek(offset)
    dst.seek(dst_offset)
    remaining = length
    while remaining:
        chunk = src.read(min(remaining, _CHUNK))
        if not chunk:
            raise MigrationError("the input ended early while copying", EXIT_UNUSABLE)
        dst.write(chunk)
        remaining -= len(chunk)


def _zip64_patch(extra: bytes, values: dict[str, int], present: Sequence[str]) -> bytes:
    """Rewrite the zip64 extra field: ``present`` names its 8-byte fields in order."""
    out, pos = bytearray(), 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = bytearray(extra[pos + 4 : pos + 4 + size])
        if tag == _ZIP64_EXTRA:
            for index, name in enumerate(present):
                if name in values and 8 * index + 8 <= len(body):
                    struct.pack_into("<Q", body, 8 * index, values[name])
        out += struct.pack("<HH", tag, len(body)) + body
        pos += 4 + size
    return bytes(out + extra[pos:])


def _compress(data: bytes, compress_type: int) -> bytes:
    """``data`` as the member's compression stores it."""
    if compress_type == zipfile.ZIP_STORED:
        return data
    compressor = zipfile._get_compressor(compress_type)  # type: ignore[attr-defined]
    return compressor.compress(data) + compressor.flush()


def _local_header(name: bytes, payload: bytes | memoryview, time_date: tuple[int, int]) -> bytes:
    return _LOCAL_HEADER.pack(
        _LOCAL_SIG, _VERSION, 0, zipfile.ZIP_STORED, *time_date, zlib.crc32(payload),
        len(payload), len(payload), len(name), 0,
    ) + name  # fmt: skip


def _central_record(
    name: bytes, payload: bytes | memoryview, time_date: tuple[int, int], offset: int
) -> bytes:
    return _CENTRAL_HEADER.pack(
        _CENTRAL_SIG, _VERSION, _VERSION, 0, zipfile.ZIP_STORED, *time_date,
        zlib.crc32(payload), len(payload), len(payload), len(name), 0, 0, 0, 0,
        0o644 << 16, offset,
    ) + name  # fmt: skip


def write_zip(src_path: Path, dst: IO[bytes], edit: ZipEdit) -> None:
    """Write ``src_path`` to ``dst`` with ``edit`` applied; see the module docstring.

    :raises MigrationError: the source's headers disagree with its directory, duplicate
        names, or a result that would need zip64 records this writer does not make.
    """
    with open(src_path, "rb") as src, zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir  # type: ignore[attr-defined]
        comment = zf.comment
        if len({info.filename for info in infos}) != len(infos):
            raise MigrationError("duplicate member names", EXIT_UNUSABLE)
        names = {info.filename for info in infos}
        added = {name for name, _ in edit.add}
        if added & (names - edit.drop):
            raise MigrationError(f"members {sorted(added & names)} exist already", EXIT_UNUSABLE)
        by_offset = sorted(infos, key=lambda info: info.header_offset)
        ends = [info.header_offset for info in by_offset[1:]] + [start_dir]
        new_offsets: dict[str, int] = {}
        new_sizes: dict[str, tuple[int, int, int]] = {}
        added_at: list[tuple[bytes, bytes | memoryview, tuple[int, int], int]] = []
        time_date: tuple[int, int] = (0, 0x21)  # 1980-01-01 unless a member says otherwise

        def write_added() -> None:
            for name, payload in edit.add:
                raw_name = name.encode("utf-8")
                added_at.append((raw_name, payload, time_date, dst.tell()))
                dst.write(_local_header(raw_name, payload, time_date))
                dst.write(payload)

        anchor = edit.add_after if edit.add_after in names else None
        if by_offset and by_offset[0].header_offset > 0:
            copy_range(src, dst, 0, by_offset[0].header_offset)
        for info, end in zip(by_offset, ends, strict=True):
            src.seek(info.header_offset)
            header = src.read(_LOCAL_HEADER.size)
            fields = list(_LOCAL_HEADER.unpack(header))
            if fields[0] != _LOCAL_SIG:
                raise MigrationError(f"member {info.filename!r}: bad local header", 2)
            name_len, extra_len = fields[9], fields[10]
            data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if data_start + info.compress_size > end:
                raise MigrationError(f"member {info.filename!r} overlaps the next one", 2)
            if info.filename == "data" or time_date == (0, 0x21):
                time_date = (fields[4], fields[5])
            if info.filename in edit.drop:
                if info.filename == anchor:
                    write_added()
                continue
            new_offsets[info.filename] = dst.tell()
            if info.filename not in edit.replace:
                copy_range(src, dst, info.header_offset, end - info.header_offset)
            else:
                name_and_extra = src.read(name_len + extra_len)
                payload = edit.replace[info.filename]
                compressed = _compress(payload, info.compress_type)
                crc = zlib.crc32(payload)
                new_sizes[info.filename] = (crc, len(compressed), len(payload))
                if max(len(compressed), len(payload)) >= _U32_MAX:
                    raise MigrationError(f"member {info.filename!r} would need zip64 sizes", 1)
                extra = name_and_extra[name_len:]
                extra = _zip64_patch(
                    extra, {"usize": len(payload), "csize": len(compressed)}, ("usize", "csize")
                )
                # Sizes go in the header; no data descriptor follows (bit 3 cleared).
                fields[2] &= ~0x08
                if fields[7] != _U32_MAX:
                    fields[7] = len(compressed)
                if fields[8] != _U32_MAX:
                    fields[8] = len(payload)
                fields[6] = crc
                fields[10] = len(extra)
                dst.write(_LOCAL_HEADER.pack(*fields) + name_and_extra[:name_len] + extra)
                dst.write(compressed)
            if info.filename == anchor:
                write_added()
        if anchor is None:
            write_added()

        central_start = dst.tell()
        src.seek(start_dir)
        records: list[tuple[str, bytes]] = []
        for info in infos:
            record = src.read(_CENTRAL_HEADER.size)
            fields = list(_CENTRAL_HEADER.unpack(record))
            if fields[0] != _CENTRAL_SIG:
                raise MigrationError("bad central directory record", EXIT_UNUSABLE)
            name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
            name = src.read(name_len)
            extra = src.read(extra_len)
            member_comment = src.read(comment_len)
            if info.filename in edit.drop:
                records.append((info.filename, b""))
                continue
            present = [
                key
                for key, value in (
                    ("usize", fields[9]),
                    ("csize", fields[8]),
                    ("offset", fields[16]),
                )
                if value == _U32_MAX
            ]
            values = {"offset": new_offsets[info.filename]}
            if info.filename in new_sizes:
                crc, csize, usize = new_sizes[info.filename]
                fields[3] &= ~0x08
                fields[7] = crc
                values.update(csize=csize, usize=usize)
                if fields[8] != _U32_MAX:
                    fields[8] = csize
                if fields[9] != _U32_MAX:
                    fields[9] = usize
            if fields[16] != _U32_MAX:
                if values["offset"] >= _U32_MAX:
                    raise MigrationError("the result would need zip64 offsets", 1)
                fields[16] = values["offset"]
            extra = _zip64_patch(extra, values, present)
            fields[11] = len(extra)
            records.append(
                (info.filename, _CENTRAL_HEADER.pack(*fields) + name + extra + member_comment)
            )
        new_records = [
            _central_record(name, payload, when, offset)
            for name, payload, when, offset in added_at
        ]
        if max((offset for *_, offset in added_at), default=0) >= _U32_MAX:
            raise MigrationError("the result would need zip64 offsets", 1)
        count = 0
        for filename, record in records:
            dst.write(record)
            count += bool(record)
            if filename == anchor:
                for extra_record in new_records:
                    dst.write(extra_record)
                    count += 1
        if anchor is None:
            for extra_record in new_records:
                dst.write(extra_record)
                count += 1
        central_size = dst.tell() - central_start
        if count > 0xFFFF or central_start >= _U32_MAX:
            raise MigrationError("the result would need a zip64 end record", 1)
        end = _END_RECORD.pack(
            _END_SIG, 0, 0, count, count, central_size, central_start, len(comment)
        )
        dst.write(end + comment)
