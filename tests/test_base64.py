"""Strict base64 decoding gives the same answers on every supported Python."""

from __future__ import annotations

import base64
import binascii
import re
import types

import pytest

from dppo_ckpt import _base64

GOOD = base64.b64encode(bytes(range(256)) * 3).decode()
BAD = ["QUJD\n", "QUJD!", "QUJ", "QU=D", " QUJD", "=", "==", b"==", memoryview(b"=")]


def _b64decode_of_python_3_10(data, validate=False):
    """``base64.b64decode`` as Python 3.10 has it: the alphabet checked by a pattern, then a
    decode that does not look at where the padding stands."""
    data = data.encode("ascii") if isinstance(data, str) else bytes(data)
    if validate and not re.fullmatch(b"[A-Za-z0-9+/]*={0,2}", data):
        raise binascii.Error("Non-base64 digit found")
    return binascii.a2b_base64(data)


@pytest.fixture(params=["3.11+", "3.10"])
def decode(request, monkeypatch):
    if request.param == "3.10":
        monkeypatch.setattr(_base64, "sys", types.SimpleNamespace(version_info=(3, 10, 14)))
        monkeypatch.setattr(
            _base64, "base64", types.SimpleNamespace(b64decode=_b64decode_of_python_3_10)
        )
    return _base64.decode_strict


@pytest.mark.parametrize("form", [str, str.encode, lambda s: memoryview(s.encode())])
def test_valid_base64_decodes_to_its_bytes(decode, form):
    assert decode(form(GOOD)) == bytes(range(256)) * 3


@pytest.mark.parametrize("text", BAD)
def test_anything_but_strict_base64_is_a_binascii_error(decode, text):
    with pytest.raises(binascii.Error):
        decode(text)
