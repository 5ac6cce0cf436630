"""Strict base64 decoding of SB3's ``:serialized:`` strings, without an encoded copy.

``binascii.a2b_base64(s, strict_mode=True)`` is what ``base64.b64decode(s, validate=True)``
does on Python 3.11 and newer, minus the ASCII copy of ``s``. The keyword does not exist
before 3.11: there the ``base64`` call is used, with leading padding refused as 3.11 does.
"""

from __future__ import annotations

import base64
import binascii
import sys

__all__ = ["decode_strict"]


def decode_strict(data: str | bytes | memoryview) -> bytes:
    """The bytes ``data`` encodes; :class:`binascii.Error` for anything but strict base64."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(data, strict_mode=True)
    # Python 3.10 checks the alphabet but not where padding stands: "=" alone decodes there.
    first = data[:1]
    if (first == "=") if isinstance(data, str) else (bytes(first) == b"="):
        raise binascii.Error("Leading padding not allowed")
    return base64.b64decode(data, validate=True)
