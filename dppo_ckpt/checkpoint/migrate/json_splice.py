"""Edit the ``data`` JSON in place: find an entry's span in the text and cut it out (or
replace one string), keeping every other character.

SB3 reads ``data`` with ``json.loads``; the text this module writes parses to the same values
for every key it did not touch, and the check says so before anything is written. Strings
are skipped without being built: the base64 of a large scaler runs to hundreds of megabytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from dppo_ckpt.checkpoint.archive import SERIALIZED_KEY
from dppo_ckpt.vgs_format import SCALER_ENTRY

__all__ = ["changed_keys", "entry_span", "remove_entry"]

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _value_end(text: str, pos: int) -> int:
    """End of the JSON value at ``pos``. Strings (and objects, which may hold them) are
    skipped without being built: the base64 of a large scaler runs to hundreds of megabytes."""
    if text[pos : pos + 1] == "{":
        last = pos + 1
        for _, _, _, value_end in _members(text, pos):
            last = value_end
        close = _WS.match(text, last).end()  # type: ignore[union-attr]
        if text[close : close + 1] != "}":
            raise ValueError(f"expected '}}' at character {close}")
        return close + 1
    if text[pos : pos + 1] != '"':
        return _DECODER.raw_decode(text, pos)[1]
    end = pos + 1
    while True:
        end = text.find('"', end)
        if end < 0:
            raise ValueError(f"unterminated string at character {pos}")
        before = end - 1
        while text[before] == "\\":  # an odd run of backslashes escapes the quote
            before -= 1
        if (end - 1 - before) % 2 == 0:
            return end + 1
        end += 1


def _members(text: str, pos: int) -> Iterator[tuple[str, int, int, int]]:
    """Yield ``(key, key_start, value_start, value_end)`` of the JSON object at ``pos``."""
    pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] != "{":
        raise ValueError(f"expected an object at character {pos}")
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "}":
        return
    while True:
        if text[pos : pos + 1] != '"':
            raise ValueError(f"expected a key at character {pos}")
        key_start = pos
        key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != ":":
            raise ValueError(f"expected ':' at character {pos}")
        value_start = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        value_end = _value_end(text, value_start)
        yield key, key_start, value_start, value_end
        pos = _WS.match(text, value_end).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] == "}":
            return
        if text[pos : pos + 1] != ",":
            raise ValueError(f"expected ',' or '}}' at character {pos}")
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]


def entry_span(text: str, key: str) -> tuple[int, int, int, int] | None:
    """``(cut_start, cut_end, value_start, value_end)`` of the top-level entry ``key``: the
    value's span, and the span to cut to remove the entry with its separating comma."""
    members = list(_members(text, 0))
    for index, (name, key_start, value_start, value_end) in enumerate(members):
        if name != key:
            continue
        if index + 1 < len(members):
            return key_start, members[index + 1][1], value_start, value_end
        if index > 0:
            return members[index - 1][3], value_end, value_start, value_end
        return key_start, value_end, value_start, value_end
    return None


def remove_entry(text: str, key: str, data: dict[str, Any]) -> bytes:
    """The ``data`` text without the top-level entry ``key``; every other character stays.

    Checked the way SB3 reads it: the result parses to ``data`` without ``key``, key for key
    (compared as ``json.dumps`` writes them); ``data`` may lack ``key`` already.

    :raises ValueError: no such entry, or an edit that would change anything else.
    """
    span = entry_span(text, key)
    if span is None:
        raise ValueError(f"no {key!r} entry")
    new_text = text[: span[0]] + text[span[1] :]
    expected = {name: value for name, value in data.items() if name != key}
    changed = changed_keys(expected, json.loads(new_text))
    del new_text
    if changed:
        raise ValueError(f"the edit would change {changed}")
    return (text[: span[0]] + text[span[1] :]).encode("utf-8")


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs, compared as SB3 writes them (``json.dumps``)."""
    changed = []
    for key in dict.fromkeys([*old, *new]):
        if key not in old or key not in new:
            changed.append(key)
        elif key == SCALER_ENTRY and isinstance(old[key], dict) and isinstance(new[key], dict):
            changed += [f"{key}.{sub}" for sub in changed_keys(old[key], new[key])]
        elif key == SERIALIZED_KEY and isinstance(old[key], str) and isinstance(new[key], str):
            if old[key] != new[key]:  # plain strings: no need to encode megabytes of base64
                changed.append(key)
        elif json.dumps(old[key], indent=4) != json.dumps(new[key], indent=4):
            changed.append(key)
    return changed
