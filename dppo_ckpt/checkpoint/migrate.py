"""Rewrite legacy checkpoints: scalers that pickled their parameter objects, or an old state.

Checkpoints written before the scaler stopped pickling ``_parameters`` carry copies of the
policy's parameters inside the scaler entry of ``data``; after loading, such copies are stale
by construction. Checkpoints written before the scaler's running level carry a format-1 state
(an absolute cap on the noise ratio). :func:`migrate_file` rewrites a checkpoint so that the
pickled scaler carries no ``_parameters`` (nor ``_logger``) and a current state (upgraded as
``VarianceGradientScaler.__setstate__`` upgrades it when loading), and changes nothing else:

- *code-free*: the scaler entry is decoded into inert stand-ins
  (:mod:`dppo_ckpt.checkpoint.stub_pickle`), the keys are removed from its ``BUILD`` state and
  the stand-ins are written back naming the very same globals, so the new pickle is exactly
  what the fixed scaler would have written for the same state. Nothing the file names is
  imported or called, so checkpoints whose classes live in modules that no longer exist
  migrate as well. Tensor blobs are copied byte for byte;
- *lossless*: every other zip member is copied with its raw compressed bytes and headers (same
  compression, same order), and the ``data`` JSON is edited in place: only the scaler entry's
  ``:serialized:`` string changes, every other byte of the text stays (the human-readable
  description keys SB3 writes beside it describe the live object, and are what the current
  code writes too);
- *atomic*: the result is written to a temporary file in the destination folder, synced,
  verified (the static checks always, the load checks when the classes import) and renamed
  over the destination; a crash at any moment leaves the destination either absent (or as it
  was) or complete. ``--in-place`` first makes an atomic backup (a hard link).

Migration refuses, like ``verify``, checkpoints whose pickles name globals off the allow-list,
with one difference: since nothing is executed, the scaler's own class (and the policy and
rollout-buffer classes of this package) may be named from any module.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from dppo_ckpt.atomic import fsync_directory
from dppo_ckpt.checkpoint.archive import (
    DATA_MEMBER,
    SERIALIZED_KEY,
    ArchiveError,
    CheckpointArchive,
    CheckpointError,
    open_checkpoint,
)
from dppo_ckpt.checkpoint.contents import LEGACY_STATE_KEYS, legacy_state_keys
from dppo_ckpt.checkpoint.inputs import checkpoint_files
from dppo_ckpt.checkpoint.results import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_UNSAFE,
    EXIT_UNUSABLE,
    FileReport,
    Verdict,
    overall_exit_code,
)
from dppo_ckpt.checkpoint.safe_pickle import (
    Finding,
    PickleScanError,
    ScanReport,
    scan_checkpoint,
)
from dppo_ckpt.checkpoint.stub_pickle import (
    RawBytes,
    StubCall,
    StubGlobal,
    StubPickleError,
    iter_stubs,
    pickle_protocol,
    stub_dumps,
    stub_loads,
)

__all__ = [
    "DROPPED_STATE_KEYS",
    "SCALER_ENTRY",
    "SCALER_STATE_VERSION",
    "MigrationError",
    "MigrationOutcome",
    "MigrationPlan",
    "UsageError",
    "is_exempt",
    "migrate_file",
    "migrate_paths",
    "plan_migration",
    "resolve_jobs",
    "rewrite_scaler_pickle",
]

#: The ``data`` entry holding DistributionalPPO's pickled Variance Gradient Scaler.
SCALER_ENTRY: Final = "_variance_gradient_scaler"
#: Attributes the fixed scaler never pickles (``VarianceGradientScaler.__getstate__``); the
#: list is repeated here because this module must not import torch.
DROPPED_STATE_KEYS: Final = LEGACY_STATE_KEYS
#: The scaler state format the current code writes (``VarianceGradientScaler``'s
#: ``STATE_FORMAT_VERSION``), and the pickled attributes of that format in the order the
#: scaler creates them, with the values a format-1 state lacks (``__setstate__`` upgrades the
#: same way). Repeated here because this module must not import torch.
SCALER_STATE_VERSION: Final = 2
_STATE_ORDER: Final = (
    "_state_version",
    "beta",
    "alpha",
    "eps",
    "warmup_steps",
    "quantile",
    "level_beta",
    "min_scale",
    "enabled",
    "_step_count",
    "_scaling_factor",
    "_noise_ratio",
    "_level",
    "_post_warmup_steps",
    "_at_min_steps",
    "_at_one_steps",
    "_scale_sum",
    "_exp_avg",
    "_exp_avg_sq",
)
_STATE_DEFAULTS: Final[dict[str, Any]] = {
    "beta": 0.99,
    "alpha": 1.0,
    "eps": 1e-8,
    "warmup_steps": 100,
    "quantile": 0.9,
    "level_beta": 0.99,
    "min_scale": 0.1,
    "enabled": True,
    "_step_count": 0,
    "_scaling_factor": 1.0,
    "_noise_ratio": 0.0,
    "_level": None,
    "_post_warmup_steps": 0,
    "_at_min_steps": 0,
    "_at_one_steps": 0,
    "_scale_sum": 0.0,
    "_exp_avg": None,
    "_exp_avg_sq": None,
}
#: Format 1's absolute cap on the noise ratio, which the running level replaced.
_FORMAT_1_ONLY: Final = ("variance_cap",)
#: Classes of this package that older code kept in other modules. Migration only *names*
#: them, so they are accepted from any module in these entries (see :func:`is_exempt`).
_NAMED_CLASSES: Final = {
    SCALER_ENTRY: "VarianceGradientScaler",
    "policy_class": "CustomActorCriticPolicy",
    "rollout_buffer_class": "DistributionalRolloutBuffer",
}
_CHUNK: Final = 1 << 20
_TMP_SUFFIX: Final = ".migrate-tmp"

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature .. extra length: 30 bytes
_CENTRAL_HEADER = struct.Struct("<4s6H3I5H2I")  # signature .. local header offset: 46 bytes
_END_RECORD = struct.Struct("<4s4H2IH")  # 22 bytes
_LOCAL_SIG: Final = b"PK\x03\x04"
_CENTRAL_SIG: Final = b"PK\x01\x02"
_END_SIG: Final = b"PK\x05\x06"
_ZIP64_EXTRA: Final = 0x0001
_U32_MAX: Final = 0xFFFFFFFF


class MigrationError(CheckpointError):
    """The migration could not be carried out (exit code ``exit_code``).

    :param reason: one line.
    :param exit_code: 1 (the result failed verification or could not be written), 2 (unusable
        input or arguments), 3 (refused as unsafe).
    """

    def __init__(self, reason: str, exit_code: int = EXIT_CHECK_FAILED) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class UsageError(MigrationError):
    """The command line does not describe a migration (exit code 2)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, EXIT_UNUSABLE)


# ---------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------


def is_exempt(finding: Finding) -> bool:
    """Whether a refused global is accepted by migration although it is off the allow-list.

    Migration never imports or calls what a pickle names, so a class of this package that is
    merely *named* is harmless even from a module that does not exist here: the scaler's class
    in the scaler entry, the policy class in ``policy_class`` and the rollout buffer class in
    ``rollout_buffer_class``, at the top level of those pickles (not inside tensor blobs).
    Everything else follows the allow-list.
    """
    expected = _NAMED_CLASSES.get(finding.entry or "")
    if expected is None or finding.member != DATA_MEMBER or finding.path:
        return False
    module, _, qualname = finding.global_name.rpartition(".")
    return bool(module) and qualname == expected and finding.verdict.value == "not allowed"


def _refusal(scan: ScanReport) -> Finding | None:
    return next((f for f in scan.refused if not is_exempt(f)), None)


def _describe_finding(finding: Finding) -> str:
    where = f"member {finding.member!r}" + (f", entry {finding.entry!r}" if finding.entry else "")
    inside = f" ({' > '.join(finding.path)})" if finding.path else ""
    return f"unsafe pickle in {where}{inside}: {finding.global_name} is {finding.verdict.value}"


def _check_named_only(archive: CheckpointArchive, scan: ScanReport) -> None:
    """An exempt class in ``policy_class``/``rollout_buffer_class`` must be the whole pickle."""
    for finding in scan.refused:
        if finding.entry == SCALER_ENTRY or finding.entry not in _NAMED_CLASSES:
            continue
        # Decoded alone: the scan validated the base64 already, and the scaler's can be huge.
        payload = base64.b64decode(archive.data[finding.entry][SERIALIZED_KEY])
        root = _stub(payload, finding.entry)
        if not isinstance(root, StubGlobal):
            raise MigrationError(_describe_finding(finding) + " (and is not a bare class)", 3)


# ---------------------------------------------------------------------------------------------
# The scaler pickle
# ---------------------------------------------------------------------------------------------


def _stub(payload: bytes, entry: str) -> Any:
    try:
        return stub_loads(payload)
    except StubPickleError as exc:
        raise MigrationError(f"entry {entry!r}: {exc}", EXIT_UNUSABLE) from None
    except RecursionError:
        raise MigrationError(f"entry {entry!r}: the pickle nests too deeply", 2) from None


def _scaler_state(root: Any) -> dict[Any, Any]:
    """The ``BUILD`` state of a pickled scaler: ``cls.__new__(cls)`` then a dict state."""
    if not (
        isinstance(root, StubCall)
        and root.kind == "NEWOBJ"
        and isinstance(root.func, StubGlobal)
        and root.func.qualname == _NAMED_CLASSES[SCALER_ENTRY]
        and root.args == ()
    ):
        raise MigrationError(
            f"entry {SCALER_ENTRY!r} is not a pickled VarianceGradientScaler "
            "(expected the class, NEWOBJ and a dict state)",
            EXIT_UNUSABLE,
        )
    if len(root.ops) != 1 or root.ops[0][0] != "build" or not isinstance(root.ops[0][1], dict):
        raise MigrationError(
            f"entry {SCALER_ENTRY!r}: the scaler's state is not a single dict", EXIT_UNUSABLE
        )
    state = root.ops[0][1]
    if not all(isinstance(key, str) for key in state):
        raise MigrationError(f"entry {SCALER_ENTRY!r}: state keys are not all strings", 2)
    return state


def _blob_digests(values: Iterable[Any]) -> list[str]:
    digests = []
    for value in values:
        for obj in iter_stubs(value):
            if isinstance(obj, RawBytes):
                digests.append(hashlib.sha256(obj.view).hexdigest())
    return sorted(digests)


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 scaler state in the current format, as ``__setstate__`` upgrades it: the
    cap dropped, the attributes of the running level and of the factor's counters added with
    their starting values, in the order the current scaler pickles them (attributes unknown
    here keep their place after those)."""
    known = {key: value for key, value in state.items() if key not in _FORMAT_1_ONLY}
    merged = {**_STATE_DEFAULTS, **known, "_state_version": SCALER_STATE_VERSION}
    ordered = {key: merged[key] for key in _STATE_ORDER}
    ordered.update((key, value) for key, value in merged.items() if key not in ordered)
    return ordered


def rewrite_scaler_pickle(payload: bytes) -> tuple[bytes | None, dict[str, Any]]:
    """Remove :data:`DROPPED_STATE_KEYS` from a pickled scaler and upgrade a format-1 state
    to the current format, executing nothing.

    :param payload: the scaler entry's pickle (decoded from base64).
    :return: ``(new_pickle, facts)``; ``new_pickle`` is ``None`` when the pickle holds none of
        the keys and its state is current. ``facts`` says what was found: the scaler class,
        the keys removed, how many parameter tensors ``_parameters`` held, the state format
        before and after.
    :raises MigrationError: not a pickled scaler, or a pickle the stand-ins cannot rewrite.
    """
    root = _stub(payload, SCALER_ENTRY)
    state = _scaler_state(root)
    removed = legacy_state_keys(state)
    parameters = state.get("_parameters")
    version = state.get("_state_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MigrationError(f"entry {SCALER_ENTRY!r}: unknown state format {version!r}", 2)
    if version > SCALER_STATE_VERSION:
        raise MigrationError(
            f"entry {SCALER_ENTRY!r}: state format {version} is newer than the supported "
            f"{SCALER_STATE_VERSION}; upgrade dppo-ckpt to migrate it",
            EXIT_UNUSABLE,
        )
    facts: dict[str, Any] = {
        "scaler_class": root.func.name,
        "removed_state_keys": removed,
        "pickled_parameters": len(parameters) if isinstance(parameters, list) else 0,
        "state_version_before": version,
        "state_version_after": SCALER_STATE_VERSION,
        "scaler_bytes_before": len(payload),
    }
    if not removed and version == SCALER_STATE_VERSION:
        facts["scaler_bytes_after"] = len(payload)
        return None, facts
    kept = {key: value for key, value in state.items() if key not in DROPPED_STATE_KEYS}
    if version < SCALER_STATE_VERSION:
        kept = _upgraded(kept)
    root.ops[0] = ("build", kept)
    try:
        new_payload = stub_dumps(root, pickle_protocol(payload))
    except (StubPickleError, RecursionError) as exc:
        raise MigrationError(f"entry {SCALER_ENTRY!r}: cannot rewrite the pickle: {exc}") from None
    # The rewrite must keep every remaining value: same keys in the same order, and the very
    # same tensor blobs.
    new_state = _scaler_state(stub_loads(new_payload))
    if list(new_state) != list(kept) or _blob_digests(new_state.values()) != _blob_digests(
        kept.values()
    ):
        raise MigrationError(f"entry {SCALER_ENTRY!r}: the rewritten pickle lost data")
    facts["scaler_bytes_after"] = len(new_payload)
    return new_payload, facts


# ---------------------------------------------------------------------------------------------
# The data JSON, edited in place
# ---------------------------------------------------------------------------------------------

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


def _serialized_span(text: str) -> tuple[int, int]:
    """Where the scaler entry's ``:serialized:`` string lies in the ``data`` text."""
    scaler_start = next(
        (start for key, _, start, _ in _members(text, 0) if key == SCALER_ENTRY), None
    )
    if scaler_start is None:
        raise ValueError(f"no {SCALER_ENTRY!r} entry")
    spans = [
        (start, end) for key, _, start, end in _members(text, scaler_start) if key == SERIALIZED_KEY
    ]
    if len(spans) != 1:
        raise ValueError(f"{SCALER_ENTRY!r} has {len(spans)} {SERIALIZED_KEY!r} keys")
    return spans[0]


def _edit_data_text(text: str, new_serialized: bytes, data: dict[str, Any]) -> bytes:
    """The ``data`` member with the scaler entry's ``:serialized:`` string replaced by the
    base64 ``new_serialized``; every other character of ``text`` is kept.

    Checked the way SB3 reads it: with the string emptied, the text parses to ``data`` with that
    one string emptied, key for key (compared as ``json.dumps`` writes them). The base64 itself
    is never re-encoded or re-parsed (it can run to hundreds of megabytes): its alphabet needs
    no JSON escaping.
    """
    start, end = _serialized_span(text)
    skeleton = json.loads(text[:start] + '""' + text[end:])
    expected = dict(data)
    expected[SCALER_ENTRY] = {**data[SCALER_ENTRY], SERIALIZED_KEY: ""}
    changed = _changed(expected, skeleton)
    if changed:
        raise ValueError(f"the edit would change {changed}")
    return b"".join(
        (text[:start].encode("utf-8"), b'"', new_serialized, b'"', text[end:].encode("utf-8"))
    )


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs, compared as SB3 writes them (``json.dumps``)."""
    changed = []
    for key in dict.fromkeys([*old, *new]):
        if key not in old or key not in new:
            changed.append(key)
        elif key == SCALER_ENTRY and isinstance(old[key], dict) and isinstance(new[key], dict):
            changed += [f"{key}.{sub}" for sub in _changed(old[key], new[key])]
        elif key == SERIALIZED_KEY and isinstance(old[key], str) and isinstance(new[key], str):
            if old[key] != new[key]:  # plain strings: no need to encode megabytes of base64
                changed.append(key)
        elif json.dumps(old[key], indent=4) != json.dumps(new[key], indent=4):
            changed.append(key)
    return changed


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class MigrationPlan:
    """What migrating one checkpoint changes, worked out without writing anything.

    :param current: the file needs no change.
    :param data: the new ``data`` member (``None`` when current).
    :param facts: scaler class, removed state keys, sizes, named classes that
        do not import here.
    :param foreign: globals accepted although off the allow-list (see :func:`is_exempt`).
    """

    current: bool
    data: bytes | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)


def plan_migration(archive: CheckpointArchive) -> MigrationPlan:
    """Work out the migration of an open checkpoint (static: no torch, nothing executed).

    :raises MigrationError: unsafe (3), or unusable (2) input.
    :raises ArchiveError: the zip or ``data`` is unusable.
    """
    try:
        scan = scan_checkpoint(archive)
    except PickleScanError as exc:
        raise MigrationError(str(exc), EXIT_UNUSABLE) from None
    refused = _refusal(scan)
    if refused is not None:
        raise MigrationError(_describe_finding(refused), EXIT_UNSAFE)
    _check_named_only(archive, scan)
    foreign = sorted({f.global_name for f in scan.refused})
    data = archive.data
    entry = data.get(SCALER_ENTRY)
    if entry is None:
        reason = "the scaler is off" if SCALER_ENTRY in data else "no scaler entry"
        return MigrationPlan(True, facts={"reason": reason}, foreign=foreign)
    encoded = entry.get(SERIALIZED_KEY) if isinstance(entry, dict) else None
    if not isinstance(encoded, str):
        raise MigrationError(f"entry {SCALER_ENTRY!r} holds no pickle", EXIT_UNUSABLE)
    # Valid base64: the scan above decoded every entry already.
    payload = base64.b64decode(encoded)
    new_payload, facts = rewrite_scaler_pickle(payload)
    if new_payload is None:
        return MigrationPlan(True, facts=facts, foreign=foreign)
    del payload  # the old pickle can be large; the new one is all that is needed now
    text = archive.read_member(DATA_MEMBER).decode("utf-8")
    # Only the scaler's pickle changes. Its description keys (SB3 writes one per attribute of
    # the live object, `_parameters` included, whatever is pickled) stay as the current code
    # writes them.
    encoded = base64.b64encode(new_payload)
    del new_payload
    try:
        new_bytes = _edit_data_text(text, encoded, data)
    except ValueError as exc:
        raise MigrationError(f"cannot edit 'data': {exc}", EXIT_UNUSABLE) from None
    del text, encoded
    facts["data_bytes_before"] = archive.member(DATA_MEMBER).uncompressed_size
    facts["data_bytes_after"] = len(new_bytes)
    return MigrationPlan(False, data=new_bytes, facts=facts, foreign=foreign)


# ---------------------------------------------------------------------------------------------
# Writing the zip: raw copies of every member but one
# ---------------------------------------------------------------------------------------------


def _copy_range(src: IO[bytes], dst: IO[bytes], offset: int, length: int) -> None:
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
    if compress_type == zipfile.ZIP_STORED:
        return data
    compressor = zipfile._get_compressor(compress_type)  # type: ignore[attr-defined]
    return compressor.compress(data) + compressor.flush()


def _write_zip(src_path: Path, dst: IO[bytes], replace: dict[str, bytes]) -> None:
    """Write ``src_path`` to ``dst`` with the members in ``replace`` rewritten.

    Every other member is copied as raw bytes, local header included, in the same order; the
    central directory is the original's with offsets (and the replaced members' sizes and
    CRCs) updated.
    """
    with open(src_path, "rb") as src, zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir  # type: ignore[attr-defined]
        comment = zf.comment
        if len({info.filename for info in infos}) != len(infos):
            raise MigrationError("duplicate member names", EXIT_UNUSABLE)
        by_offset = sorted(infos, key=lambda info: info.header_offset)
        ends = [info.header_offset for info in by_offset[1:]] + [start_dir]
        new_offsets: dict[str, int] = {}
        new_sizes: dict[str, tuple[int, int, int]] = {}
        if by_offset and by_offset[0].header_offset > 0:
            _copy_range(src, dst, 0, by_offset[0].header_offset)
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
            new_offsets[info.filename] = dst.tell()
            if info.filename not in replace:
                _copy_range(src, dst, info.header_offset, end - info.header_offset)
                continue
            name_and_extra = src.read(name_len + extra_len)
            payload = replace[info.filename]
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

        central_start = dst.tell()
        src.seek(start_dir)
        for info in infos:
            record = src.read(_CENTRAL_HEADER.size)
            fields = list(_CENTRAL_HEADER.unpack(record))
            if fields[0] != _CENTRAL_SIG:
                raise MigrationError("bad central directory record", EXIT_UNUSABLE)
            name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
            name = src.read(name_len)
            extra = src.read(extra_len)
            member_comment = src.read(comment_len)
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
            dst.write(_CENTRAL_HEADER.pack(*fields) + name + extra + member_comment)
        central_size = dst.tell() - central_start
        if len(infos) > 0xFFFF or central_start >= _U32_MAX:
            raise MigrationError("the result would need a zip64 end record", 1)
        dst.write(
            _END_RECORD.pack(
                _END_SIG, 0, 0, len(infos), len(infos), central_size, central_start, len(comment)
            )
            + comment
        )


# ---------------------------------------------------------------------------------------------
# Files: temporary, synced, verified, renamed
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _temporary(folder: Path, name: str, mode: int) -> Iterator[tuple[IO[bytes], Path]]:
    """A new file in ``folder``, removed again unless the caller renamed it away."""
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as handle:
            with contextlib.suppress(OSError):
                os.fchmod(handle.fileno(), mode)
            yield handle, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# Temporaries older than this are no longer being written by a running migrate.
_STALE_AFTER_S: Final = 600.0


def _remove_stale_temporaries(folder: Path, name: str) -> int:
    """Remove temporaries that an interrupted run left for ``name`` in ``folder``.

    Only files named as :func:`_temporary` names them (``.NAME.<random>.migrate-tmp``),
    regular, and untouched for :data:`_STALE_AFTER_S`; anything else is left alone.
    """
    removed = 0
    now = time.time()
    for candidate in folder.glob(f".{glob.escape(name)}.*{_TMP_SUFFIX}"):
        try:
            info = candidate.lstat()
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime > _STALE_AFTER_S:
                candidate.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _publish(tmp: Path, dst: Path, *, force: bool) -> None:
    """Move ``tmp`` to ``dst`` atomically; without ``force`` never replace an existing file."""
    if force:
        os.replace(tmp, dst)
    else:
        try:
            os.link(tmp, dst)  # fails if dst exists: no window in which it could be clobbered
        except FileExistsError:
            raise MigrationError(f"{dst} exists; pass --force to replace it", 2) from None
        except OSError:
            if dst.exists():
                raise MigrationError(f"{dst} exists; pass --force to replace it", 2) from None
            os.replace(tmp, dst)
        else:
            tmp.unlink()
    fsync_directory(dst.parent)


def _make_backup(src: Path, backup: Path) -> None:
    """Create ``backup`` as a complete copy of ``src`` in one atomic step, never replacing."""
    try:
        os.link(src, backup)
    except FileExistsError:
        raise MigrationError(
            f"backup {backup} exists; remove it or choose --backup-suffix", 2
        ) from None
    except OSError:
        with _temporary(backup.parent, backup.name, stat.S_IMODE(src.stat().st_mode)) as (
            handle,
            tmp,
        ):
            with open(src, "rb") as original:
                shutil.copyfileobj(original, handle, _CHUNK)
            _sync(handle)
            _publish(tmp, backup, force=False)
    fsync_directory(backup.parent)


def _verify(path: Path, *, static: bool, foreign: Sequence[str]) -> FileReport:
    """Run the verify checks on the result: static always, load checks when the classes
    import (no class of the file is named from a foreign module) and ``static`` is off."""
    from dppo_ckpt.checkpoint.checks import run_checks

    static = static or bool(foreign)
    if static:
        report = run_checks(path, static=True)
    else:
        from dppo_ckpt.checkpoint.budgets import DEFAULT_BUDGETS
        from dppo_ckpt.checkpoint.isolation import crash_report, run_isolated

        # The load checks of the result run in a child: a crash fails this file only.
        timeout = DEFAULT_BUDGETS.timeout
        outcome = run_isolated(run_checks, os.fspath(path), timeout=timeout + 5)
        report = outcome.value if outcome.ok else crash_report(os.fspath(path), outcome, timeout)
    problems = []
    for result in report.results:
        if result.verdict not in (Verdict.FAIL, Verdict.ERROR):
            continue
        refused = result.details.get("refused")
        if (
            result.check_id == "DPPO004"
            and refused
            and all(item.get("global") in foreign for item in refused)
        ):
            continue  # the same named classes the input was accepted with
        problems.append(f"{result.check_id} {result.title}: {result.message}")
    if problems:
        raise MigrationError("the result does not verify: " + "; ".join(problems))
    return report


# ---------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------


@dataclass
class MigrationOutcome:
    """What happened to one checkpoint.

    :param source: the input as given.
    :param destination: where the result went (or would go).
    :param status: ``migrated``, ``already current``, ``would migrate``, ``failed``,
        ``unusable`` or ``refused``.
    :param message: one line.
    :param exit_code: 0, 1, 2 or 3, as for ``verify``.
    :param facts: what changed (or would): removed keys, sizes, scaler class.
    :param backup: the backup made by ``--in-place``.
    :param checks: the verify report of the result, when checks ran.
    """

    source: str
    destination: str | None
    status: str
    message: str
    exit_code: int
    facts: dict[str, Any] = field(default_factory=dict)
    backup: str | None = None
    checks: FileReport | None = None

    def to_dict(self) -> dict[str, Any]:
        checks = None
        if self.checks is not None:
            checks = {
                "exit_code": self.checks.exit_code,
                "results": {r.check_id: r.verdict.value for r in self.checks.results},
            }
        return {
            "source": self.source,
            "destination": self.destination,
            "status": self.status,
            "message": self.message,
            "exit_code": self.exit_code,
            "facts": self.facts,
            "backup": self.backup,
            "checks": checks,
        }


def _summary(facts: dict[str, Any], verb: str = "removed") -> str:
    removed = facts.get("removed_state_keys") or []
    parts = []
    if removed:
        part = f"{verb} {', '.join(removed)} from the scaler state"
        if facts.get("pickled_parameters"):
            part += f" ({facts['pickled_parameters']} stale parameter copies)"
        parts.append(part)
    before_version, after_version = (
        facts.get("state_version_before"),
        facts.get("state_version_after"),
    )
    if before_version is not None and before_version != after_version:
        upgrade = "upgraded" if verb == "removed" else "upgrade"
        parts.append(f"{upgrade} the scaler state from format {before_version} to {after_version}")
    text = "; ".join(parts) or "nothing to change in the scaler state"
    before, after = facts.get("data_bytes_before"), facts.get("data_bytes_after")
    if before is not None and after is not None:
        text += f"; data {before} -> {after} bytes"
    return text


def migrate_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str] | None = None,
    *,
    in_place: bool = False,
    backup_suffix: str = ".bak",
    dry_run: bool = False,
    force: bool = False,
    static: bool = False,
) -> MigrationOutcome:
    """Migrate one checkpoint; never raises for anything about the file.

    :param source: the legacy checkpoint.
    :param destination: where to write the result (not with ``in_place``).
    :param in_place: rewrite ``source`` itself, keeping ``source + backup_suffix``.
    :param backup_suffix: suffix of the backup made by ``in_place``.
    :param dry_run: work out and report the changes, write nothing.
    :param force: replace an existing ``destination``.
    :param static: verify the result with the static checks only (no torch import).
    """
    src = Path(source)
    dst = src if in_place else Path(destination) if destination is not None else None
    label = os.fspath(source)
    where = None if dst is None else os.fspath(dst)
    backup = Path(f"{src}{backup_suffix}") if in_place else None

    tidied: list[int] = []

    def outcome(status: str, message: str, code: int, **extra: Any) -> MigrationOutcome:
        if tidied and tidied[0]:
            message += f"; removed {tidied[0]} stale temporary file(s) of an interrupted run"
        return MigrationOutcome(label, where, status, message, code, **extra)

    try:
        if dst is None:
            raise UsageError("no destination: give NEW.zip, --out-dir or --in-place")
        if in_place and not backup_suffix:
            raise UsageError("--backup-suffix must not be empty")
        if not in_place and dst.is_dir():
            raise UsageError(f"{dst} is a folder; use --out-dir to write into it")
        if not in_place and dst.exists() and not force:
            raise MigrationError(f"{dst} exists; pass --force to replace it", EXIT_UNUSABLE)
        if not in_place and dst.exists() and dst.resolve() == src.resolve():
            raise UsageError("NEW is the same file as OLD; use --in-place")
        if not dst.parent.is_dir():
            raise UsageError(f"destination folder {dst.parent} does not exist")
        with open_checkpoint(src) as archive:
            plan = plan_migration(archive)
        del archive  # it caches the parsed `data`, which can be large
        if not dry_run:
            tidied.append(_remove_stale_temporaries(dst.parent, dst.name))
        facts = dict(plan.facts)
        if plan.foreign:
            facts["named_off_allow_list"] = plan.foreign
        if plan.current:
            if dry_run or in_place:
                return outcome("already current", "already current: nothing to change", 0,
                               facts=facts)  # fmt: skip
            mode = stat.S_IMODE(src.stat().st_mode)
            with _temporary(dst.parent, dst.name, mode) as (handle, tmp):
                with open(src, "rb") as original:
                    shutil.copyfileobj(original, handle, _CHUNK)
                _sync(handle)
                _publish(tmp, dst, force=force)
            return outcome("already current", "already current: copied unchanged", 0,
                           facts=facts)  # fmt: skip
        if backup is not None and (backup.exists() or backup.is_symlink()):
            raise MigrationError(
                f"backup {backup} exists; remove it or choose --backup-suffix", EXIT_UNUSABLE
            )
        if dry_run:
            return outcome("would migrate", "would " + _summary(facts, "remove"), 0, facts=facts,
                           backup=None if backup is None else os.fspath(backup))  # fmt: skip
        assert plan.data is not None
        mode = stat.S_IMODE(src.stat().st_mode)
        with _temporary(dst.parent, dst.name, mode) as (handle, tmp):
            _write_zip(src, handle, {DATA_MEMBER: plan.data})
            plan.data = None  # written; the checks below read the file afresh
            _sync(handle)
            report = _verify(tmp, static=static, foreign=plan.foreign)
            if backup is not None:
                _make_backup(src, backup)
            _publish(tmp, dst, force=force or in_place)
        return outcome("migrated", _summary(facts), EXIT_OK, facts=facts, checks=report,
                       backup=None if backup is None else os.fspath(backup))  # fmt: skip
    except MigrationError as exc:
        status = {EXIT_UNUSABLE: "unusable", EXIT_UNSAFE: "refused"}.get(exc.exit_code, "failed")
        return outcome(status, exc.reason, exc.exit_code)
    except ArchiveError as exc:
        return outcome("unusable", str(exc), EXIT_UNUSABLE)
    except CheckpointError as exc:
        return outcome("unusable", exc.reason, EXIT_UNUSABLE)
    except OSError as exc:
        # A folder that cannot be written, a full disk: the input could not be used as asked.
        where_ = f" {exc.filename}" if exc.filename else ""
        return outcome("unusable", f"cannot write{where_}: {exc.strerror or exc}", EXIT_UNUSABLE)
    except (UnicodeDecodeError, binascii.Error) as exc:
        return outcome("failed", f"{type(exc).__name__}: {exc}", EXIT_CHECK_FAILED)
    except Exception as exc:  # a hostile file must give an exit code, never a traceback
        return outcome("failed", f"unexpected {type(exc).__name__}: {exc}", EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------
# Several files
# ---------------------------------------------------------------------------------------------


def resolve_jobs(
    paths: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    recursive: bool = False,
) -> list[tuple[Path, Path | None]]:
    """Turn the command line into ``(source, destination)`` pairs.

    ``OLD NEW``; or inputs (files, or folders whose ``*.zip`` files are taken, those of
    subfolders too with ``recursive``) with ``out_dir`` (same file names) or ``in_place``
    (destination ``None``).

    :raises UsageError: any other combination, or two inputs that would land on one output.
    """
    if out_dir is not None and in_place:
        raise UsageError("--out-dir and --in-place exclude each other")
    if not paths:
        raise UsageError("no input given")
    if out_dir is None and not in_place:
        if len(paths) != 2:
            raise UsageError("give OLD.zip NEW.zip, or several inputs with --out-dir/--in-place")
        old, new = Path(paths[0]), Path(paths[1])
        if old.is_dir() or new.is_dir():
            raise UsageError("folders need --out-dir or --in-place")
        return [(old, new)]
    sources = checkpoint_files(paths, recursive=recursive)
    if in_place:
        return [(source, None) for source in sources]
    assert out_dir is not None
    target = Path(out_dir)
    if not target.is_dir():
        raise UsageError(f"--out-dir {target} is not a folder")
    jobs = [(source, target / source.name) for source in sources]
    seen: dict[Path, Path] = {}
    for source, dst in jobs:
        if dst in seen:
            raise UsageError(f"{seen[dst]} and {source} would both be written to {dst}")
        seen[dst] = source
    return jobs


def migrate_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    backup_suffix: str = ".bak",
    dry_run: bool = False,
    force: bool = False,
    static: bool = False,
    recursive: bool = False,
) -> tuple[list[MigrationOutcome], int]:
    """Migrate every input named on the command line; return the outcomes and the exit code
    (the worst of them: 3 > 2 > 1 > 0)."""
    try:
        jobs = resolve_jobs(paths, out_dir=out_dir, in_place=in_place, recursive=recursive)
    except UsageError as exc:
        bad = MigrationOutcome(", ".join(map(os.fspath, paths)), None, "unusable", exc.reason, 2)
        return [bad], EXIT_UNUSABLE
    outcomes = [
        migrate_file(
            source,
            dst,
            in_place=in_place,
            backup_suffix=backup_suffix,
            dry_run=dry_run,
            force=force,
            static=static,
        )
        for source, dst in jobs
    ]
    code = overall_exit_code(FileReport(o.source, [], o.exit_code) for o in outcomes)
    return outcomes, code
