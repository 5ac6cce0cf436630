"""What a checkpoint holds, read without executing anything from it (``dppo-ckpt inspect``).

Everything here is static: the zip's member table, the ``data`` JSON, the text members and the
pickle opcodes. Pickled values that a report needs (the Variance Gradient Scaler's
configuration and counters) are decoded by :func:`decode_stub`, an unpickler that resolves
*no* global at all: every class or function the pickle names becomes an inert stand-in that
only records its name and arguments. Nothing is imported, called or constructed on behalf of
the file, so the decoding is safe whatever the pickle says. Neither torch nor numpy is imported.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pickle
import pickletools
from collections.abc import Mapping
from typing import Any, Final

from dppo_ckpt.checkpoint.archive import (
    SERIALIZED_KEY,
    ArchiveError,
    CheckpointArchive,
    open_checkpoint,
)
from dppo_ckpt.checkpoint.safe_pickle import ScanReport, scan_checkpoint

__all__ = [
    "DPPO_DATA_KEYS",
    "DPPO_POLICY",
    "SCALER_ENTRY",
    "StubObject",
    "decode_stub",
    "identify_algorithm",
    "inspect_checkpoint",
    "parse_system_info",
    "policy_class_name",
    "scaler_has_pickled_parameters",
    "scaler_payload",
    "scaler_summary",
]

#: The ``data`` entry holding DistributionalPPO's pickled Variance Gradient Scaler.
SCALER_ENTRY: Final = "_variance_gradient_scaler"
#: ``data`` keys that only DistributionalPPO writes.
DPPO_DATA_KEYS: Final = frozenset({SCALER_ENTRY, "_rng_state", "critic"})
#: The policy class of DistributionalPPO, as a pickle names it.
DPPO_POLICY: Final = "dppo_ckpt.policy.CustomActorCriticPolicy"
_SB3_ACTOR_CRITIC: Final = frozenset(
    {
        "stable_baselines3.common.policies.ActorCriticPolicy",
        "stable_baselines3.common.policies.MultiInputActorCriticPolicy",
        "stable_baselines3.common.policies.ActorCriticCnnPolicy",
    }
)
_STRING_OPS: Final = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
)
_MEMO_OPS: Final = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})


# ---------------------------------------------------------------------------------------------
# Code-free decoding
# ---------------------------------------------------------------------------------------------


class StubObject:
    """Stand-in for an object a pickle builds: the global it names, its arguments, its state.

    Subclasses are made per global by :class:`_StubUnpickler`; ``stub_global`` names it.
    """

    stub_global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StubObject:
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments are recorded by __new__ (NEWOBJ calls only __new__, REDUCE calls both).
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self.stub_global}>"

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]


class _StubUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Resolves every global to a :class:`StubObject` subclass; imports and runs nothing.

    The pure-Python unpickler is used on purpose: its memo is a dict, so a hostile memo index
    cannot make it allocate a huge table the way the C unpickler's array memo would.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._stubs: dict[tuple[str, str], type[StubObject]] = {}

    def find_class(self, module: str, name: str) -> type[StubObject]:
        key = (str(module), str(name))
        stub = self._stubs.get(key)
        if stub is None:
            stub = type("Stub", (StubObject,), {"stub_global": f"{key[0]}.{key[1]}"})
            self._stubs[key] = stub
        return stub

    def persistent_load(self, pid: Any) -> Any:
        return ("<persistent id>", pid)


def decode_stub(payload: bytes) -> Any:
    """Decode a pickle without resolving any global: classes and functions become stubs.

    Safe on hostile input: nothing is imported, no callable of the file is called.

    :raises ValueError: the pickle is corrupt (any decoding failure, as one line).
    """
    try:
        return _StubUnpickler(io.BytesIO(payload)).load()
    except RecursionError:
        raise ValueError("pickle nests too deeply") from None
    except Exception as exc:
        raise ValueError(f"cannot decode pickle: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The Variance Gradient Scaler entry
# ---------------------------------------------------------------------------------------------


def scaler_payload(archive: CheckpointArchive) -> bytes | None:
    """The pickled scaler entry, base64-decoded on its own (``None`` when there is none).

    Decoding only this entry keeps memory low for large policies, whose other entries need
    not be decoded again.

    :raises ArchiveError: the payload is not valid base64.
    """
    value = archive.data.get(SCALER_ENTRY)
    if not (isinstance(value, dict) and SERIALIZED_KEY in value):
        return None
    encoded = value[SERIALIZED_KEY]
    try:
        if not isinstance(encoded, str):
            raise TypeError(f"found {type(encoded).__name__}, not a string")
        return base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, TypeError) as exc:
        raise ArchiveError(
            f"entry {SCALER_ENTRY!r}: ':serialized:' is not valid base64 ({exc})",
            path=archive.path,
            member="data",
        ) from None


def scaler_has_pickled_parameters(payload: bytes) -> bool:
    """Whether a pickled scaler carries parameter objects (``_parameters`` not ``None``).

    Read from the opcodes alone: the key ``"_parameters"`` followed (after an optional memo
    store) by anything but ``None``. This is the layout of checkpoints written before the
    scaler stopped pickling its parameters.

    :raises ValueError: the pickle is corrupt.
    """
    try:
        ops = pickletools.genops(io.BytesIO(payload))
        after_key = False
        for opcode, arg, _ in ops:
            name = opcode.name
            if after_key:
                if name in _MEMO_OPS:
                    continue
                if name != "NONE":
                    return True
                after_key = False
            if name in _STRING_OPS and arg == "_parameters":
                after_key = True
            if name == "STOP":
                break
    except Exception as exc:
        raise ValueError(f"cannot read pickle opcodes: {type(exc).__name__}: {exc}") from None
    return after_key


def _tensor_size(value: Any) -> tuple[int, ...] | None:
    """The shape of a stub ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` call."""
    if not isinstance(value, StubObject):
        return None
    if value.stub_global == "torch._utils._rebuild_parameter" and value.args:
        return _tensor_size(value.args[0])
    if value.stub_global == "torch._utils._rebuild_tensor_v2" and len(value.args) >= 3:
        size = value.args[2]
        if isinstance(size, StubObject) and size.args:  # torch.Size((...))
            size = size.args[0]
        if isinstance(size, tuple) and all(isinstance(n, int) and n >= 0 for n in size):
            return size
    return None


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _plain(value: Any) -> Any:
    """A JSON-able copy of a decoded scalar value (stubs become their description)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _factor_distribution(state: dict[Any, Any]) -> dict[str, Any]:
    """The shares of the updates after warm-up at each bound of the factor, and its mean."""
    steps = state.get("_post_warmup_steps")
    values = [state.get(key) for key in ("_at_min_steps", "_at_one_steps", "_scale_sum")]
    plain = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (steps, *values)]
    if not all(plain) or steps < 0:  # type: ignore[operator]
        return dict.fromkeys(("updates_after_warmup", "at_min_share", "at_one_share", "scale_mean"))
    at_min, at_one, total = values
    return {
        "updates_after_warmup": steps,
        "at_min_share": at_min / steps if steps else None,
        "at_one_share": at_one / steps if steps else None,
        "scale_mean": total / steps if steps else None,
    }


def scaler_summary(payload: bytes) -> dict[str, Any]:
    """Configuration, counters and buffer shapes of a pickled scaler, decoded code-free.

    :return: ``class``, ``state_version`` (1 for the format before the running level),
        ``config`` (the eight hyperparameters), ``step_count``, ``scaling_factor``,
        ``noise_ratio``, ``level``, the factor's distribution over the updates after warm-up
        (``updates_after_warmup``, ``at_min_share``, ``at_one_share``, ``scale_mean``; None
        in format 1, which did not count), ``tensors`` (number of statistic tensors per
        buffer), ``elements`` (their total element count) and ``legacy`` (parameter objects
        pickled inside).
    :raises ValueError: the pickle is corrupt or is not a pickled object with a state dict.
    """
    obj = decode_stub(payload)
    if not isinstance(obj, StubObject) or not isinstance(obj.state, dict):
        raise ValueError("the scaler entry is not a pickled object with a state dict")
    state = obj.state
    summary: dict[str, Any] = {
        "class": obj.stub_global,
        # Pickles without a version are format 1, from before the running level.
        "state_version": _plain(state.get("_state_version", 1)),
        # The scaler's hyperparameters are its only public attributes; counters, statistics
        # and links are private, so no copy of the key list is needed here.
        "config": {
            key: _plain(value)
            for key, value in state.items()
            if isinstance(key, str) and not key.startswith("_")
        },
        "step_count": _plain(state.get("_step_count")),
        "scaling_factor": _plain(state.get("_scaling_factor")),
        "noise_ratio": _plain(state.get("_noise_ratio")),
        "level": _plain(state.get("_level")),
        **_factor_distribution(state),
        "tensors": None,
        "elements": None,
        "legacy": state.get("_parameters") is not None,
    }
    exp_avg = state.get("_exp_avg")
    if isinstance(exp_avg, list):
        shapes = [_tensor_size(item) for item in exp_avg]
        summary["tensors"] = len(shapes)
        if all(shape is not None for shape in shapes):
            summary["elements"] = sum(_elements(shape) for shape in shapes)  # type: ignore[arg-type]
    return summary


# ---------------------------------------------------------------------------------------------
# Algorithm, policy, versions
# ---------------------------------------------------------------------------------------------


def policy_class_name(scan: ScanReport) -> str | None:
    """The class the ``policy_class`` entry names (its first global), from the static scan."""
    for finding in scan.findings:
        if finding.member == "data" and finding.entry == "policy_class" and not finding.path:
            return finding.global_name
    return None


def identify_algorithm(data: Mapping[str, Any], policy_class: str | None) -> str | None:
    """``"DistributionalPPO"``, ``"PPO"`` or ``None`` (unknown), from static facts only.

    The same rule :func:`~dppo_ckpt.checkpoint.safe_pickle.safe_load` applies: this package's
    policy class or a ``data`` key only DistributionalPPO writes; else an SB3 actor-critic
    policy with a ``clip_range`` is PPO.
    """
    if policy_class == DPPO_POLICY or DPPO_DATA_KEYS & data.keys():
        return "DistributionalPPO"
    if policy_class in _SB3_ACTOR_CRITIC and "clip_range" in data:
        return "PPO"
    return None


def parse_system_info(text: str) -> dict[str, str]:
    """``system_info.txt`` (``- Name: value`` lines, as SB3 writes it) as a dict."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") and ":" in line:
            key, _, value = line[2:].partition(":")
            info[key.strip()] = value.strip()
    return info


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def _hyperparameters(data: Mapping[str, Any]) -> dict[str, Any]:
    """The plain JSON values of ``data`` (pickled entries are listed separately)."""
    return {
        key: value
        for key, value in data.items()
        if not (isinstance(value, dict) and SERIALIZED_KEY in value)
    }


def _serialized_types(data: Mapping[str, Any]) -> dict[str, str | None]:
    return {
        key: (str(value[":type:"]) if ":type:" in value else None)
        for key, value in data.items()
        if isinstance(value, dict) and SERIALIZED_KEY in value
    }


def inspect_archive(archive: CheckpointArchive) -> dict[str, Any]:
    """Describe an open checkpoint; see :func:`inspect_checkpoint`."""
    data = archive.data
    scan = scan_checkpoint(archive)
    system_info: dict[str, str] = {}
    if "system_info.txt" in archive:
        system_info = parse_system_info(archive.text_member("system_info.txt"))
    metadata = archive.metadata
    policy_class = policy_class_name(scan)
    payload = scaler_payload(archive)
    vgs: dict[str, Any] | None = None
    if payload is not None:
        try:
            vgs = scaler_summary(payload)
            vgs["legacy"] = scaler_has_pickled_parameters(payload)
        except ValueError as exc:
            vgs = {"error": str(exc)}
    return {
        "path": archive.path,
        "members": [
            {
                "name": m.name,
                "size": m.uncompressed_size,
                "compressed_size": m.compressed_size,
                "compression": m.compression,
            }
            for m in archive.members
        ],
        "versions": {
            "stable_baselines3": archive.sb3_version,
            "torch": system_info.get("PyTorch"),
            "python": system_info.get("Python"),
            "numpy": system_info.get("Numpy"),
            "gymnasium": system_info.get("Gymnasium"),
            "cloudpickle": system_info.get("Cloudpickle"),
        },
        "system_info": system_info,
        "numerics": metadata["numerics"] if metadata is not None else None,
        "algorithm": identify_algorithm(data, policy_class),
        "policy_class": policy_class,
        "hyperparameters": _hyperparameters(data),
        "pickled_entries": _serialized_types(data),
        "vgs": vgs,
        "legacy": bool(vgs and vgs.get("legacy")),
        "safe": scan.ok,
        "globals": [
            {
                "global": f.global_name,
                "verdict": f.verdict.value,
                "member": f.member,
                "entry": f.entry,
                "path": list(f.path),
            }
            for f in scan.findings
        ],
    }


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a checkpoint without executing anything from it.

    :return: a JSON-able dict: ``path``, ``members`` (name, size, compressed size,
        compression), ``versions`` (SB3, torch, Python, ... as recorded), ``system_info``,
        ``numerics`` (the fingerprint of :mod:`dppo_ckpt.numerics`, or ``None``),
        ``algorithm`` and ``policy_class`` (from the static scan), ``hyperparameters`` (the
        plain JSON values of ``data``), ``pickled_entries`` (their ``:type:``), ``vgs`` (the
        scaler's configuration and counters, or ``None``), ``legacy``, ``safe`` (every global
        allowed) and ``globals`` (every global referenced, where, and its verdict).
    :raises ArchiveError: the file is not a usable checkpoint (includes corrupt pickles).
    """
    with open_checkpoint(path) as archive:
        return inspect_archive(archive)
