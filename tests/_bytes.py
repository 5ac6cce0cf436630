"""Byte comparisons that fail fast and say where: the first differing member and offset.

pytest's assertion diff of two large byte strings takes minutes (its difflib runs over every
byte), so comparisons of checkpoints never go through ``assert a == b`` on the bytes.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest


def _first_offset(a: bytes, b: bytes) -> int:
    # Halving the prefix keeps the search at C speed even for hundreds of MB.
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _members(data: bytes) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [(info.filename, archive.read(info)) for info in archive.infolist()]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return None


def describe_difference(expected: bytes, actual: bytes) -> str | None:
    """``None`` when equal; otherwise one line naming the first differing member (for zips)
    and byte offset, with sizes and digests."""
    if expected == actual:
        return None
    offset = _first_offset(expected, actual)
    whole = (
        f"file offset {offset} (sizes {len(expected)} vs {len(actual)}, "
        f"sha256 {_digest(expected)} vs {_digest(actual)})"
    )
    left, right = _members(expected), _members(actual)
    if left is None or right is None:
        return f"bytes differ at {whole}"
    names_left, names_right = [n for n, _ in left], [n for n, _ in right]
    if names_left != names_right:
        return f"members differ: {names_left} vs {names_right}; {whole}"
    for (name, a), (_, b) in zip(left, right, strict=True):
        if a != b:
            inner = describe_difference(a, b) if name.endswith(".pth") else None
            where = f"member {name!r} offset {_first_offset(a, b)}"
            if inner is not None and inner.startswith("member "):
                where += f" ({inner.split(';')[0]})"
            return (
                f"{where} (sizes {len(a)} vs {len(b)}, sha256 {_digest(a)} vs {_digest(b)}); "
                f"{whole}"
            )
    return f"same members with the same contents, but the zip bytes differ at {whole}"


def assert_same_bytes(expected: bytes, actual: bytes, what: str) -> None:
    """Fail at once, naming ``what`` and where the bytes first differ."""
    difference = describe_difference(expected, actual)
    if difference is not None:
        pytest.fail(f"{what}: {difference}", pytrace=False)
