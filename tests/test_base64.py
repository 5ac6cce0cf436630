"""Strict base64 decoding gives the same answers on every supported Python."""

from __future__ import annotations

import base64
import binascii
import types

import pytest

from dppo_ckpt import _base64

GOOD = base64.b64encode(bytes(range(256)) * 3).decode()
BAD = ["QUJD\n", "QUJD!", "QUJ", "QU=D", " QUJD"]


@pytest.fixture(params=["3.11+", "3.10"])
def decode(request, monkeypatch):
    if request.param == "3.10":
        monkeypatch.setattr(_base64, "sys", types.SimpleNamespace(version_info=(3, 10, 14)))
    return _base64.decode_strict


@pytest.mark.parametrize("form", [str, str.encode, lambda s: memoryview(s.encode())])
def test_valid_base64_decodes_to_its_bytes(decode, form):
    assert decode(form(GOOD)) == bytes(range(256)) * 3


@pytest.mark.parametrize("text", BAD)
def test_anything_but_strict_base64_is_a_binascii_error(decode, text):
    with pytest.raises(binascii.Error):
        decode(text)
