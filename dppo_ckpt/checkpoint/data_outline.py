"""Parse ``data`` without building the text of one large base64 payload in it.

In a layout-1 checkpoint ``data`` is mostly one JSON string: the scaler, pickled and then
base64-encoded. ``json.loads`` holds the whole text and that string (as large) at once, and
decoding the string makes a third copy. Here the string is found in the member's bytes, cut
out and replaced by a short placeholder; the rest (a few kilobytes) is parsed with
``json.loads``, and the payload is decoded straight from the bytes (a memoryview, no copy).
Memory then holds the member's bytes and the decoded payload, never the text of either.

Why the outline parses as ``data`` itself, bar that one string. The candidate is a run of
base64 characters between two ``"`` (no backslash, no control character in it), and the
placeholder is ``"\\u0000<random>"``; the bytes before and after are kept exactly. JSON is
read left to right, so at the candidate's first quote the reader is in the same state in both
texts. If it is outside a string there, both texts hold one complete string token at that
place (the candidate has no escapes), and they parse alike but for that token's value. If it
is inside a string, that quote closes it, and in the outline the placeholder's backslash then
stands outside any string, which no JSON allows: the outline fails to parse. Any failure, and
any placeholder found other than exactly once as the expected value, gives ``None``: the
caller parses the text as usual, with the same errors as ever.
"""

from __future__ import annotations

import binascii
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from dppo_ckpt._base64 import decode_strict

__all__ = ["MIN_PAYLOAD_CHARS", "DataOutline", "outline_data"]

#: Base64 strings shorter than this are parsed as usual: only large ones cost memory.
MIN_PAYLOAD_CHARS: Final = 1 << 20
_SERIALIZED_KEY: Final = ":serialized:"
# A checkpoint's `data` has a few hundred; past this many the usual parse is used.
_MAX_QUOTES: Final = 1 << 16


@dataclass
class DataOutline:
    """``data`` with the ``:serialized:`` string of one entry left out.

    :param text: ``data``'s text with that string replaced by a placeholder string; every
        other character as in the member.
    :param data: ``text`` parsed, with the placeholder replaced by an empty string.
    :param payload: the string base64-decoded, as ``base64.b64decode(..., validate=True)``
        decodes it.
    :param placeholder: the placeholder as it stands in ``text`` (quotes included).
    """

    text: str
    data: dict[str, Any]
    payload: bytes
    placeholder: str


def _long_strings(raw: bytes, min_chars: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of every run of at least ``min_chars`` bytes between two ``"`` that
    holds no other ``"`` (quotes included in the span); found with ``bytes.find``, which
    scans at memory speed.

    :raises _TooManyQuotes: more quotes than a checkpoint's ``data`` holds.
    """
    quote = raw.find(b'"')
    for _ in range(_MAX_QUOTES):
        if quote < 0:
            return
        following = raw.find(b'"', quote + 1)
        if following < 0:
            return
        if following - quote - 1 >= min_chars:
            yield quote, following + 1
        quote = following
    raise _TooManyQuotes


class _TooManyQuotes(Exception):
    """``data`` has more quotes than the outline looks through."""


def _strings(value: Any) -> Iterator[str]:
    """Every string of a parsed JSON value, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for key, child in item.items():
                yield key
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def outline_data(
    raw: bytes,
    key: str,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], dict[str, Any]],
    *,
    min_chars: int | None = None,
) -> DataOutline | None:
    """The outline of ``data`` (its bytes ``raw``) without ``data[key][":serialized:"]``.

    :param object_pairs_hook: the hook ``json.loads`` is given for ``data`` (it refuses
        duplicate keys), used for the outline too.
    :param min_chars: the shortest string worth leaving out (:data:`MIN_PAYLOAD_CHARS`).
    :return: the outline, or ``None`` when the longest such string in ``raw`` is not that
        payload, or anything about it is not as described above (the caller then parses
        ``raw`` as usual).
    """
    min_chars = MIN_PAYLOAD_CHARS if min_chars is None else min_chars
    # The payload is the longest long string that decodes as base64 (strictly: nothing but
    # the alphabet and its padding, so no quote, backslash or control character inside).
    try:
        spans = sorted(_long_strings(raw, min_chars), key=lambda span: span[0] - span[1])
    except _TooManyQuotes:
        return None
    for start, end in spans:
        try:
            with memoryview(raw) as view:
                payload = decode_strict(view[start + 1 : end - 1])
            break
        except binascii.Error:
            continue  # not base64: text outside any string, or another kind of string
    else:
        return None
    token = "\\u0000" + secrets.token_hex(16)
    placeholder = f'"{token}"'
    try:
        text = (
            bytes(raw[:start]).decode("utf-8") + placeholder + bytes(raw[end:]).decode("utf-8")
        )
        parsed = json.loads(text, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError):
        return None  # invalid UTF-8 or JSON: the usual parse reports it
    value = json.loads(placeholder)
    if not isinstance(parsed, dict):
        return None
    entry = parsed.get(key)
    if not (isinstance(entry, dict) and entry.get(_SERIALIZED_KEY) == value):
        return None
    if sum(1 for string in _strings(parsed) if string == value) != 1:
        return None
    entry[_SERIALIZED_KEY] = ""
    return DataOutline(text=text, data=parsed, payload=payload, placeholder=placeholder)
