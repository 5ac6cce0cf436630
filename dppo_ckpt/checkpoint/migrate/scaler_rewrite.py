"""Turn layout 1's pickled scaler into layout 2's ``vgs.pth``, executing nothing.

The scaler entry of ``data`` is decoded into inert stand-ins
(:mod:`dppo_ckpt.checkpoint.stub_pickle`). Its ``BUILD`` state (the pickled attributes, of
state format 1 or 2) becomes the current state dict exactly as unpickling and then
``VarianceGradientScaler.state_dict()`` would give it (:func:`dppo_ckpt.vgs_format.
pickled_to_state_dict`): parameter copies and the logger are left behind, a format-1 state is
upgraded. Each statistic tensor is a ``torch._utils._rebuild_tensor_v2`` call over a storage
that cloudpickle wrote as a nested legacy ``torch.save`` stream; its raw bytes are taken from
that stream as they are and written as a record of a torch zip archive, with the same
storage type, offset, size and stride. The new pickle names only what torch's weights-only
loader accepts, so SB3 reads the member as it reads ``policy.pth``.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from dppo_ckpt.checkpoint.migrate.errors import MigrationError
from dppo_ckpt.checkpoint.results import EXIT_UNUSABLE
from dppo_ckpt.checkpoint.stub_pickle import (
    RawBytes,
    StubCall,
    StubGlobal,
    StubPersistent,
    StubPickleError,
    stub_dumps,
    stub_loads,
    stub_model,
)
from dppo_ckpt.vgs_format import (
    LEGACY_STATE_KEYS,
    SCALER_ENTRY,
    SCALER_PARAMETER,
    STATE_FORMAT_VERSION,
    pickled_to_state_dict,
)

__all__ = ["SCALER_CLASS", "ScalerMember", "scaler_member", "scaler_state"]

#: The class the scaler entry must name (from any module: it is only named).
SCALER_CLASS: Final = "VarianceGradientScaler"
_REBUILD_TENSOR: Final = "torch._utils._rebuild_tensor_v2"
_LOAD_FROM_BYTES: Final = "torch.storage._load_from_bytes"
#: Bytes per element of the storage types a statistic tensor can have.
_ELEMENT_SIZE: Final = {
    "FloatStorage": 4,
    "DoubleStorage": 8,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
}
# torch's legacy stream: magic number, protocol, system info, the object, the storage keys,
# then each storage as an 8-byte element count and its raw bytes.
_LEGACY_MAGIC: Final = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL: Final = 1001
#: What torch's zip writer records as its format version.
_TORCH_ARCHIVE_VERSION: Final = b"3\n"
#: Pickle protocol of torch.save's data.pkl.
_PROTOCOL: Final = 2


def _stub(payload: bytes | memoryview, where: str) -> Any:
    try:
        return stub_loads(payload)
    except StubPickleError as exc:
        raise MigrationError(f"{where}: {exc}", EXIT_UNUSABLE) from None
    except RecursionError:
        raise MigrationError(f"{where}: the pickle nests too deeply", EXIT_UNUSABLE) from None


def scaler_state(root: Any) -> dict[str, Any]:
    """The ``BUILD`` state of a pickled scaler: ``cls.__new__(cls)`` then a dict state.

    :raises MigrationError: anything else (exit 2).
    """
    if not (
        isinstance(root, StubCall)
        and root.kind == "NEWOBJ"
        and isinstance(root.func, StubGlobal)
        and root.func.qualname == SCALER_CLASS
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


@dataclass
class _Storage:
    """One tensor storage: its type (a stand-in global), location and raw bytes."""

    storage_type: StubGlobal
    location: str
    numel: int
    raw: memoryview


def _legacy_storage(blob: memoryview, where: str) -> _Storage:
    """The storage a nested legacy ``torch.save`` stream holds, its bytes as a view."""
    roots, pos = [], 0
    try:
        for _ in range(5):
            model = stub_model(blob, start=pos)
            roots.append(model.root)
            pos = model.end
    except StubPickleError as exc:
        raise MigrationError(f"{where}: {exc}", EXIT_UNUSABLE) from None
    magic, protocol, sys_info, main, keys = roots
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise MigrationError(f"{where}: not a torch storage stream", EXIT_UNUSABLE)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
        raise MigrationError(f"{where}: only little-endian storages are supported", 2)
    pid = main.pid if isinstance(main, StubPersistent) else None
    if not (
        isinstance(pid, tuple)
        and len(pid) == 6
        and pid[0] == "storage"
        and isinstance(pid[1], StubGlobal)
        and pid[1].module == "torch"
        and pid[1].qualname in _ELEMENT_SIZE
        and isinstance(pid[2], str)
        and isinstance(pid[3], str)
        and type(pid[4]) is int
        and pid[5] is None
    ):
        raise MigrationError(f"{where}: not a plain float storage", EXIT_UNUSABLE)
    if keys != [pid[2]] or pos + 8 > len(blob):
        raise MigrationError(f"{where}: the storage stream is malformed", EXIT_UNUSABLE)
    (numel,) = struct.unpack_from("<q", blob, pos)
    size = numel * _ELEMENT_SIZE[pid[1].qualname]
    if numel != pid[4] or numel < 0 or pos + 8 + size != len(blob):
        raise MigrationError(f"{where}: the storage's size does not match its bytes", 2)
    return _Storage(pid[1], pid[3], numel, blob[pos + 8 : pos + 8 + size])


def _tensor(value: Any, where: str) -> tuple[Any, _Storage]:
    """A statistic tensor's ``_rebuild_tensor_v2`` call, and its storage."""
    if not (
        isinstance(value, StubCall)
        and value.kind == "REDUCE"
        and isinstance(value.func, StubGlobal)
        and value.func.name == _REBUILD_TENSOR
        and len(value.args) == 6
        and not value.ops
    ):
        raise MigrationError(f"{where} is not a plain tensor", EXIT_UNUSABLE)
    storage = value.args[0]
    if not (
        isinstance(storage, StubCall)
        and storage.kind == "REDUCE"
        and isinstance(storage.func, StubGlobal)
        and storage.func.name == _LOAD_FROM_BYTES
        and len(storage.args) == 1
        and isinstance(storage.args[0], RawBytes)
    ):
        raise MigrationError(f"{where}: its storage is not a nested storage stream", 2)
    return value, _legacy_storage(storage.args[0].view, where)


def _plain(value: Any) -> bool:
    """A value torch's weights-only loader reads as itself (NaN and infinities included)."""
    return value is None or isinstance(value, (bool, int, float, str))


def _statistics(values: Any, name: str, storages: list[_Storage]) -> Any:
    """``values`` (a list of tensors, or None) with every storage as a persistent id."""
    if values is None:
        return None
    if not isinstance(values, list):
        raise MigrationError(f"entry {SCALER_ENTRY!r}: {name} is not a list of tensors", 2)
    rebuilt = []
    for index, value in enumerate(values):
        call, storage = _tensor(value, f"entry {SCALER_ENTRY!r}: {name}[{index}]")
        pid = StubPersistent(
            ("storage", storage.storage_type, str(len(storages)), storage.location, storage.numel)
        )
        storages.append(storage)
        rebuilt.append(StubCall("REDUCE", call.func, (pid, *call.args[1:])))
    return rebuilt


def _torch_archive(prefix: str, pickled: bytes, storages: Iterable[_Storage]) -> memoryview:
    """A torch zip archive as ``torch.load`` reads it: ``data.pkl``, the byte order, one
    record per storage and the format version, stored uncompressed at a fixed date."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:

        def put(name: str, payload: bytes | memoryview) -> None:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with archive.open(info, "w") as stream:  # a view is written without a copy
                stream.write(payload)

        put("data.pkl", pickled)
        put("byteorder", b"little")
        for index, storage in enumerate(storages):
            put(f"data/{index}", storage.raw)
        put("version", _TORCH_ARCHIVE_VERSION)
    return buffer.getbuffer()  # no copy: statistics of a large policy run to gigabytes


@dataclass
class ScalerMember:
    """What a layout-1 scaler pickle becomes.

    :param pth: the bytes of ``vgs.pth`` (a view of the buffer they were written to).
    :param facts: the scaler class, the legacy keys left behind, how many parameter copies
        ``_parameters`` held, the state format before and after, sizes.
    """

    pth: memoryview
    facts: dict[str, Any]


def scaler_member(payload: bytes | memoryview) -> ScalerMember:
    """Rewrite a pickled scaler (layout 1's ``data`` entry, decoded from base64) as the
    ``vgs.pth`` member of layout 2, executing nothing; see the module docstring.

    :raises MigrationError: not a pickled scaler, a state format newer than this package
        writes, or statistics that are not plain tensors (exit 2).
    """
    root = _stub(payload, f"entry {SCALER_ENTRY!r}")
    state = scaler_state(root)
    version = state.get("_state_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MigrationError(f"entry {SCALER_ENTRY!r}: unknown state format {version!r}", 2)
    if version > STATE_FORMAT_VERSION:
        raise MigrationError(
            f"entry {SCALER_ENTRY!r}: state format {version} is newer than the supported "
            f"{STATE_FORMAT_VERSION}; upgrade dppo-ckpt to migrate it",
            EXIT_UNUSABLE,
        )
    removed = [key for key in LEGACY_STATE_KEYS if key in state]
    parameters = state.get("_parameters")
    kept = {key: value for key, value in state.items() if key not in LEGACY_STATE_KEYS}
    state_dict = pickled_to_state_dict(kept)
    for key, value in [*state_dict["config"].items(), *state_dict.items()]:
        if key not in ("config", "exp_avg", "exp_avg_sq") and not _plain(value):
            raise MigrationError(f"entry {SCALER_ENTRY!r}: {key} is not a plain value", 2)
    storages: list[_Storage] = []
    for key in ("exp_avg", "exp_avg_sq"):
        state_dict[key] = _statistics(state_dict[key], key, storages)
    try:
        pickled = stub_dumps(state_dict, _PROTOCOL)
    except (StubPickleError, RecursionError) as exc:
        raise MigrationError(f"entry {SCALER_ENTRY!r}: cannot write its state: {exc}") from None
    pth = _torch_archive(SCALER_PARAMETER, pickled, storages)
    facts: dict[str, Any] = {
        "scaler_class": root.func.name,
        "removed_state_keys": removed,
        "pickled_parameters": len(parameters) if isinstance(parameters, list) else 0,
        "state_version_before": version,
        "state_version_after": STATE_FORMAT_VERSION,
        "scaler_bytes_before": len(payload),
        "scaler_member_bytes": len(pth),
        "statistic_tensors": len(storages),
    }
    return ScalerMember(pth, facts)
