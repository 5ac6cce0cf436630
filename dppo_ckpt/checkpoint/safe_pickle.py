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
import os
import pickle
import pickletools
import sys
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

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
)

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
        ("torch.optim.adam", "Adam"): "policy_kwargs optimizer_class (SB3 default)",
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
    :param offset: byte offset of the opcode in the innermost pickle.
    """

    member: str
    entry: str | None
    global_name: str
    verdict: GlobalVerdict
    path: tuple[str, ...] = ()
    offset: int = 0

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


def _dedupe(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    seen: dict[tuple[Any, ...], Finding] = {}
    for f in findings:
        seen.setdefault((f.member, f.entry, f.global_name, f.verdict, f.path), f)
    return tuple(seen.values())


# ---------------------------------------------------------------------------------------------
# Static scanner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GlobalRef:
    module: str
    name: str


@dataclass(frozen=True)
class _DtypeCall:
    """A ``numpy.dtype(...)`` call on the scanner's stack, whose later BUILD state matters."""

    args: Any


_NUMPY_DTYPE: Final = _GlobalRef("numpy", "dtype")


def _crafted_dtype(args: Any, state: Any) -> bool:
    """True unless a dtype BUILD looks like numpy's own pickle of a plain dtype.

    Structured (``V``) and object (``O``) dtypes, or a state with subarray, names or fields,
    are what make ``dtype.__setstate__`` trust file-given offsets and flags; SB3 checkpoints
    never need them.
    """
    kind = args[0] if isinstance(args, tuple) and args else None
    if not isinstance(kind, str) or kind[:1] in ("O", "V"):
        return True
    if not isinstance(state, tuple) or len(state) < 5:
        return True
    return any(item is not None for item in state[2:5])


_MARK: Final = object()
_UNKNOWN: Final = object()
_STRING_OPS: Final = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_BYTES_OPS: Final = frozenset({"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_PUT_OPS: Final = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS: Final = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _Malformed(Exception):
    """Internal: the opcode stream cannot be a valid pickle."""


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, _GlobalRef):
        return f"{value.module}.{value.name}"
    return "?"


@dataclass
class _Scanner:
    """Walks pickles symbolically: a stack of literal strings, bytes, tuples and global
    references (everything else is opaque), enough to name every global and to find the
    bytes handed to ``torch.storage._load_from_bytes``."""

    allow: Mapping[tuple[str, str], Any]
    limits: Limits
    max_depth: int
    findings: list[Finding] = field(default_factory=list)
    pickles_scanned: int = 0

    def record(
        self,
        member: str,
        entry: str | None,
        global_name: str,
        verdict: GlobalVerdict,
        path: tuple[str, ...],
        offset: int,
    ) -> None:
        self.findings.append(Finding(member, entry, global_name, verdict, path, offset))

    def record_global(
        self,
        module: str,
        name: str,
        member: str,
        entry: str | None,
        path: tuple[str, ...],
        pos: int,
    ) -> None:
        verdict = classify_global(module, name, self.allow)
        self.record(member, entry, f"{module}.{name}", verdict, path, pos)

    def report(self) -> ScanReport:
        return ScanReport(_dedupe(self.findings), self.pickles_scanned)

    # -- one pickle ----------------------------------------------------------------------

    def scan(
        self,
        data: bytes,
        *,
        member: str,
        entry: str | None,
        path: tuple[str, ...] = (),
        start: int = 0,
        depth: int = 0,
    ) -> int:
        """Walk the pickle starting at ``start``; return the offset just past its STOP."""
        stream = io.BytesIO(data)
        stream.seek(start)
        self.pickles_scanned += 1
        try:
            return self._walk(stream, member, entry, path, depth)
        except PickleScanError:
            raise
        except _Malformed as exc:
            raise PickleScanError(
                f"corrupt pickle: {exc}",
                member=member,
                entry=entry,
                path=path,
                findings=self.report().findings,
            ) from None
        except Exception as exc:  # genops raises many types on malformed input
            raise PickleScanError(
                f"corrupt pickle: {type(exc).__name__}: {exc}",
                member=member,
                entry=entry,
                path=path,
                findings=self.report().findings,
            ) from None

    def _walk(
        self, stream: io.BytesIO, member: str, entry: str | None, path: tuple[str, ...], depth: int
    ) -> int:
        stack: list[Any] = []
        memo: dict[int, Any] = {}

        def pop() -> Any:
            if not stack:
                raise _Malformed(f"stack underflow at byte {pos}")
            return stack.pop()

        def pop_to_mark() -> list[Any]:
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is _MARK:
                    items = stack[i + 1 :]
                    del stack[i:]
                    return items
            raise _Malformed(f"no MARK on the stack at byte {pos}")

        def call(fn: Any, args: Any) -> None:
            if isinstance(fn, _GlobalRef) and (fn.module, fn.name) == _LOAD_FROM_BYTES:
                self._blob(args, member, entry, (*path, f"tensor blob at byte {pos}"), depth, pos)

        pos = 0
        for opcode, arg, pos in pickletools.genops(stream):
            name = opcode.name
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else _UNKNOWN)
            elif name in _BYTES_OPS:
                stack.append(bytes(arg))
            elif name in _PUT_OPS:
                if not stack:
                    raise _Malformed(f"memo put on an empty stack at byte {pos}")
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise _Malformed(f"memoize on an empty stack at byte {pos}")
                memo[len(memo)] = stack[-1]
            elif name in _GET_OPS:
                if arg not in memo:
                    raise _Malformed(f"memo key {arg} missing at byte {pos}")
                stack.append(memo[arg])
            elif name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
                self.record_global(module, qualname, member, entry, path, pos)
                stack.append(_GlobalRef(module, qualname))
            elif name == "INST":
                module, _, qualname = str(arg).partition(" ")
                self.record_global(module, qualname, member, entry, path, pos)
                call(_GlobalRef(module, qualname), tuple(pop_to_mark()))
                stack.append(_UNKNOWN)
            elif name == "STACK_GLOBAL":
                qualname, module = pop(), pop()
                if isinstance(module, str) and isinstance(qualname, str):
                    self.record_global(module, qualname, member, entry, path, pos)
                    stack.append(_GlobalRef(module, qualname))
                else:
                    self.record(
                        member,
                        entry,
                        f"<dynamic global {_describe(module)}.{_describe(qualname)}>",
                        GlobalVerdict.DYNAMIC,
                        path,
                        pos,
                    )
                    stack.append(_UNKNOWN)
            elif name in ("EXT1", "EXT2", "EXT4"):
                # The copyreg extension registry maps codes to globals outside the file.
                extension = f"<copyreg extension {arg}>"
                self.record(member, entry, extension, GlobalVerdict.NOT_ALLOWED, path, pos)
                stack.append(_UNKNOWN)
            elif name == "REDUCE":
                args = pop()
                fn = pop()
                call(fn, args)
                stack.append(_DtypeCall(args) if fn == _NUMPY_DTYPE else _UNKNOWN)
            elif name == "NONE":
                stack.append(None)
            elif name == "OBJ":
                items = pop_to_mark()
                if not items:
                    raise _Malformed(f"OBJ without a class at byte {pos}")
                call(items[0], tuple(items[1:]))
                stack.append(_UNKNOWN)
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE":
                stack.append(tuple(pop_to_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif name == "BUILD":
                state = pop()
                target = pop()
                if isinstance(target, _DtypeCall) and _crafted_dtype(target.args, state):
                    self.record(
                        member,
                        entry,
                        "<BUILD with a crafted numpy.dtype state>",
                        GlobalVerdict.NOT_ALLOWED,
                        path,
                        pos,
                    )
                elif isinstance(target, _GlobalRef):
                    # BUILD on a bare global rewrites the class or function itself.
                    self.record(
                        member,
                        entry,
                        f"<BUILD on {target.module}.{target.name}>",
                        GlobalVerdict.NOT_ALLOWED,
                        path,
                        pos,
                    )
                stack.append(target)
            elif name == "DUP":
                if not stack:
                    raise _Malformed(f"DUP on an empty stack at byte {pos}")
                stack.append(stack[-1])
            elif name == "STOP":
                pop()
                return pos + 1
            else:
                self._generic(opcode, pop, pop_to_mark, stack)
        raise _Malformed("pickle ends without STOP")

    @staticmethod
    def _generic(
        opcode: pickletools.OpcodeInfo,
        pop: Callable[[], Any],
        pop_to_mark: Callable[[], list[Any]],
        stack: list[Any],
    ) -> None:
        before, after = opcode.stack_before, opcode.stack_after
        if pickletools.markobject in before:
            pop_to_mark()
            for _ in range(before.index(pickletools.markobject)):
                pop()
        else:
            for _ in before:
                pop()
        for kind in after:
            stack.append(_MARK if kind is pickletools.markobject else _UNKNOWN)

    # -- nested tensor blobs -------------------------------------------------------------

    def _blob(
        self,
        args: Any,
        member: str,
        entry: str | None,
        path: tuple[str, ...],
        depth: int,
        pos: int,
    ) -> None:
        """Scan the bytes given to ``torch.storage._load_from_bytes``: a torch.save stream,
        legacy (consecutive pickles, then raw storage) or zip."""
        if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], bytes)):
            self.record(
                member,
                entry,
                "<torch.storage._load_from_bytes of a non-literal argument>",
                GlobalVerdict.DYNAMIC,
                path,
                pos,
            )
            return
        if depth + 1 > self.max_depth:
            self.record(
                member,
                entry,
                f"<tensor blob nested deeper than {self.max_depth} levels>",
                GlobalVerdict.DYNAMIC,
                path,
                pos,
            )
            return
        self.scan_torch_stream(args[0], member=member, entry=entry, path=path, depth=depth + 1)

    def scan_torch_stream(
        self, blob: bytes, *, member: str, entry: str | None, path: tuple[str, ...], depth: int
    ) -> None:
        """Scan what ``torch.load`` would unpickle from ``blob``."""
        if is_zip_bytes(blob):
            try:
                with open_torch_archive(blob, self.limits, " > ".join((member, *path))) as inner:
                    pickles = torch_archive_pickles(inner)
            except PickleScanError:
                raise
            except ArchiveError as exc:
                raise PickleScanError(
                    f"nested torch archive: {exc.reason}", member=member, entry=entry, path=path
                ) from None
            for inner_name, data in pickles.items():
                self.scan(data, member=member, entry=entry, path=(*path, inner_name), depth=depth)
            return
        offset = 0
        for index in range(_LEGACY_STREAM_PICKLES):
            if offset >= len(blob):
                raise PickleScanError(
                    f"legacy torch stream ends after {index} of {_LEGACY_STREAM_PICKLES} pickles",
                    member=member,
                    entry=entry,
                    path=path,
                )
            offset = self.scan(
                blob,
                member=member,
                entry=entry,
                path=(*path, f"pickle {index + 1} of {_LEGACY_STREAM_PICKLES}"),
                start=offset,
                depth=depth,
            )


def scan_pickle(
    data: bytes,
    *,
    member: str = DATA_MEMBER,
    entry: str | None = None,
    allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
    limits: Limits | None = None,
    max_depth: int = _DEFAULT_MAX_DEPTH,
) -> ScanReport:
    """Statically list the globals one pickle names, nested tensor blobs included.

    Imports neither torch nor numpy and executes nothing from ``data``.

    :param data: the pickle bytes.
    :param member: zip member to report (``"data"`` for ``:serialized:`` entries).
    :param entry: ``data`` entry to report.
    :param allow: allow-list to classify against.
    :param limits: limits for torch zip archives nested in the pickle.
    :param max_depth: how many levels of nested tensor blobs to follow.
    :raises PickleScanError: the pickle (or a nested one) is corrupt.
    """
    scanner = _Scanner(allow, limits or Limits(), max_depth)
    scanner.scan(data, member=member, entry=entry)
    return scanner.report()


def scan_checkpoint(
    archive: CheckpointArchive,
    *,
    allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
    max_depth: int = _DEFAULT_MAX_DEPTH,
) -> ScanReport:
    """Statically scan every pickle SB3's loader would unpickle from ``archive``.

    That is every ``:serialized:`` entry of ``data`` and, for every ``.pth`` member, the
    pickles of its torch archive (or the pickles of a legacy stream), each with the tensor
    blobs nested in it. Imports neither torch nor numpy and executes nothing.

    :raises ArchiveError: the zip, ``data`` or a base64 payload is unusable.
    :raises PickleScanError: a pickle is corrupt.
    """
    scanner = _Scanner(allow, archive.limits, max_depth)
    for key, payload in archive.serialized_entries().items():
        scanner.scan(payload, member=DATA_MEMBER, entry=key)
    for name, inner in archive.iter_pth():
        if inner is None:
            scanner.scan_torch_stream(
                archive.read_member(name), member=name, entry=None, path=(), depth=0
            )
            continue
        for inner_name, pickled in torch_archive_pickles(inner).items():
            scanner.scan(pickled, member=name, entry=None, path=(inner_name,))
    return scanner.report()


# ---------------------------------------------------------------------------------------------
# Allow-list unpickler
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

    Allow-listed classes are harmless to *call*, but ``BUILD`` hands file content to their
    ``__setstate__`` (or ``setattr``), which is a different contract:

    - on a class, function or module it rewrites process-wide behaviour (e.g. a schedule's
      ``__call__``), affecting every later load and the user's own objects;
    - ``numpy.dtype.__setstate__`` trusts field offsets and flags, so a crafted structured or
      object dtype makes numpy read and write memory out of bounds;
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
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(target, torch.Tensor):
        return "BUILD on a tensor (it could install backward hooks)"
    return None


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only allow-listed globals and never runs code from the file.

    - ``find_class`` returns globals of :data:`ALLOWED_GLOBALS` (or ``allow``) only; anything
      else raises :class:`UnsafePickleError` naming member, entry and global.
    - ``torch.storage._load_from_bytes`` is replaced by a function that rebuilds the nested
      tensor blob with ``torch.load(..., weights_only=True)`` (torch is imported lazily, here).
    - ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` refuse tensors that carry
      backward hooks (callables that would run during a later backward pass).
    - ``BUILD`` is checked before it runs (see :func:`_refuse_build`); that is why this is
      the pure-Python unpickler, whose opcode table can be extended.

    :param file: binary file holding the pickle.
    :param member: zip member, for error messages.
    :param entry: ``data`` entry, for error messages.
    :param allow: allow-list (exact ``(module, name)`` pairs).
    :param map_location: where nested tensors are rebuilt.
    """

    def __init__(
        self,
        file: io.BufferedIOBase | io.BytesIO,
        *,
        member: str = DATA_MEMBER,
        entry: str | None = None,
        allow: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS,
        map_location: str = "cpu",
    ) -> None:
        super().__init__(file)
        self.member = member
        self.entry = entry
        self.allow = allow
        self.map_location = map_location
        self._overrides: dict[tuple[str, str], Callable[..., Any]] = {
            _LOAD_FROM_BYTES: self._load_from_bytes,
            ("torch._utils", "_rebuild_tensor_v2"): self._hookless("_rebuild_tensor_v2", 5),
            ("torch._utils", "_rebuild_parameter"): self._hookless("_rebuild_parameter", 2),
        }

    dispatch = dict(pickle._Unpickler.dispatch)

    def _checked_build(self) -> None:
        if len(self.stack) < 2:
            raise PickleScanError("BUILD without a target", member=self.member, entry=self.entry)
        reason = _refuse_build(self.stack[-2], self.stack[-1])
        if reason is not None:
            raise UnsafePickleError(
                self.member,
                self.entry,
                f"{type(self.stack[-2]).__module__}.{type(self.stack[-2]).__qualname__}",
                GlobalVerdict.NOT_ALLOWED,
                detail=reason,
            )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _checked_build

    def find_class(self, module: str, name: str) -> Any:
        verdict = classify_global(module, name, self.allow)
        if verdict is not GlobalVerdict.ALLOWED:
            raise UnsafePickleError(self.member, self.entry, f"{module}.{name}", verdict)
        override = self._overrides.get((module, name))
        if override is not None:
            return override
        try:
            return _resolve(module, name)
        except LookupError as exc:
            raise PickleScanError(str(exc), member=self.member, entry=self.entry) from None

    def persistent_load(self, pid: Any) -> Any:
        raise PickleScanError(
            "unexpected persistent id in a data entry", member=self.member, entry=self.entry
        )

    def _load_from_bytes(self, blob: Any) -> Any:
        if not isinstance(blob, (bytes, bytearray)):
            raise PickleScanError("tensor blob is not bytes", member=self.member, entry=self.entry)
        import torch

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
        member, entry = self.member, self.entry

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
            import torch._utils

            return getattr(torch._utils, name)(*args, **kwargs)

        return rebuild


def _safe_loads(
    payload: bytes,
    *,
    member: str,
    entry: str | None,
    allow: Mapping[tuple[str, str], Any],
    map_location: str,
) -> Any:
    try:
        return SafeUnpickler(
            io.BytesIO(payload), member=member, entry=entry, allow=allow, map_location=map_location
        ).load()
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
) -> dict[str, Any]:
    """Decode every ``:serialized:`` entry of ``data`` without running code from the file.

    Each entry is scanned statically first, so that a refusal names the exact global even
    when it hides in a nested tensor blob, then decoded with :class:`SafeUnpickler`.

    :param archive: the open checkpoint.
    :param trust: decode entries the allow-list refuses with plain ``cloudpickle.loads``
        (which runs code from the file). Only for files whose origin you trust.
    :param allow: allow-list.
    :param skip: entry names not to decode (the caller supplies them).
    :param map_location: where nested tensors are rebuilt.
    :return: decoded values by entry name.
    :raises UnsafePickleError: an entry names a refused global (and ``trust`` is false).
    :raises PickleScanError: an entry is corrupt or cannot be decoded.
    """
    decoded: dict[str, Any] = {}
    for key, payload in archive.serialized_entries().items():
        if key in skip:
            continue
        report = scan_pickle(
            payload, member=DATA_MEMBER, entry=key, allow=allow, limits=archive.limits
        )
        if not report.ok:
            if trust:
                decoded[key] = _trusted_loads(payload, member=DATA_MEMBER, entry=key)
                continue
            first = report.refused[0]
            raise UnsafePickleError(
                first.member, first.entry, first.global_name, first.verdict, path=first.path
            )
        try:
            decoded[key] = _safe_loads(
                payload, member=DATA_MEMBER, entry=key, allow=allow, map_location=map_location
            )
        except UnsafePickleError:
            if not trust:
                raise
            decoded[key] = _trusted_loads(payload, member=DATA_MEMBER, entry=key)
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
    **kwargs: Any,
) -> BaseAlgorithm:
    """Load an SB3 / DistributionalPPO checkpoint without running code from it.

    The file is read into memory once, so what is scanned is exactly what is loaded. Every
    pickle is scanned (refusals name member, entry and global), every ``:serialized:`` entry
    is decoded with :class:`SafeUnpickler`, and all of them are handed to
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
        report = scan_checkpoint(archive, allow=allow)
        for finding in report.refused:
            if finding.entry is not None and finding.entry in overrides:
                continue
            if trust:
                continue
            raise UnsafePickleError(
                finding.member, finding.entry, finding.global_name, finding.verdict,
                path=finding.path,
            )  # fmt: skip
        decoded = decode_entries(archive, trust, allow=allow, skip=overrides.keys())
        decoded.update(overrides)
        if algo_cls is None:
            algo_cls = _choose_algorithm(archive.data, decoded)
    # A plain JSON key can steer file writes too: a stored ``tensorboard_log`` would make the
    # next learn() create folders wherever the file says. Only the caller may set one.
    kwargs.setdefault("tensorboard_log", None)
    return algo_cls.load(io.BytesIO(raw), env=env, device=device, custom_objects=decoded, **kwargs)
