"""Scan and decode the pickles inside a stable-baselines3 checkpoint without running their code.

SB3's loader calls ``cloudpickle.loads`` on every ``:serialized:`` entry of ``data``, and a
tensor pickled inside such an entry is rebuilt through ``torch.storage._load_from_bytes``,
which calls ``torch.load`` *without* ``weights_only``. Either path executes whatever the file
says. This module provides, from cheapest to most complete:

- a static scanner (:func:`scan_pickle`, :func:`scan_checkpoint`) that walks the pickle opcodes
  of every ``:serialized:`` entry, of the ``data.pkl`` inside every ``.pth`` member and of the
  tensor blobs nested in them, and classifies every global they name against
  :data:`ALLOWED_GLOBALS`. It imports neither torch nor numpy and executes nothing;
- :class:`SafeUnpickler`, which resolves only allow-listed globals and rebuilds nested tensor
  blobs with ``torch.load(..., weights_only=True)``;
- :func:`decode_entries` and :func:`safe_load`, which decode every entry safely and hand them
  all to SB3's ``load(custom_objects=...)``, so that SB3 never unpickles file content itself
  (SB3 already reads ``.pth`` members with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import importlib
import io
import math
import os
import pickle
import re
import sys
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from dppo_ckpt.checkpoint.allowlist import UserEntry, entry_problem
from dppo_ckpt.checkpoint.archive import (
    DATA_MEMBER,
    ArchiveError,
    CheckpointArchive,
    CheckpointError,
    Limits,
    is_zip_bytes,
    open_checkpoint,
    open_torch_archive,
    read_checkpoint_bytes,
    torch_archive_pickles,
    torch_data_pkl_name,
)
from dppo_ckpt.checkpoint.budgets import DEFAULT_BUDGETS, BudgetExceeded, Budgets
from dppo_ckpt.checkpoint.materialise import (
    CALL_RULES,
    LOAD_FROM_BYTES_TOKEN,
    NDARRAY_TOKEN,
    NEW_EMPTY,
    LoadBudget,
    LoadBudgetExceeded,
    MaterialiseInvalid,
    MaterialiseRefused,
    checked,
    materialise,
)
from dppo_ckpt.checkpoint.stub_pickle import (
    PickleModel,
    RawBytes,
    ReadBudget,
    ReadBudgetExceeded,
    StubCall,
    StubGlobal,
    StubPersistent,
    StubPickleError,
    iter_stubs,
    stub_model,
)
from dppo_ckpt.vgs_format import SCALER_PARAMETER

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

__all__ = [
    "ALLOWED_GLOBALS",
    "CODE_BY_VALUE_GLOBALS",
    "Finding",
    "GlobalVerdict",
    "PickleScanError",
    "SafeUnpickler",
    "ScanReport",
    "UnsafePickleError",
    "classify_global",
    "decode_entries",
    "safe_load",
    "scan_checkpoint",
    "scan_pickle",
]

# ---------------------------------------------------------------------------------------------
# The allow-list
# ---------------------------------------------------------------------------------------------

_NUMPY_RANDOM_WHY = "gymnasium spaces pickle their numpy Generator (PCG64 seeded by a SeedSequence)"

#: Exact ``(module, qualified name)`` pairs the unpickler may resolve, each with the reason it
#: is needed. It is the smallest list that loads plain SB3 PPO checkpoints (Box, Discrete,
#: MultiDiscrete, MultiBinary and Dict spaces, with and without gSDE) and DistributionalPPO
#: checkpoints, found by scanning real ones. Whole packages are never allowed: numpy, torch,
#: stable_baselines3 and gymnasium each contain functions that run code or touch files. Every
#: entry here is a data type or a constructor that only builds data from its arguments.
ALLOWED_GLOBALS: Final[Mapping[tuple[str, str], str]] = MappingProxyType(
    {
        # -- containers ---------------------------------------------------------------------
        ("collections", "OrderedDict"): (
            "state dicts in .pth files, the backward-hook slot of every pickled tensor, "
            "and dict observations in _last_obs"
        ),
        ("collections", "deque"): "ep_info_buffer and ep_success_buffer",
        # -- numpy arrays, scalars and dtypes -----------------------------------------------
        ("numpy", "ndarray"): "array subtype argument of _reconstruct",
        ("numpy", "dtype"): "dtype of every pickled array and scalar",
        ("numpy._core.multiarray", "_reconstruct"): "arrays pickled with protocol < 5",
        ("numpy._core.numeric", "_frombuffer"): "arrays pickled with protocol 5 (_last_obs, "
        "_last_episode_starts, Box bounds)",
        ("numpy._core.multiarray", "scalar"): "numpy scalars (Discrete.n and start)",
        ("numpy.core.multiarray", "_reconstruct"): "numpy < 2 spelling (checkpoints saved "
        "with numpy 1.26, which this package supports)",
        ("numpy.core.numeric", "_frombuffer"): "numpy < 2 spelling",
        ("numpy.core.multiarray", "scalar"): "numpy < 2 spelling",
        ("numpy.random._pickle", "__generator_ctor"): _NUMPY_RANDOM_WHY,
        ("numpy.random._pickle", "__bit_generator_ctor"): _NUMPY_RANDOM_WHY,
        ("numpy.random._pcg64", "PCG64"): _NUMPY_RANDOM_WHY,
        ("numpy.random.bit_generator", "SeedSequence"): _NUMPY_RANDOM_WHY,
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): _NUMPY_RANDOM_WHY,
        # -- gymnasium spaces ---------------------------------------------------------------
        ("gymnasium.spaces.box", "Box"): "observation_space / action_space",
        ("gymnasium.spaces.discrete", "Discrete"): "observation_space / action_space",
        ("gymnasium.spaces.multi_discrete", "MultiDiscrete"): "observation_space / action_space",
        ("gymnasium.spaces.multi_binary", "MultiBinary"): "observation_space / action_space",
        ("gymnasium.spaces.dict", "Dict"): "dict observation spaces (MultiInputPolicy)",
        ("gymnasium.spaces.tuple", "Tuple"): "tuple spaces nested in Dict spaces",
        # -- stable-baselines3 --------------------------------------------------------------
        ("stable_baselines3.common.policies", "ActorCriticPolicy"): "policy_class of MlpPolicy",
        ("stable_baselines3.common.policies", "MultiInputActorCriticPolicy"): (
            "policy_class of MultiInputPolicy"
        ),
        ("stable_baselines3.common.policies", "ActorCriticCnnPolicy"): (
            "policy_class of CnnPolicy"
        ),
        ("stable_baselines3.common.torch_layers", "NatureCNN"): (
            "policy_kwargs features_extractor_class; SB3 builds it over the observation space"
        ),
        ("stable_baselines3.common.torch_layers", "CombinedExtractor"): (
            "policy_kwargs features_extractor_class (Dict observations)"
        ),
        ("stable_baselines3.common.torch_layers", "FlattenExtractor"): (
            "policy_kwargs features_extractor_class (SB3's default)"
        ),
        ("stable_baselines3.common.buffers", "RolloutBuffer"): "rollout_buffer_class",
        ("stable_baselines3.common.buffers", "DictRolloutBuffer"): (
            "rollout_buffer_class with dict observations"
        ),
        ("stable_baselines3.common.utils", "FloatSchedule"): "lr_schedule and clip_range",
        ("stable_baselines3.common.utils", "ConstantSchedule"): "constant learning_rate / "
        "clip_range wrapped by FloatSchedule",
        ("stable_baselines3.common.utils", "LinearSchedule"): "linear learning_rate / clip_range",
        # -- torch: tensors ------------------------------------------------------------------
        ("torch._utils", "_rebuild_tensor_v2"): "every pickled tensor (backward hooks refused)",
        ("torch._utils", "_rebuild_parameter"): (
            "pickled Parameters, e.g. the _parameters of a legacy gradient scaler"
        ),
        ("torch.storage", "_load_from_bytes"): (
            "tensor storage pickled inside data entries; replaced by a "
            "torch.load(weights_only=True) that runs no code"
        ),
        ("torch", "FloatStorage"): "storage tag of float32 tensors",
        ("torch", "DoubleStorage"): "storage tag of float64 tensors",
        ("torch", "HalfStorage"): "storage tag of float16 tensors",
        ("torch", "BFloat16Storage"): "storage tag of bfloat16 tensors",
        ("torch", "LongStorage"): "storage tag of int64 tensors",
        ("torch", "IntStorage"): "storage tag of int32 tensors",
        ("torch", "ShortStorage"): "storage tag of int16 tensors",
        ("torch", "CharStorage"): "storage tag of int8 tensors",
        ("torch", "ByteStorage"): "storage tag of uint8 tensors",
        ("torch", "BoolStorage"): "storage tag of bool tensors",
        # -- torch: values policy_kwargs may hold -------------------------------------------
        ("torch.nn.modules.activation", "Tanh"): "policy_kwargs activation_fn (SB3 default)",
        ("torch.nn.modules.activation", "ReLU"): "policy_kwargs activation_fn",
        **{
            ("torch.nn.modules.activation", name): (
                "policy_kwargs activation_fn; a class value only, never called by the loader"
            )
            for name in ("ELU", "LeakyReLU", "GELU", "SiLU", "Mish", "Sigmoid", "Softplus")
        },
        ("torch.nn.modules.linear", "Identity"): "policy_kwargs activation_fn (no activation)",
        ("torch.optim.adam", "Adam"): "policy_kwargs optimizer_class (SB3 default)",
        ("torch.optim.adamw", "AdamW"): "policy_kwargs optimizer_class; a class value only",
        ("torch.optim.sgd", "SGD"): "policy_kwargs optimizer_class; a class value only",
        ("torch.optim.rmsprop", "RMSprop"): "policy_kwargs optimizer_class; a class value only",
        ("stable_baselines3.common.sb2_compat.rmsprop_tf_like", "RMSpropTFLike"): (
            "policy_kwargs optimizer_class (SB3's TF-compatible RMSprop); a class value only"
        ),
        ("torch", "device"): "a device stored in a kwargs dict",
        ("torch", "float32"): "a dtype stored in a kwargs dict",
        ("torch", "float64"): "a dtype stored in a kwargs dict",
        ("torch", "float16"): "a dtype stored in a kwargs dict",
        ("torch", "bfloat16"): "a dtype stored in a kwargs dict",
        ("torch", "int64"): "a dtype stored in a kwargs dict",
        ("torch", "int32"): "a dtype stored in a kwargs dict",
        ("torch", "uint8"): "a dtype stored in a kwargs dict",
        ("torch", "bool"): "a dtype stored in a kwargs dict",
        # -- this package --------------------------------------------------------------------
        ("dppo_ckpt.vgs", "VarianceGradientScaler"): (
            "DistributionalPPO's _variance_gradient_scaler (config, counters, tensor buffers)"
        ),
        ("dppo_ckpt.policy", "CustomActorCriticPolicy"): "policy_class of DistributionalPPO",
        ("dppo_ckpt.policy", "DistributionalCnnPolicy"): "policy_class of its CnnPolicy",
        ("dppo_ckpt.policy", "DistributionalMultiInputPolicy"): (
            "policy_class of its MultiInputPolicy"
        ),
        ("dppo_ckpt.buffers", "DistributionalRolloutBuffer"): (
            "rollout_buffer_class of DistributionalPPO"
        ),
        ("dppo_ckpt.buffers", "DistributionalDictRolloutBuffer"): (
            "rollout_buffer_class of DistributionalPPO with Dict observations"
        ),
    }
)

#: Modules whose every function rebuilds code pickled by value (cloudpickle's reconstructors).
_CODE_BY_VALUE_MODULES: Final[frozenset[str]] = frozenset(
    {"cloudpickle", "cloudpickle.cloudpickle", "cloudpickle.cloudpickle_fast", "cloudpickle_fast"}
)

#: Globals that build or run code from pickle data: functions, code objects, classes pickled
#: by value, and the builtins that evaluate, import or look up arbitrary attributes. Any
#: global of a module in ``_CODE_BY_VALUE_MODULES`` also counts.
CODE_BY_VALUE_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("types", "CodeType"),
        ("types", "FunctionType"),
        ("types", "LambdaType"),
        ("types", "MethodType"),
        ("types", "CellType"),
        ("types", "ModuleType"),
        ("marshal", "loads"),
        ("pickle", "loads"),
        ("_pickle", "loads"),
        ("importlib", "import_module"),
        *(
            (module, name)
            for module in ("builtins", "__builtin__")
            for name in (
                "eval",
                "exec",
                "compile",
                "getattr",
                "setattr",
                "__import__",
                "globals",
                "vars",
                "breakpoint",
            )
        ),
    }
)

_LOAD_FROM_BYTES: Final = ("torch.storage", "_load_from_bytes")
# numpy >= 2 keeps the numpy 1.x module paths as deprecated shims; resolve the real objects.
_NUMPY_ALIASES: Final[Mapping[tuple[str, str], tuple[str, str]]] = MappingProxyType(
    {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    }
)
# torch.load reads exactly these many pickles at the start of a legacy (non-zip) stream:
# magic number, protocol version, system info, the object, the list of storage keys.
_LEGACY_STREAM_PICKLES: Final = 5
_LEGACY_OBJECT_PICKLE: Final = 3
_DEFAULT_MAX_DEPTH: Final = 3


class GlobalVerdict(str, Enum):
    """What the scanner concluded about one global named by a pickle."""

    ALLOWED = "allowed"
    """On :data:`ALLOWED_GLOBALS`."""
    NOT_ALLOWED = "not allowed"
    """A named class or function off the allow-list."""
    CODE_BY_VALUE = "code by value"
    """Rebuilds or runs code carried in the pickle itself (cloudpickle functions, CodeType)."""
    DYNAMIC = "dynamic"
    """Cannot be resolved statically: a STACK_GLOBAL whose operands are not literal strings,
    a tensor blob that is not a literal, or nesting beyond the depth bound."""


def classify_global(
    module: str, name: str, allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS
) -> GlobalVerdict:
    """Classify the global ``module.name`` against ``allow`` (exact pairs only)."""
    if (module, name) in allow:
        return GlobalVerdict.ALLOWED
    if module in _CODE_BY_VALUE_MODULES or (module, name) in CODE_BY_VALUE_GLOBALS:
        return GlobalVerdict.CODE_BY_VALUE
    return GlobalVerdict.NOT_ALLOWED


# ---------------------------------------------------------------------------------------------
# Errors and results
# ---------------------------------------------------------------------------------------------


def _where(member: str, entry: str | None) -> str:
    return f"member {member!r}, entry {entry!r}" if entry is not None else f"member {member!r}"


class PickleScanError(ArchiveError):
    """A pickle in the checkpoint is corrupt or cannot be decoded (exit code 2).

    :param reason: one line saying what is wrong.
    :param member: zip member holding the pickle (``"data"`` for ``:serialized:`` entries).
    :param entry: the ``data`` entry, or ``None`` for ``.pth`` members.
    :param path: nesting path below the member (inner pickle names, tensor blobs).
    :param findings: globals found before the error, so a refusal can still name them.
    """

    def __init__(
        self,
        reason: str,
        *,
        member: str,
        entry: str | None = None,
        path: tuple[str, ...] = (),
        findings: tuple[Finding, ...] = (),
    ) -> None:
        self.entry = entry
        self.nesting = path
        self.findings = findings
        inside = f" ({' > '.join(path)})" if path else ""
        super().__init__(f"{_where(member, entry)}{inside}: {reason}", member=member)


class UnsafePickleError(CheckpointError):
    """A pickle in the checkpoint names a global the allow-list refuses (exit code 3).

    The message is one line naming the member, the entry and the global.

    :param member: zip member (``"data"``, ``"policy.pth"``, ...).
    :param entry: the ``data`` entry, or ``None`` for ``.pth`` members.
    :param global_name: ``"module.qualname"`` of the refused global.
    :param verdict: why it was refused.
    :param path: nesting path below the member.
    :param detail: extra context (e.g. the message of torch's own refusal).
    """

    def __init__(
        self,
        member: str,
        entry: str | None,
        global_name: str,
        verdict: GlobalVerdict = GlobalVerdict.NOT_ALLOWED,
        *,
        path: tuple[str, ...] = (),
        detail: str | None = None,
    ) -> None:
        self.member = member
        self.entry = entry
        self.global_name = global_name
        self.verdict = verdict
        self.nesting = path
        why = {
            GlobalVerdict.NOT_ALLOWED: "is not on the allow-list",
            GlobalVerdict.CODE_BY_VALUE: (
                "is code pickled by value (load with trust only if you trust this file)"
            ),
            GlobalVerdict.DYNAMIC: "cannot be resolved without running the pickle",
            GlobalVerdict.ALLOWED: "was refused",
        }[verdict]
        inside = f" ({' > '.join(path)})" if path else ""
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"unsafe pickle in {_where(member, entry)}{inside}: {global_name} {why}{extra}"
        )


@dataclass(frozen=True)
class Finding:
    """One global named by one pickle of the checkpoint.

    :param member: zip member holding the pickle.
    :param entry: ``data`` entry name, ``None`` for ``.pth`` members.
    :param global_name: ``"module.qualname"`` (or a ``<...>`` description when dynamic).
    :param verdict: the classification.
    :param path: nesting below the member: inner pickle name (``archive/data.pkl``), tensor
        blobs (``tensor blob at byte N``) and the pickle within a legacy stream.
    :param count: how many times the pickle names it there.
    """

    member: str
    entry: str | None
    global_name: str
    verdict: GlobalVerdict
    path: tuple[str, ...] = ()
    count: int = 1

    @property
    def allowed(self) -> bool:
        return self.verdict is GlobalVerdict.ALLOWED


@dataclass(frozen=True)
class ScanReport:
    """Everything the static scan found.

    :param findings: every distinct (member, entry, global, verdict, path), in file order.
    :param pickles_scanned: how many pickles were walked, nested ones included.
    """

    findings: tuple[Finding, ...] = ()
    pickles_scanned: int = 0

    @property
    def ok(self) -> bool:
        """True when every global is allowed."""
        return all(f.allowed for f in self.findings)

    @property
    def refused(self) -> tuple[Finding, ...]:
        """The findings that are not allowed, in file order."""
        return tuple(f for f in self.findings if not f.allowed)

    @property
    def globals_referenced(self) -> frozenset[str]:
        """Names of every global referenced anywhere."""
        return frozenset(f.global_name for f in self.findings)


# ---------------------------------------------------------------------------------------------
# Static scan: analyses of the interpreter's output
# ---------------------------------------------------------------------------------------------

_NUMPY_DTYPE: Final = ("numpy", "dtype")
# Replacements written by this package, callable in data entries whatever CALL_RULES says.
_REBUILDS: Final = frozenset(
    {
        _LOAD_FROM_BYTES,
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
    }
)


# Type codes that name their kind without a size, as numpy reads them.
_BARE_DTYPE_CODES: Final = {
    "b": ("i", 1), "?": ("b", 1), "i": ("i", 4), "f": ("f", 4), "c": ("S", 1),
    "M": ("M", 8), "m": ("m", 8), "S": ("S", 0), "U": ("U", 0),
}  # fmt: skip
_DTYPE_CODE_PARTS: Final = re.compile(r"([<>=|]?)([biufcmMSU?])(\d*)(?:\[([A-Za-z]+)\])?")
_DTYPE_NAME_PARTS: Final = re.compile(r"(bool)|(u?int|float|complex)(8|16|32|64|128)")
_NAME_KINDS: Final = {"int": "i", "uint": "u", "float": "f", "complex": "c"}


def _dtype_code_parts(code: str) -> tuple[str, str, int, str | None] | None:
    """``(byte order prefix, kind, size, datetime unit)`` of a plain type code, or None.

    ``size`` is the item size in bytes, or the length for ``S`` and ``U``.
    """
    named = _DTYPE_NAME_PARTS.fullmatch(code)
    if named:
        if named.group(1):
            return "", "b", 1, None
        return "", _NAME_KINDS[named.group(2)], int(named.group(3)) // 8, None
    parts = _DTYPE_CODE_PARTS.fullmatch(code)
    if not parts:
        return None
    order, kind, digits, unit = parts.groups()
    if unit is not None and kind not in "Mm":
        return None
    if not digits:
        if kind not in _BARE_DTYPE_CODES:
            return None
        kind, size = _BARE_DTYPE_CODES[kind]
        return order, kind, size, unit
    return order, "b" if kind == "?" else kind, int(digits), unit


def _numpy_dtype_state(code: str) -> tuple[Any, ...] | None:
    """The state numpy itself pickles for ``numpy.dtype(code)``, worked out without numpy
    (the full loader compares with numpy's own ``__reduce__``), or None if not a plain code."""
    parts = _dtype_code_parts(code)
    if parts is None:
        return None
    order, kind, size, unit = parts
    native = "<" if sys.byteorder == "little" else ">"
    if kind == "S" or (kind != "U" and size == 1):
        byteorder = "|"
    else:
        byteorder = order if order in "<>" and order else native
    elsize, alignment = {"S": (size, 1), "U": (4 * size, 4)}.get(kind, (-1, -1))
    state: tuple[Any, ...] = (
        3, byteorder, None, None, None, elsize, alignment, 8 if kind == "U" else 0
    )  # fmt: skip
    if kind in "Mm":
        unit_bytes = unit.encode() if unit else b"generic"
        state = (4, *state[1:], (None, (unit_bytes, 1, 1, 1)))
    return state


def _plain_value(value: Any) -> Any:
    if isinstance(value, RawBytes):
        return value.tobytes()
    if isinstance(value, tuple):
        return tuple(_plain_value(item) for item in value)
    return value


def _crafted_dtype(args: Any, state: Any) -> bool:
    """True unless a dtype BUILD's state is exactly the one numpy pickles for its type code.

    ``dtype.__setstate__`` trusts the state's field offsets, item size and flags (a
    "holds references" flag on ``u1`` makes numpy decref raw bytes), so the static scan
    refuses what the loader refuses: anything but numpy's own state for the code.
    """
    kind = args[0] if isinstance(args, tuple) and args else None
    if not isinstance(kind, str):
        return True
    expected = _numpy_dtype_state(kind)
    return expected is None or _plain_value(state) != expected


_ARRAY_BUILDERS: Final = frozenset(
    {
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "scalar"),
    }
)
# The rebuild functions of tensors, with the index of their backward-hooks argument.
_TENSOR_REBUILDS: Final = {
    ("torch._utils", "_rebuild_tensor_v2"): 5,
    ("torch._utils", "_rebuild_parameter"): 2,
}
_RECONSTRUCT: Final = frozenset(
    {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")}
)
# numpy type codes of plain numeric and string dtypes (never object, void or structured).
_PLAIN_DTYPE_CODE: Final = re.compile(
    r"[<>=|]?[biufcmMSU?]\d*(\[\w+\])?|bool|(u?int|float|complex)(8|16|32|64|128)"
)


def rules_for(allow: Mapping[tuple[str, str], Any]) -> Mapping[tuple[str, str], Any]:
    """How each global of ``allow`` may be used: the built-in rules, and for the user's own
    entries (pairs beyond :data:`ALLOWED_GLOBALS`) creation empty plus a checked ``BUILD``."""
    extra = {pair: NEW_EMPTY for pair in allow if pair not in ALLOWED_GLOBALS}
    return {**CALL_RULES, **extra} if extra else CALL_RULES


def _rule_violation(call: StubCall, rules: Mapping[tuple[str, str], Any]) -> str | None:
    """Why this call of an allowed global breaks the global's rule, or None.

    The static half of :mod:`~dppo_ckpt.checkpoint.materialise`'s rules, so that ``--static``
    refuses what the loader would refuse without building anything.
    """
    func = call.func
    key = (func.module, func.qualname)
    rule = rules.get(key)
    if key == _NUMPY_DTYPE and call.args:
        code = call.args[0]
        if not isinstance(code, str) or not _PLAIN_DTYPE_CODE.fullmatch(code):
            return f"<numpy.dtype of type code {str(code)[:20]!r}, not a plain dtype>"
        parts = _dtype_code_parts(code)
        if parts is not None and parts[2] == 0:
            # The loader refuses items of no size (S0, U0) as well.
            return f"<numpy.dtype of type code {code!r}, items of no size>"
    if key in _ARRAY_BUILDERS and call.ops:
        return f"<BUILD on a numpy array made by {func.name}>"
    if key in _RECONSTRUCT:
        first = call.args[0] if call.args else None
        if not (isinstance(first, StubGlobal) and first.name == "numpy.ndarray"):
            return f"<{func.name} of something other than numpy.ndarray>"
        if [op for op, _ in call.ops] != ["build"]:
            return f"<{func.name} without exactly one state>"
    if key in _TENSOR_REBUILDS:
        if call.ops:
            return "<BUILD on a tensor (it could install backward hooks)>"
        hooks = call.args[_TENSOR_REBUILDS[key]] if len(call.args) > _TENSOR_REBUILDS[key] else None
        if (isinstance(hooks, StubCall) and hooks.ops) or (isinstance(hooks, dict) and hooks):
            return f"<{func.name} of a tensor with backward hooks>"
    if call.kind in ("NEWOBJ", "NEWOBJ_EX"):
        if rule is not NEW_EMPTY or call.args or call.kwargs:
            return f"<{func.name} created by {call.kind}, allowed only as a value>"
        return None
    if key in _REBUILDS or (rule is not None and rule is not NEW_EMPTY):
        return None
    return f"<{func.name} called, allowed only as a value>"


@dataclass
class _Scanner:
    """Runs the analyses over the models of every pickle of one file.

    Each pickle is decoded once (:func:`~dppo_ckpt.checkpoint.stub_pickle.stub_model`);
    findings are counted per global, never stored per opcode. ``models`` keeps the decoded
    ``data`` entries, so that the loader builds objects from exactly what was scanned.
    """

    allow: Mapping[tuple[str, str], Any]
    limits: Limits
    budgets: Budgets
    max_depth: int = _DEFAULT_MAX_DEPTH
    tally: Any = None
    read_budget: ReadBudget = field(init=False)
    rules: Mapping[tuple[str, str], Any] = field(init=False)
    findings: dict[tuple[Any, ...], Finding] = field(default_factory=dict)
    models: dict[str, PickleModel] = field(default_factory=dict)
    pth_roots: dict[str, Any] = field(default_factory=dict)
    pickles_scanned: int = 0
    blobs: int = 0

    def __post_init__(self) -> None:
        self.read_budget = self.budgets.read_budget()
        self.rules = rules_for(self.allow)

    def record(
        self,
        member: str,
        entry: str | None,
        global_name: str,
        verdict: GlobalVerdict,
        path: tuple[str, ...],
        count: int = 1,
    ) -> None:
        key = (member, entry, global_name, verdict, path)
        seen = self.findings.get(key)
        total = count + (seen.count if seen is not None else 0)
        self.findings[key] = Finding(member, entry, global_name, verdict, path, total)

    def report(self) -> ScanReport:
        return ScanReport(tuple(self.findings.values()), self.pickles_scanned)

    def _record_globals(
        self, seen: Mapping[tuple[str, str], int], member: str, entry: str | None,
        path: tuple[str, ...],
    ) -> None:  # fmt: skip
        for (module, name), count in seen.items():
            verdict = classify_global(module, name, self.allow)
            self.record(member, entry, f"{module}.{name}", verdict, path, count)

    # -- one pickle ----------------------------------------------------------------------

    def scan(
        self,
        data: bytes | memoryview,
        *,
        member: str,
        entry: str | None,
        path: tuple[str, ...] = (),
        start: int = 0,
        depth: int = 0,
    ) -> PickleModel:
        """Decode and analyse the pickle at ``start`` of ``data``."""
        self.pickles_scanned += 1
        try:
            model = stub_model(data, start=start, budget=self.read_budget)
        except ReadBudgetExceeded as exc:
            raise BudgetExceeded(exc.budget, f"{_where(member, entry)}: {exc}") from None
        except StubPickleError as exc:
            # What was read before the damage still counts: an unsafe global found earlier
            # in the stream is reported as unsafe, not hidden behind "corrupt".
            self._record_globals(exc.globals_seen, member, entry, path)
            raise PickleScanError(
                f"corrupt pickle: {exc}",
                member=member,
                entry=entry,
                path=path,
                findings=self.report().findings,
            ) from None
        self._analyse(model, member, entry, path, depth)
        return model

    def _analyse(
        self, model: PickleModel, member: str, entry: str | None, path: tuple[str, ...],
        depth: int,
    ) -> None:  # fmt: skip
        self._record_globals(model.globals_seen, member, entry, path)
        for name in model.dynamic:
            self.record(member, entry, f"<dynamic global {name}>", GlobalVerdict.DYNAMIC, path)
        for name in model.builds_on_globals:
            # BUILD on a bare global rewrites the class or function itself.
            self.record(member, entry, f"<BUILD on {name}>", GlobalVerdict.NOT_ALLOWED, path)
        for code in model.extensions:
            # The copyreg extension registry maps codes to globals outside the file.
            self.record(
                member, entry, f"<copyreg extension {code}>", GlobalVerdict.NOT_ALLOWED, path
            )
        checks_rules = member == DATA_MEMBER and depth == 0
        for index, obj in enumerate(iter_stubs(model.root)):
            if index % 65536 == 65535:
                self.read_budget.spend(0)  # the clock, on very large graphs
            if checks_rules and isinstance(obj, StubPersistent):
                # Only torch's own archives resolve persistent ids; the loader refuses them.
                self.record(
                    member, entry, "<persistent id in a data entry>",
                    GlobalVerdict.NOT_ALLOWED, path,
                )  # fmt: skip
            if not isinstance(obj, StubCall):
                continue
            func = obj.func
            if not isinstance(func, StubGlobal):
                self.record(
                    member, entry, "<call of a value built by the pickle>",
                    GlobalVerdict.DYNAMIC, path,
                )  # fmt: skip
                continue
            key = (func.module, func.qualname)
            if key == _NUMPY_DTYPE and any(_crafted_dtype(obj.args, s) for s in obj.states):
                self.record(
                    member, entry, "<BUILD with a crafted numpy.dtype state>",
                    GlobalVerdict.NOT_ALLOWED, path,
                )  # fmt: skip
            if key == _LOAD_FROM_BYTES:
                self.blobs += 1
                self._blob(obj.args, member, entry, (*path, f"tensor blob {self.blobs}"), depth)
            if checks_rules and classify_global(*key, self.allow) is GlobalVerdict.ALLOWED:
                violation = _rule_violation(obj, self.rules)
                if violation is not None:
                    self.record(member, entry, violation, GlobalVerdict.NOT_ALLOWED, path)

    # -- nested tensor blobs -------------------------------------------------------------

    def _blob(
        self, args: Any, member: str, entry: str | None, path: tuple[str, ...], depth: int
    ) -> None:
        """Scan the bytes given to ``torch.storage._load_from_bytes``: a torch.save stream,
        legacy (consecutive pickles, then raw storage) or zip."""
        if not (len(args) == 1 and isinstance(args[0], (RawBytes, bytearray))):
            self.record(
                member, entry, "<torch.storage._load_from_bytes of a non-literal argument>",
                GlobalVerdict.DYNAMIC, path,
            )  # fmt: skip
            return
        if depth + 1 > self.max_depth:
            self.record(
                member, entry, f"<tensor blob nested deeper than {self.max_depth} levels>",
                GlobalVerdict.DYNAMIC, path,
            )  # fmt: skip
            return
        blob = args[0].view if isinstance(args[0], RawBytes) else memoryview(args[0])
        self.scan_torch_stream(blob, member=member, entry=entry, path=path, depth=depth + 1)

    def scan_torch_stream(
        self,
        blob: bytes | memoryview,
        *,
        member: str,
        entry: str | None,
        path: tuple[str, ...],
        depth: int,
    ) -> Any:
        """Scan what ``torch.load`` would unpickle from ``blob``.

        :return: the model of the object a legacy stream holds (its fourth pickle), the one
            SB3 uses; None for a zip archive, whose ``data.pkl`` the caller names itself.
        """
        if is_zip_bytes(bytes(blob[:4])):
            try:
                with open_torch_archive(
                    bytes(blob), self.limits, " > ".join((member, *path)), self.tally
                ) as inner:
                    pickles = torch_archive_pickles(inner)
            except PickleScanError:
                raise
            except ArchiveError as exc:
                raise PickleScanError(
                    f"nested torch archive: {exc.reason}", member=member, entry=entry, path=path
                ) from None
            for inner_name, data in pickles.items():
                self.scan(data, member=member, entry=entry, path=(*path, inner_name), depth=depth)
            return None
        offset, root = 0, None
        for index in range(_LEGACY_STREAM_PICKLES):
            if offset >= len(blob):
                raise PickleScanError(
                    f"legacy torch stream ends after {index} of {_LEGACY_STREAM_PICKLES} pickles",
                    member=member,
                    entry=entry,
                    path=path,
                    findings=self.report().findings,
                )
            model = self.scan(
                blob,
                member=member,
                entry=entry,
                path=(*path, f"pickle {index + 1} of {_LEGACY_STREAM_PICKLES}"),
                start=offset,
                depth=depth,
            )
            offset = model.end
            if index == _LEGACY_OBJECT_PICKLE:
                root = model.root
        return root

    def scan_archive(self, archive: CheckpointArchive) -> None:
        """Scan every pickle SB3's loader would unpickle from ``archive``."""
        self.tally = archive.tally
        for key, payload in archive.serialized_entries().items():
            self.models[key] = self.scan(payload, member=DATA_MEMBER, entry=key)
        for name, inner in archive.iter_pth():
            if inner is None:
                # torch.load reads legacy streams too: their keys are attribute paths as well.
                self.pth_roots[name] = self.scan_torch_stream(
                    archive.read_member(name), member=name, entry=None, path=(), depth=0
                )
                continue
            data_pkl = torch_data_pkl_name(inner)
            for inner_name, pickled in torch_archive_pickles(inner).items():
                model = self.scan(pickled, member=name, entry=None, path=(inner_name,))
                if inner_name == data_pkl:
                    self.pth_roots[name] = model.root
        for member, path_name in undeclared_attribute_paths(
            archive.pth_members(), self.pth_roots, _ON_POLICY_TORCH_PARAMS
        ):
            self.record(member, None, path_name, GlobalVerdict.NOT_ALLOWED, ())


def scan_pickle(
    data: bytes,
    *,
    member: str = DATA_MEMBER,
    entry: str | None = None,
    allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
    limits: Limits | None = None,
    max_depth: int = _DEFAULT_MAX_DEPTH,
    budgets: Budgets = DEFAULT_BUDGETS,
) -> ScanReport:
    """Statically list the globals one pickle names, nested tensor blobs included.

    Imports neither torch nor numpy and executes nothing from ``data``.

    :param data: the pickle bytes.
    :param member: zip member to report (``"data"`` for ``:serialized:`` entries).
    :param entry: ``data`` entry to report.
    :param allow: allow-list to classify against.
    :param limits: limits for torch zip archives nested in the pickle.
    :param max_depth: how many levels of nested tensor blobs to follow.
    :param budgets: reading budgets.
    :raises PickleScanError: the pickle (or a nested one) is corrupt.
    :raises BudgetExceeded: reading it would exceed a budget.
    """
    scanner = _Scanner(allow, limits or Limits(), budgets, max_depth)
    scanner.scan(data, member=member, entry=entry)
    return scanner.report()


def scan_checkpoint(
    archive: CheckpointArchive,
    *,
    allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
    max_depth: int = _DEFAULT_MAX_DEPTH,
    budgets: Budgets = DEFAULT_BUDGETS,
) -> ScanReport:
    """Statically scan every pickle SB3's loader would unpickle from ``archive``.

    That is every ``:serialized:`` entry of ``data`` and, for every ``.pth`` member, the
    pickles of its torch archive (or the pickles of a legacy stream), each with the tensor
    blobs nested in it. Imports neither torch nor numpy and executes nothing.

    :raises ArchiveError: the zip, ``data`` or a base64 payload is unusable.
    :raises PickleScanError: a pickle is corrupt.
    :raises BudgetExceeded: reading the pickles would exceed a budget.
    """
    scanner = _Scanner(allow, archive.limits, budgets, max_depth)
    scanner.scan_archive(archive)
    return scanner.report()


# ---------------------------------------------------------------------------------------------
# The safe loader: objects built from the scanned model
# ---------------------------------------------------------------------------------------------


def _resolve(module: str, qualname: str) -> Any:
    target = _NUMPY_ALIASES.get((module, qualname))
    candidates = [target, (module, qualname)] if target else [(module, qualname)]
    error: Exception | None = None
    for mod_name, name in candidates:
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError) as exc:
            error = exc
    raise LookupError(f"{module}.{qualname} cannot be imported here ({error})")


def _refuse_build(target: Any, state: Any) -> str | None:
    """Why applying ``BUILD`` with ``state`` to ``target`` is unsafe, or None when it is fine.

    Allow-listed classes are harmless to *create*, but ``BUILD`` hands file content to their
    ``__setstate__`` (or ``setattr``), which is a different contract:

    - on a class, function or module it rewrites process-wide behaviour (e.g. a schedule's
      ``__call__``), affecting every later load and the user's own objects;
    - ``numpy.dtype.__setstate__`` trusts field offsets and flags, so a crafted structured or
      object dtype makes numpy read and write memory out of bounds;
    - ``ndarray.__setstate__`` trusts the dtype and the buffer it is given, and frees the old
      buffer while a view may still use it: arrays get their state only through the checked
      rebuild of :mod:`~dppo_ckpt.checkpoint.materialise`;
    - ``torch.Tensor.__setstate__`` installs backward hooks that the rebuild functions refuse.
    """
    if isinstance(
        target,
        (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType),
    ):
        return f"BUILD would modify {getattr(target, '__qualname__', target)!r} itself"
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(target, numpy.dtype):
        # The file's state must be exactly the one numpy itself pickles for this dtype;
        # plain dtypes are all SB3 checkpoints ever hold.
        if state != target.__reduce__()[2]:
            return f"BUILD with a crafted numpy dtype state {state!r:.80}"
        return None
    if numpy is not None and isinstance(target, (numpy.ndarray, numpy.generic)):
        return "BUILD on a numpy array (its state is rebuilt only by the checked constructor)"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(target, torch.Tensor):
        return "BUILD on a tensor (it could install backward hooks)"
    return None


class _EntryLoader:
    """Builds one data entry's objects from its model, with the file's budgets."""

    def __init__(
        self,
        *,
        member: str,
        entry: str | None,
        allow: Mapping[tuple[str, str], Any],
        map_location: str,
        budget: LoadBudget,
    ) -> None:
        self.member = member
        self.entry = entry
        self.allow = allow
        self.map_location = map_location
        self.budget = budget
        self._overrides: dict[tuple[str, str], Any] = {
            _LOAD_FROM_BYTES: LOAD_FROM_BYTES_TOKEN,
            ("numpy", "ndarray"): NDARRAY_TOKEN,
            ("torch._utils", "_rebuild_tensor_v2"): self._hookless("_rebuild_tensor_v2", 5),
            ("torch._utils", "_rebuild_parameter"): self._hookless("_rebuild_parameter", 2),
        }

    def load(self, model: PickleModel) -> Any:
        try:
            return materialise(
                model.root,
                resolve=self._resolve_global,
                build_check=_refuse_build,
                load_bytes=self._load_from_bytes,
                budget=self.budget,
                rules=rules_for(self.allow),
            )
        except MaterialiseRefused as exc:
            raise UnsafePickleError(
                self.member, self.entry, exc.global_name, GlobalVerdict.NOT_ALLOWED,
                detail=exc.reason,
            ) from None  # fmt: skip
        except MaterialiseInvalid as exc:
            raise PickleScanError(
                f"invalid arguments to {exc.global_name}: {exc.reason}",
                member=self.member,
                entry=self.entry,
            ) from None
        except LoadBudgetExceeded as exc:
            raise BudgetExceeded(exc.budget, f"{_where(self.member, self.entry)}: {exc}") from None

    def _resolve_global(self, glob: StubGlobal) -> Any:
        module, name = glob.module, glob.qualname
        verdict = (
            GlobalVerdict.DYNAMIC
            if module == "<dynamic>"
            else classify_global(module, name, self.allow)
        )
        if verdict is not GlobalVerdict.ALLOWED:
            raise UnsafePickleError(self.member, self.entry, glob.name, verdict)
        override = self._overrides.get((module, name))
        if override is not None:
            return override
        try:
            target = _resolve(module, name)
        except LookupError as exc:
            raise PickleScanError(str(exc), member=self.member, entry=self.entry) from None
        if isinstance(self.allow.get((module, name)), UserEntry):
            problem = entry_problem(target)
            if problem is not None:
                raise UnsafePickleError(
                    self.member, self.entry, glob.name, GlobalVerdict.NOT_ALLOWED, detail=problem
                )
        return target

    def _load_from_bytes(self, blob: bytes) -> Any:
        import torch

        self.budget.spend(len(blob), "a nested tensor blob")
        try:
            return torch.load(io.BytesIO(blob), weights_only=True, map_location=self.map_location)
        except pickle.UnpicklingError as exc:
            # torch's weights-only unpickler refused something; its message spans many lines.
            detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), None)
            raise UnsafePickleError(
                self.member,
                self.entry,
                "torch.storage._load_from_bytes",
                GlobalVerdict.NOT_ALLOWED,
                detail=detail or "torch refused the nested tensor blob",
            ) from None
        except Exception as exc:
            raise PickleScanError(
                f"corrupt nested tensor blob: {type(exc).__name__}: {exc}",
                member=self.member,
                entry=self.entry,
            ) from None

    def _hookless(self, name: str, hooks_index: int) -> Callable[..., Any]:
        member, entry, budget = self.member, self.entry, self.budget

        @checked
        def rebuild(*args: Any, **kwargs: Any) -> Any:
            hooks = args[hooks_index] if len(args) > hooks_index else kwargs.get("backward_hooks")
            if hooks:
                raise UnsafePickleError(
                    member,
                    entry,
                    f"torch._utils.{name}",
                    GlobalVerdict.NOT_ALLOWED,
                    detail="the tensor carries backward hooks",
                )
            import torch
            import torch._utils

            if name == "_rebuild_tensor_v2":
                _check_tensor_view(args, member, entry, budget)
            elif not (args and isinstance(args[0], torch.Tensor)):
                # Damage, not code: the static scan cannot tell what the argument builds.
                raise PickleScanError(
                    f"invalid arguments to torch._utils.{name}: a Parameter must wrap a tensor",
                    member=member,
                    entry=entry,
                )
            return getattr(torch._utils, name)(*args, **kwargs)

        return rebuild


def _check_tensor_view(
    args: tuple[Any, ...], member: str, entry: str | None, budget: LoadBudget
) -> None:
    """Refuse a tensor view that reaches outside its storage or is larger than the budget
    (a stride-0 view of one element can declare billions).

    Such a view is damage, not code (exit code 2, like any constructor argument that does not
    describe a valid object): the static scan cannot see storage sizes, and it must refuse as
    unsafe exactly what the loader refuses as unsafe.
    """
    import torch

    def refuse(reason: str) -> PickleScanError:
        return PickleScanError(
            f"invalid arguments to torch._utils._rebuild_tensor_v2: {reason}",
            member=member,
            entry=entry,
        )

    if len(args) < 4:
        raise refuse("a tensor needs (storage, offset, size, stride)")
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise refuse("a tensor's storage is not a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise refuse("a tensor's size and stride are not tuples of one length")
    if not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise refuse("a tensor's offset, sizes and strides must be non-negative integers")
    numel = math.prod(size)
    try:
        budget.elements(numel, "a tensor")
    except LoadBudgetExceeded as exc:
        raise BudgetExceeded(exc.budget, f"{_where(member, entry)}: {exc}") from None
    # torch's own set_() checks untyped storages; a typed one is checked here, in elements.
    if isinstance(storage, torch.TypedStorage) and numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage._size():
            raise refuse("a tensor view reaches outside its storage")


class SafeUnpickler:
    """Decode one pickle without running code from it: the model, its analysis, then objects
    built by checked constructors only (see :mod:`~dppo_ckpt.checkpoint.materialise`).

    :param file: binary file holding the pickle.
    :param member: zip member, for error messages.
    :param entry: ``data`` entry, for error messages.
    :param allow: allow-list (exact ``(module, name)`` pairs).
    :param map_location: where nested tensors are rebuilt.
    :param budgets: what decoding may cost.
    """

    def __init__(
        self,
        file: io.BufferedIOBase | io.BytesIO,
        *,
        member: str = DATA_MEMBER,
        entry: str | None = None,
        allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
        map_location: str = "cpu",
        budgets: Budgets = DEFAULT_BUDGETS,
    ) -> None:
        self._payload = file.read()
        self.member = member
        self.entry = entry
        self.allow = allow
        self.map_location = map_location
        self.budgets = budgets

    def load(self) -> Any:
        scanner = _Scanner(self.allow, Limits(), self.budgets)
        model = scanner.scan(self._payload, member=self.member, entry=self.entry)
        return _decode_model(
            model, scanner.report(), member=self.member, entry=self.entry, allow=self.allow,
            map_location=self.map_location, budget=self.budgets.load_budget(),
        )  # fmt: skip


def _decode_model(
    model: PickleModel,
    report: ScanReport,
    *,
    member: str,
    entry: str | None,
    allow: Mapping[tuple[str, str], Any],
    map_location: str,
    budget: LoadBudget,
) -> Any:
    refused = [f for f in report.refused if f.member == member and f.entry == entry]
    if refused:
        first = refused[0]
        raise UnsafePickleError(
            first.member, first.entry, first.global_name, first.verdict, path=first.path
        )
    loader = _EntryLoader(
        member=member, entry=entry, allow=allow, map_location=map_location, budget=budget
    )
    try:
        return loader.load(model)
    except CheckpointError:
        raise
    except Exception as exc:  # allowed constructors may reject hostile arguments in any way
        raise PickleScanError(
            f"cannot decode: {type(exc).__name__}: {exc}", member=member, entry=entry
        ) from None


def _trusted_loads(payload: bytes, *, member: str, entry: str | None) -> Any:
    import cloudpickle

    try:
        return cloudpickle.loads(payload)
    except Exception as exc:
        raise PickleScanError(
            f"cannot decode: {type(exc).__name__}: {exc}", member=member, entry=entry
        ) from None


def decode_entries(
    archive: CheckpointArchive,
    trust: bool = False,
    *,
    allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
    skip: Collection[str] = (),
    map_location: str = "cpu",
    budgets: Budgets = DEFAULT_BUDGETS,
    scanner: _Scanner | None = None,
) -> dict[str, Any]:
    """Decode every ``:serialized:`` entry of ``data`` without running code from the file.

    Each entry is decoded once into its model; the scan's verdict on that model decides, and
    the objects are built from that same model.

    :param archive: the open checkpoint.
    :param trust: decode entries the allow-list refuses with plain ``cloudpickle.loads``
        (which runs code from the file). Only for files whose origin you trust.
    :param allow: allow-list.
    :param skip: entry names not to decode (the caller supplies them).
    :param map_location: where nested tensors are rebuilt.
    :param budgets: what decoding may cost.
    :param scanner: a scanner that already scanned ``archive`` (its models are reused).
    :return: decoded values by entry name.
    :raises UnsafePickleError: an entry names a refused global (and ``trust`` is false).
    :raises PickleScanError: an entry is corrupt or cannot be decoded.
    :raises BudgetExceeded: decoding would exceed a budget.
    """
    if scanner is None:
        scanner = _Scanner(allow, archive.limits, budgets)
        for key, payload in archive.serialized_entries().items():
            if key not in skip:
                scanner.models[key] = scanner.scan(payload, member=DATA_MEMBER, entry=key)
    report = scanner.report()
    budget = budgets.load_budget()
    payloads = archive.serialized_entries() if trust else {}
    decoded: dict[str, Any] = {}
    for key, model in scanner.models.items():
        if key in skip:
            continue
        try:
            decoded[key] = _decode_model(
                model, report, member=DATA_MEMBER, entry=key, allow=allow,
                map_location=map_location, budget=budget,
            )  # fmt: skip
        except UnsafePickleError:
            if not trust:
                raise
            decoded[key] = _trusted_loads(payloads[key], member=DATA_MEMBER, entry=key)
    return decoded


# ---------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------

_OWN_POLICY: Final = ("dppo_ckpt.policy", "CustomActorCriticPolicy")
# data keys only DistributionalPPO writes
_OWN_DATA_KEYS: Final = frozenset({"_variance_gradient_scaler", "_rng_state", "critic"})


def _choose_algorithm(data: Mapping[str, Any], decoded: Mapping[str, Any]) -> type[BaseAlgorithm]:
    policy_class = decoded.get("policy_class")
    if policy_class is None:
        raise CheckpointError("the checkpoint has no policy_class entry; pass algo_cls")
    identity = (
        getattr(policy_class, "__module__", None),
        getattr(policy_class, "__qualname__", None),
    )
    if identity == _OWN_POLICY or _OWN_DATA_KEYS & data.keys():
        from dppo_ckpt.ppo import DistributionalPPO

        return DistributionalPPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.policies import ActorCriticPolicy

    if isinstance(policy_class, type) and issubclass(policy_class, ActorCriticPolicy):
        if "clip_range" not in data:
            raise CheckpointError(
                "an actor-critic checkpoint without clip_range was not saved by PPO; pass algo_cls"
            )
        return PPO
    raise CheckpointError(
        f"cannot tell which algorithm saved a checkpoint with policy_class {policy_class!r}; "
        "pass algo_cls"
    )


def safe_load(
    path_or_archive: str | os.PathLike[str] | CheckpointArchive,
    algo_cls: type[BaseAlgorithm] | None = None,
    env: Any = None,
    device: str = "cpu",
    trust: bool = False,
    *,
    limits: Limits | None = None,
    allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
    custom_objects: Mapping[str, Any] | None = None,
    budgets: Budgets = DEFAULT_BUDGETS,
    **kwargs: Any,
) -> BaseAlgorithm:
    """Load an SB3 / DistributionalPPO checkpoint without running code from it.

    The file is read into memory once, so what is scanned is exactly what is loaded. Every
    pickle is decoded once into its model and scanned (refusals name member, entry and
    global), every ``:serialized:`` entry is built from that model by checked constructors
    (:mod:`~dppo_ckpt.checkpoint.materialise`), and all of them are handed to
    ``algo_cls.load(custom_objects=...)``: SB3 then never calls ``cloudpickle.loads`` on file
    content, and it reads the ``.pth`` members with ``torch.load(weights_only=True)``.

    :param path_or_archive: checkpoint path or an open :class:`CheckpointArchive`.
    :param algo_cls: algorithm class; by default DistributionalPPO for checkpoints of this
        package and ``stable_baselines3.PPO`` for SB3 actor-critic policies.
    :param env: environment for the loaded model (as in SB3's ``load``).
    :param device: device for the model.
    :param trust: decode entries the allow-list refuses with plain cloudpickle (runs code
        from the file) and do not refuse on ``.pth`` findings (torch's weights-only loader
        still guards those).
    :param limits: zip limits (defaults to :class:`Limits`, or the archive's own).
    :param allow: allow-list.
    :param custom_objects: values to use instead of decoding these entries (as in SB3).
    :param budgets: what reading and decoding the file may cost.
    :param kwargs: passed on to ``algo_cls.load``; ``tensorboard_log`` defaults to None, so
        that the file cannot choose where training writes logs.
    :raises ArchiveError: the file is unusable (includes :class:`PickleScanError`).
    :raises UnsafePickleError: a pickle names a refused global.
    """
    if isinstance(path_or_archive, CheckpointArchive):
        limits = limits or path_or_archive.limits
        raw = path_or_archive.read_raw()
    else:
        limits = limits or Limits()
        raw = read_checkpoint_bytes(path_or_archive, limits)
    overrides = dict(custom_objects or {})
    with open_checkpoint(raw, limits) as archive:
        scanner = _Scanner(allow, archive.limits, budgets)
        scanner.scan_archive(archive)
        for finding in scanner.report().refused:
            if finding.entry is not None and finding.entry in overrides:
                continue
            if trust:
                continue
            raise UnsafePickleError(
                finding.member, finding.entry, finding.global_name, finding.verdict,
                path=finding.path,
            )  # fmt: skip
        decoded = decode_entries(
            archive, trust, allow=allow, skip=overrides.keys(), budgets=budgets, scanner=scanner
        )
        decoded.update(overrides)
        if algo_cls is None:
            algo_cls = _choose_algorithm(archive.data, decoded)
        check_attribute_paths(archive, scanner.pth_roots, algo_cls)
        # SB3 takes plain JSON values (no ":serialized:") as they are.
        plain = {**archive.data, **decoded}
        check_network_size(plain.get("policy_kwargs"), budgets, plain)
        check_rollout_size(plain, budgets)
    # A plain JSON key can steer file writes too: a stored ``tensorboard_log`` would make the
    # next learn() create folders wherever the file says. Only the caller may set one.
    kwargs.setdefault("tensorboard_log", None)
    return algo_cls.load(io.BytesIO(raw), env=env, device=device, custom_objects=decoded, **kwargs)


_PYTORCH_VARIABLES: Final = "pytorch_variables.pth"
#: What ``_get_torch_save_params`` declares for the on-policy algorithms (PPO; DistributionalPPO
#: adds its scaler, ``vgs``): the static scan's rule; the loader asks the algorithm class.
_ON_POLICY_TORCH_PARAMS: Final = (("policy", "policy.optimizer", SCALER_PARAMETER), ())


def undeclared_attribute_paths(
    pth_members: Collection[str],
    pth_roots: Mapping[str, Any],
    declared: tuple[Collection[str], Collection[str]],
) -> list[tuple[str, str]]:
    """``(member, description)`` of every ``.pth`` member and ``pytorch_variables`` key that
    is not among the ``declared`` state dicts and torch variables."""
    state_dicts, variables = declared
    allowed = {f"{name}.pth" for name in state_dicts} | {_PYTORCH_VARIABLES}
    found = [
        (name, f"<attribute path {name[:-4]!r}>") for name in pth_members if name not in allowed
    ]
    root = pth_roots.get(_PYTORCH_VARIABLES)
    if root is not None:
        if not isinstance(root, dict):
            found.append((_PYTORCH_VARIABLES, "<pytorch_variables that is not a dict>"))
        else:
            found += [
                (_PYTORCH_VARIABLES, f"<attribute path {str(key)[:80]!r}>")
                for key in root
                if key not in variables
            ]
    return found


def check_attribute_paths(
    archive: CheckpointArchive, pth_roots: Mapping[str, Any], algo_cls: type[BaseAlgorithm]
) -> None:
    """Refuse ``.pth`` members and ``pytorch_variables`` keys the algorithm does not declare.

    SB3 turns both into attribute paths on the model: a member ``NAME.pth`` is loaded with
    ``recursive_getattr(model, NAME).load_state_dict(...)``, and every key of
    ``pytorch_variables`` is *assigned* with ``recursive_setattr(model, f"{key}.data", ...)``,
    which can reach class attributes shared by the whole process (``policy.__class__...``).
    Only the names of ``algo_cls._get_torch_save_params`` are accepted.

    :raises UnsafePickleError: an undeclared member or key (exit code 3).
    """
    try:
        state_dicts, variables = algo_cls._get_torch_save_params(algo_cls.__new__(algo_cls))
    except Exception as exc:  # an algorithm whose method needs a built model
        raise CheckpointError(
            f"cannot tell which attributes {algo_cls.__name__} saves: {exc}"
        ) from None
    problems = undeclared_attribute_paths(
        archive.pth_members(), pth_roots, (state_dicts, variables)
    )
    if problems:
        member, what = problems[0]
        raise UnsafePickleError(
            member, None, what, GlobalVerdict.NOT_ALLOWED,
            detail=(
                f"{algo_cls.__name__} saves only {', '.join(state_dicts)} and "
                f"{'no torch variables' if not variables else ', '.join(variables)}"
            ),
        )  # fmt: skip


# Settings that set the width of the distributional critic's output layer.
_HEAD_WIDTHS: Final = ("n_quantiles", "n_atoms")
# Settings of SB3's feature extractors that set the width of their output layer.
_FEATURE_WIDTHS: Final = ("features_dim", "cnn_output_dim")
_SB3_DEFAULT_WIDTH: Final = 64


def check_network_size(
    policy_kwargs: Any, budgets: Budgets, algorithm: Mapping[str, Any] | None = None
) -> None:
    """Refuse a ``policy_kwargs`` whose ``net_arch`` and critic heads ask for more weights
    than the memory budget allows: SB3 allocates them (and Adam twice more) before anything
    can be checked.

    :param algorithm: the algorithm's own settings (``data``): the observation space sizes
        the first layer, and ``n_quantiles`` and ``n_atoms`` the critic head.
    :raises BudgetExceeded: the network would not fit in ``budgets.max_memory``.
    """
    kwargs = policy_kwargs if isinstance(policy_kwargs, dict) else {}
    arch = kwargs.get("net_arch")
    branches = list(arch.values()) if isinstance(arch, dict) else [arch]
    # The extractor's output feeds the first layer: as wide as the file says, or the
    # flattened observation; an image extractor's input is at most the observation.
    observed = _space_elements((algorithm or {}).get("observation_space"))
    extractor = kwargs.get("features_extractor_kwargs")
    extractor = extractor if isinstance(extractor, dict) else {}
    features = [
        n for n in (extractor.get(k) for k in _FEATURE_WIDTHS) if type(n) is int and n > 0
    ]
    weights = sum(n * (observed + 1) for n in features)
    width_in = max(features) if features else observed
    widest = max(_SB3_DEFAULT_WIDTH, width_in)
    for branch in branches:
        if not isinstance(branch, (list, tuple)):
            continue
        sizes = [n for n in branch if isinstance(n, int) and not isinstance(n, bool)]
        if any(n < 0 for n in sizes):
            raise BudgetExceeded("max_memory", "net_arch holds a negative layer size")
        sizes = [width_in, *sizes]
        weights += sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
        widest = max([widest, *sizes])
    for source in (kwargs, algorithm or {}):
        for key in _HEAD_WIDTHS:
            width = source.get(key)
            if type(width) is int and width > 0:
                weights += width * (widest + 1)
    # float32 weights, and Adam's two moments beside them.
    if 3 * 4 * weights > budgets.max_memory:
        raise BudgetExceeded(
            "max_memory",
            f"policy_kwargs ask for a network of {weights} weights, more than "
            f"{budgets.max_memory} bytes can hold with the optimizer state",
        )


def _space_elements(space: Any) -> int:
    """Numbers one observation or action of ``space`` takes in a rollout buffer."""
    inner = getattr(space, "spaces", None)
    if inner is not None:
        values = inner.values() if isinstance(inner, Mapping) else inner
        return sum(_space_elements(s) for s in values)
    shape = getattr(space, "shape", None)
    return math.prod(shape) if isinstance(shape, tuple) else 1


# rewards, returns, episode starts, values, log-probabilities, advantages, with room for the
# distributional critics' extra per-step numbers.
_ROLLOUT_SCALARS: Final = 8


def check_rollout_size(data: Mapping[str, Any], budgets: Budgets) -> None:
    """Refuse ``n_steps`` and ``n_envs`` that ask for a rollout buffer beyond the memory budget.

    SB3's loader sets up the model from them, and the buffer is allocated (and filled by the
    next ``learn``) at ``n_steps * n_envs`` times the observation and action sizes.

    :raises BudgetExceeded: the buffer would not fit in ``budgets.max_memory``.
    """
    n_steps, n_envs = data.get("n_steps"), data.get("n_envs", 1)
    if not all(type(n) is int for n in (n_steps, n_envs)):
        return
    per_step = _ROLLOUT_SCALARS + sum(
        _space_elements(data.get(key)) for key in ("observation_space", "action_space")
    )
    nbytes = 4 * max(n_steps, 0) * max(n_envs, 0) * per_step
    if nbytes > budgets.max_memory:
        raise BudgetExceeded(
            "max_memory",
            f"n_steps {n_steps} with n_envs {n_envs} ask for a rollout buffer of {nbytes} "
            f"bytes, more than {budgets.max_memory}",
        )
