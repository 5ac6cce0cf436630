"""What a checkpoint holds, read without executing anything from it (``dppo-ckpt inspect``).

Everything here is static: the zip's member table, the ``data`` JSON, the text members and the
pickles as the one interpreter (:mod:`~dppo_ckpt.checkpoint.stub_pickle`) models them: every
class or function a pickle names is an inert stand-in that records its name, arguments and
state. Nothing is imported, called or constructed on behalf of the file, so the decoding is
safe whatever the pickle says. Neither torch nor numpy is imported.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Mapping
from typing import Any, Final

from dppo_ckpt._base64 import decode_strict
from dppo_ckpt.checkpoint.archive import (
    SERIALIZED_KEY,
    ArchiveError,
    CheckpointArchive,
    open_checkpoint,
)
from dppo_ckpt.checkpoint.metadata import layout_of
from dppo_ckpt.checkpoint.safe_pickle import ScanReport, scan_checkpoint
from dppo_ckpt.checkpoint.stub_pickle import StubCall, StubGlobal, StubPickleError, stub_model
from dppo_ckpt.vgs_format import (
    LEGACY_STATE_KEYS,
    SCALER_ENTRY,
    SCALER_MEMBER,
    state_dict_to_pickled,
)

__all__ = [
    "DPPO_DATA_KEYS",
    "DPPO_POLICY",
    "LEGACY_STATE_KEYS",
    "SCALER_ENTRY",
    "SCALER_MEMBER",
    "checkpoint_layout",
    "identify_algorithm",
    "inspect_checkpoint",
    "legacy_state_keys",
    "parse_system_info",
    "policy_class_name",
    "scaler_is_legacy",
    "scaler_model",
    "scaler_payload",
    "scaler_state_member",
    "scaler_summary",
    "state_dict_summary",
]

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
# SCALER_ENTRY (layout 1's pickled scaler in ``data``), SCALER_MEMBER (layout 2's state dict)
# and LEGACY_STATE_KEYS (state keys only earlier versions pickled: the parameter objects, the
# logger and a load-time flag; any of them means a legacy entry) come from vgs_format.


def checkpoint_layout(archive: CheckpointArchive) -> int:
    """The checkpoint layout the file records (1 when it records none): where the scaler's
    state lies, pickled in ``data`` (1) or as the tensor member ``vgs.pth`` (2).

    :raises ArchiveError: the layout is newer than this package reads, or the member is bad.
    """
    return layout_of(archive.metadata)


def scaler_state_member(archive: CheckpointArchive) -> dict[str, Any] | None:
    """Layout 2: the scaler's state dict as ``vgs.pth`` holds it, decoded code-free (tensors
    are stand-ins); ``None`` when the file has no such member.

    :raises ValueError: the member's pickle is corrupt or not a dict with string keys.
    """
    if SCALER_MEMBER not in archive:
        return None
    try:
        root = stub_model(archive.pth_data_pkl(SCALER_MEMBER)).root
    except StubPickleError as exc:
        raise ValueError(f"{SCALER_MEMBER}: cannot decode pickle: {exc}") from None
    if not (isinstance(root, dict) and all(isinstance(key, str) for key in root)):
        raise ValueError(f"{SCALER_MEMBER} does not hold a state dict")
    return root


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
    cached = archive.decoded_entry(SCALER_ENTRY)
    if cached is not None:
        return cached  # the scan decoded it already: not a second copy
    encoded = value[SERIALIZED_KEY]
    try:
        if not isinstance(encoded, str):
            raise TypeError(f"found {type(encoded).__name__}, not a string")
        # From the string itself (an ASCII str is its own buffer): no encoded copy of it.
        # base64.b64decode(..., validate=True) is this same call.
        return decode_strict(encoded)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ArchiveError(
            f"entry {SCALER_ENTRY!r}: ':serialized:' is not valid base64 ({exc})",
            path=archive.path,
            member="data",
        ) from None


def scaler_model(payload: bytes) -> tuple[str, dict[str, Any]]:
    """The class a pickled scaler names and its ``BUILD`` state, decoded code-free.

    :raises ValueError: the pickle is corrupt, or not an object with a state dict.
    """
    try:
        root = stub_model(payload).root
    except StubPickleError as exc:
        raise ValueError(f"cannot decode pickle: {exc}") from None
    if not (isinstance(root, StubCall) and isinstance(root.func, StubGlobal)):
        raise ValueError("the scaler entry is not a pickled object")
    states = root.states
    if len(states) != 1 or not isinstance(states[0], dict):
        raise ValueError("the scaler entry is not a pickled object with a state dict")
    return root.func.name, states[0]


def legacy_state_keys(state: Mapping[Any, Any]) -> list[str]:
    """The :data:`LEGACY_STATE_KEYS` a scaler state holds; the one rule for "legacy"."""
    return [key for key in LEGACY_STATE_KEYS if key in state]


def scaler_is_legacy(payload: bytes) -> bool:
    """Whether a pickled scaler is a legacy entry (see :data:`LEGACY_STATE_KEYS`).

    :raises ValueError: the pickle is corrupt or not a pickled scaler.
    """
    return bool(legacy_state_keys(scaler_model(payload)[1]))


def _tensor_size(value: Any) -> tuple[int, ...] | None:
    """The shape of a stand-in ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``."""
    if not (isinstance(value, StubCall) and isinstance(value.func, StubGlobal)):
        return None
    name = value.func.name
    if name == "torch._utils._rebuild_parameter" and value.args:
        return _tensor_size(value.args[0])
    if name == "torch._utils._rebuild_tensor_v2" and len(value.args) >= 3:
        size = value.args[2]
        if isinstance(size, StubCall) and size.args:  # torch.Size((...))
            size = size.args[0]
        if isinstance(size, tuple) and all(type(n) is int and n >= 0 for n in size):
            return size
    return None


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _plain(value: Any) -> Any:
    """A JSON-able copy of a decoded scalar value; anything else becomes a short description
    (never a full repr: a file can nest a value deeply enough to exhaust the stack)."""
    if value is None or isinstance(value, (bool, float, str)):
        return value if not isinstance(value, str) else value[:200]
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, (StubCall, StubGlobal)):
        name = (
            value.func.name
            if isinstance(value, StubCall) and isinstance(value.func, StubGlobal)
            else getattr(value, "name", "?")
        )
        return f"<{name}>"
    return f"<{type(value).__name__}>"


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
    class_name, state = scaler_model(payload)
    return _summary(class_name, state)


def state_dict_summary(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`scaler_summary` for a layout-2 state dict (:func:`scaler_state_member`)."""
    return _summary(f"state dict in {SCALER_MEMBER}", state_dict_to_pickled(state))


def _summary(class_name: str, state: dict[Any, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "class": class_name,
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
        "legacy": bool(legacy_state_keys(state)),
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
    try:
        if payload is not None:
            vgs = scaler_summary(payload)
        else:
            state = scaler_state_member(archive)
            vgs = None if state is None else state_dict_summary(state)
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
        "layout": layout_of(metadata),
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
                "count": f.count,
            }
            for f in scan.findings
        ],
    }


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a checkpoint without executing anything from it.

    :return: a JSON-able dict: ``path``, ``members`` (name, size, compressed size,
        compression), ``versions`` (SB3, torch, Python, ... as recorded), ``system_info``,
        ``numerics`` (the fingerprint of :mod:`dppo_ckpt.numerics`, or ``None``), ``layout``
        (1: the scaler pickled in ``data``; 2: its state dict in ``vgs.pth``),
        ``algorithm`` and ``policy_class`` (from the static scan), ``hyperparameters`` (the
        plain JSON values of ``data``), ``pickled_entries`` (their ``:type:``), ``vgs`` (the
        scaler's configuration and counters, or ``None``), ``legacy``, ``safe`` (every global
        allowed) and ``globals`` (every global referenced, where, and its verdict).
    :raises ArchiveError: the file is not a usable checkpoint (includes corrupt pickles).
    """
    with open_checkpoint(path) as archive:
        return inspect_archive(archive)
