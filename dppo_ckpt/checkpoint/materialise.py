"""Build real objects from the pickle interpreter's stand-ins, calling only checked code.

The safe loader never hands pickle bytes to an unpickler. It evaluates the graph that
:func:`~dppo_ckpt.checkpoint.stub_pickle.stub_model` decoded, the same graph the static scan
looked at, so what is scanned is what is loaded. Being on the allow-list is not enough to be
called: each global has a *rule* (:data:`CALL_RULES`):

- most globals are values only (a policy class, an activation function, a storage tag):
  calling them is refused;
- plain data classes may be created empty (``NEWOBJ`` with no arguments) and then get their
  state through a checked ``BUILD``;
- the numpy, torch and gymnasium constructors that take arguments have a validator that
  checks every argument before anything is allocated: no object or pointer-holding dtypes,
  shapes and strides inside their buffers, sizes within :class:`LoadBudget`.

Object-dtype arrays are the reason: numpy turns the bytes of such an array into object
pointers, so one crafted array is a memory-corruption primitive. Nothing here imports torch;
numpy and torch are imported only by the validators that build their objects.
"""

from __future__ import annotations

import collections
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from dppo_ckpt.checkpoint.stub_pickle import (
    RawBytes,
    StubCall,
    StubExtension,
    StubGlobal,
    StubPersistent,
)

__all__ = [
    "CALL_RULES",
    "NEW_EMPTY",
    "LoadBudget",
    "LoadBudgetExceeded",
    "MaterialiseInvalid",
    "MaterialiseRefused",
    "materialise",
]


class _GlobalMisuse(Exception):
    """A global the file names was used in a way its rule does not admit.

    :param global_name: ``module.qualname`` of the global involved.
    :param reason: what was wrong, in one line.
    """

    def __init__(self, global_name: str, reason: str) -> None:
        super().__init__(reason)
        self.global_name = global_name
        self.reason = reason


class MaterialiseRefused(_GlobalMisuse):
    """An allowed global was used in a way its rule forbids (the file is refused as unsafe)."""


class MaterialiseInvalid(_GlobalMisuse):
    """An allowed constructor got arguments that do not describe a valid object (the file is
    damaged, exit code 2): a buffer that does not match its shape, a malformed state."""


class LoadBudgetExceeded(Exception):
    """Building the objects would exceed :class:`LoadBudget` (refused before allocating).

    :param budget: the budget's name, as the command line spells its option.
    """

    def __init__(self, budget: str, reason: str) -> None:
        super().__init__(reason)
        self.budget = budget


@dataclass
class LoadBudget:
    """What materialising one file's pickles may allocate, over all of its pickles.

    :param max_memory: bytes of arrays, tensors and byte strings built.
    :param max_elements: elements of any one array, tensor or space.
    :param max_depth: nesting depth of containers and calls.
    """

    max_memory: int = 4 * 1024**3
    max_elements: int = 1 << 28
    max_depth: int = 200
    spent: int = field(default=0, init=False)

    def spend(self, nbytes: int, what: str) -> None:
        self.spent += nbytes
        if self.spent > self.max_memory:
            raise LoadBudgetExceeded(
                "max_memory", f"{what} would take the file past {self.max_memory} bytes"
            )

    def elements(self, count: int, what: str) -> None:
        if count > self.max_elements:
            raise LoadBudgetExceeded(
                "max_elements", f"{what} has {count} elements, more than {self.max_elements}"
            )


# -- argument validation -------------------------------------------------------------------


def _refuse(name: str, reason: str) -> MaterialiseRefused:
    return MaterialiseRefused(name, reason)


def _invalid(name: str, reason: str) -> MaterialiseInvalid:
    return MaterialiseInvalid(name, reason)


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > 32:
        raise _invalid(name, f"shape {value!r:.60} is not a tuple of at most 32 sizes")
    if not all(type(n) is int and n >= 0 for n in value):
        raise _invalid(name, f"shape {value!r:.60} holds something other than sizes")
    return value


def _plain_dtype(dtype: Any, name: str) -> Any:
    """The dtype itself, when it holds no pointers and no structure numpy trusts blindly."""
    import numpy as np

    if not isinstance(dtype, np.dtype):
        raise _invalid(name, f"expected a numpy dtype, got {type(dtype).__name__}")
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _refuse(name, f"dtype {dtype!s:.40} holds object pointers or fields")
    if dtype.kind not in "biufcmMSU" or dtype.itemsize == 0:
        raise _refuse(name, f"dtype {dtype!s:.40} is not a plain numeric or string dtype")
    return dtype


def _buffer(value: Any, name: str) -> bytes | bytearray:
    if not isinstance(value, (bytes, bytearray)):
        raise _invalid(name, f"array data is a {type(value).__name__}, not bytes")
    return value


def _array_from(
    data: bytes | bytearray, dtype: Any, shape: tuple[int, ...], order: str, name: str,
    budget: LoadBudget,
) -> Any:  # fmt: skip
    import numpy as np

    count = math.prod(shape)
    budget.elements(count, "an array")
    if count * dtype.itemsize != len(data):
        raise _invalid(
            name,
            f"array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
            f"the file gives {len(data)}",
        )
    # A private, writable copy: never a view of the file's bytes shared with anything else.
    flat = np.frombuffer(bytearray(data), dtype=dtype)
    return flat.reshape(shape, order=order)


def _numpy_dtype(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    import numpy as np

    name = "numpy.dtype"
    if not (1 <= len(args) <= 3) or not isinstance(args[0], str) or len(args[0]) > 8:
        raise _invalid(name, "dtype takes a short type code, and align/copy flags")
    if any(not isinstance(flag, bool) for flag in args[1:]):
        raise _invalid(name, "dtype's align and copy arguments must be booleans")
    try:
        dtype = np.dtype(args[0])
    except TypeError as exc:
        raise _invalid(name, f"no such dtype {args[0]!r}: {exc}") from None
    return _plain_dtype(dtype, name)


class _PendingArray:
    """What ``numpy._reconstruct`` returns here: a placeholder its ``BUILD`` turns into the
    array, after checking the state (numpy's own ``__setstate__`` trusts it)."""


def _numpy_reconstruct(args: tuple[Any, ...], budget: LoadBudget) -> _PendingArray:
    name = "numpy._core.multiarray._reconstruct"
    if len(args) != 3 or args[0] is not _NDARRAY_TOKEN:
        raise _refuse(name, "_reconstruct builds plain numpy.ndarray only")
    _shape(args[1], name)
    return _PendingArray()


def _array_state(state: Any, budget: LoadBudget) -> Any:
    """The array described by an ``ndarray.__setstate__`` state, built from validated parts."""
    name = "numpy.ndarray.__setstate__"
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _invalid(name, "array state is not (version, shape, dtype, is_fortran, data)")
    shape, dtype, fortran, data = state[-4:]
    if not isinstance(fortran, bool):
        raise _invalid(name, "array state's is_fortran flag is not a boolean")
    return _array_from(
        _buffer(data, name), _plain_dtype(dtype, name), _shape(shape, name),
        "F" if fortran else "C", name, budget,
    )  # fmt: skip


def _numpy_frombuffer(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    name = "numpy._core.numeric._frombuffer"
    if len(args) not in (4, 5):
        raise _invalid(name, "_frombuffer takes (buffer, dtype, shape, order[, axis_order])")
    data, dtype, shape, order = _buffer(args[0], name), args[1], args[2], args[3]
    shape = _shape(shape, name)
    if order not in ("C", "F", "K"):
        raise _invalid(name, f"unknown array order {order!r:.20}")
    axis_order = args[4] if len(args) == 5 else None
    dtype = _plain_dtype(dtype, name)
    if order != "K" or axis_order is None:
        return _array_from(data, dtype, shape, "F" if order == "F" else "C", name, budget)
    # numpy writes order "K" arrays in memory order: ``shape`` is the shape in memory, and
    # numpy's own _frombuffer transposes it by ``axis_order`` back to the array's axes.
    if sorted(axis_order) != list(range(len(shape))) if isinstance(axis_order, tuple) else True:
        raise _invalid(name, f"axis order {axis_order!r:.40} is not a permutation of the axes")
    return _array_from(data, dtype, shape, "C", name, budget).transpose(axis_order)


def _numpy_scalar(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    name = "numpy._core.multiarray.scalar"
    if len(args) != 2:
        raise _invalid(name, "scalar takes (dtype, data)")
    dtype = _plain_dtype(args[0], name)
    return _array_from(_buffer(args[1], name), dtype, (1,), "C", name, budget)[0]


def _bit_generator_ctor(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    from numpy.random import PCG64

    if len(args) != 1 or args[0] not in (PCG64, "PCG64"):
        raise _invalid("numpy.random._pickle.__bit_generator_ctor", "only PCG64 is allowed")
    return PCG64()


def _generator_ctor(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    from numpy.random import PCG64, Generator

    if len(args) != 1 or not isinstance(args[0], (PCG64, str)):
        raise _invalid("numpy.random._pickle.__generator_ctor", "expects one PCG64 bit generator")
    return Generator(args[0] if isinstance(args[0], PCG64) else PCG64())


def _seed_sequence(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    from numpy.random import SeedSequence

    name = "numpy.random.bit_generator.__pyx_unpickle_SeedSequence"
    if len(args) != 3 or args[0] is not SeedSequence or type(args[1]) is not int:
        raise _invalid(name, "expects (SeedSequence, checksum, state)")
    if args[2] is not None:
        raise _invalid(name, "the state comes by BUILD, where it is checked")
    # An empty instance, as the Cython helper makes; the layout checksum guards nothing here
    # because the state is validated field by field before __setstate__ sees it.
    return SeedSequence.__new__(SeedSequence)


def _seed_sequence_state(state: Any) -> str | None:
    """Why a SeedSequence state is unsafe to hand to its Cython ``__setstate__``, or None."""
    import numpy as np

    if not isinstance(state, tuple) or len(state) != 5:
        return "SeedSequence state is not (entropy, spawned, pool, pool_size, spawn_key)"
    entropy, spawned, pool, pool_size, spawn_key = state
    if isinstance(entropy, (tuple, list)) and len(entropy) > 64:
        # numpy's conversion of the entropy is quadratic in its length.
        raise LoadBudgetExceeded(
            "max_int_bytes", f"SeedSequence entropy of {len(entropy)} words (at most 64)"
        )
    entropy_ok = entropy is None or type(entropy) is int or (
        isinstance(entropy, (tuple, list)) and all(type(e) is int for e in entropy)
    )  # fmt: skip
    if not entropy_ok:
        return "SeedSequence entropy is not an integer or a short list of integers"
    if type(spawned) is not int or type(pool_size) is not int or not 1 <= pool_size <= 64:
        return "SeedSequence counters are out of range"
    if not (
        isinstance(pool, np.ndarray) and pool.dtype == np.uint32 and pool.shape == (pool_size,)
    ):
        return "SeedSequence pool is not a uint32 array of pool_size words"
    if not (isinstance(spawn_key, tuple) and len(spawn_key) <= 64):
        return "SeedSequence spawn key is not a short tuple"
    if not all(type(k) is int for k in spawn_key):
        return "SeedSequence spawn key holds something other than integers"
    return None


def _torch_device(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    import torch

    ok = 1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) <= 32
    if not ok or (len(args) == 2 and type(args[1]) is not int):
        raise _invalid("torch.device", "a device is a short name and an optional index")
    return torch.device(*args)


def _empty_call(factory: Callable[[], Any]) -> Callable[[tuple[Any, ...], LoadBudget], Any]:
    def call(args: tuple[Any, ...], budget: LoadBudget) -> Any:
        if args:
            raise _invalid(getattr(factory, "__qualname__", "?"), "takes no arguments here")
        return factory()

    return call


def _deque(args: tuple[Any, ...], budget: LoadBudget) -> Any:
    if len(args) != 2 or not isinstance(args[0], (list, tuple)):
        raise _invalid("collections.deque", "expects (items, maxlen)")
    maxlen = args[1]
    if maxlen is not None and (type(maxlen) is not int or not 0 <= maxlen <= 1 << 24):
        raise _invalid("collections.deque", f"maxlen {maxlen!r:.20} is out of range")
    return collections.deque(args[0], maxlen)


#: Globals that may be created empty by ``NEWOBJ`` and then receive a checked ``BUILD``.
NEW_EMPTY: Final = "new-empty"

#: How each allowed global may be used; a global that is missing here is a value only.
CALL_RULES: Final[Mapping[tuple[str, str], Any]] = types.MappingProxyType(
    {
        ("collections", "OrderedDict"): _empty_call(collections.OrderedDict),
        ("collections", "deque"): _deque,
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
        ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy.random._pickle", "__bit_generator_ctor"): _bit_generator_ctor,
        ("numpy.random._pickle", "__generator_ctor"): _generator_ctor,
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): _seed_sequence,
        ("torch", "device"): _torch_device,
        ("gymnasium.spaces.box", "Box"): NEW_EMPTY,
        ("gymnasium.spaces.discrete", "Discrete"): NEW_EMPTY,
        ("gymnasium.spaces.multi_discrete", "MultiDiscrete"): NEW_EMPTY,
        ("gymnasium.spaces.multi_binary", "MultiBinary"): NEW_EMPTY,
        ("gymnasium.spaces.dict", "Dict"): NEW_EMPTY,
        ("gymnasium.spaces.tuple", "Tuple"): NEW_EMPTY,
        ("stable_baselines3.common.utils", "FloatSchedule"): NEW_EMPTY,
        ("stable_baselines3.common.utils", "ConstantSchedule"): NEW_EMPTY,
        ("stable_baselines3.common.utils", "LinearSchedule"): NEW_EMPTY,
        ("dppo_ckpt.vgs", "VarianceGradientScaler"): NEW_EMPTY,
    }
)

_NDARRAY_TOKEN: Final = object()


def _space_state(obj: Any, state: Any, budget: LoadBudget) -> str | None:
    """Why a gymnasium space's state is unsafe (SB3 allocates networks from it), or None."""
    import numpy as np
    from gymnasium import spaces

    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return "a space's state must be a dict of attribute names"
    shape = state.get("_shape")
    if shape is not None:
        _shape(shape, type(obj).__name__)
        budget.elements(math.prod(shape), f"a {type(obj).__name__} space")
    if isinstance(obj, spaces.Box):
        for key in ("low", "high"):
            bound = state.get(key)
            if not isinstance(bound, np.ndarray) or bound.shape != shape:
                return f"Box {key} is not an array of the space's shape"
    elif isinstance(obj, spaces.Discrete):
        n = state.get("n")
        n = int(n) if isinstance(n, (int, np.integer)) else None
        if n is None or n <= 0:
            return "Discrete n is not a positive size"
        # SB3 builds an output layer with n units from it.
        budget.elements(n, "a Discrete space")
    elif isinstance(obj, spaces.MultiDiscrete):
        nvec = state.get("nvec")
        if not isinstance(nvec, np.ndarray) or nvec.dtype.kind not in "iu":
            return "MultiDiscrete nvec is not an integer array"
        if nvec.size and (
            nvec.min() <= 0 or int(nvec.astype(np.int64).sum()) > budget.max_elements
        ):
            return "MultiDiscrete nvec is out of range"
    elif isinstance(obj, spaces.MultiBinary):
        n = state.get("n")
        sizes = (n,) if isinstance(n, (int, np.integer)) else n
        if not isinstance(sizes, (tuple, list, np.ndarray)) or not all(
            isinstance(s, (int, np.integer)) and s > 0 for s in sizes
        ):
            return "MultiBinary n is not a size or a shape"
        budget.elements(math.prod(int(s) for s in sizes), "a MultiBinary space")
    elif isinstance(obj, (spaces.Dict, spaces.Tuple)):
        inner = state.get("spaces")
        values = inner.values() if isinstance(inner, dict) else inner
        if not isinstance(values, (list, tuple, type({}.values()))) or not all(
            isinstance(s, spaces.Space) for s in values
        ):
            return f"{type(obj).__name__} spaces are not spaces"
    return None


# -- the evaluator -------------------------------------------------------------------------


class _Evaluator:
    """Evaluate one stand-in graph. Shared objects stay shared; cycles through containers
    and ``BUILD`` states are kept, as the standard unpickler keeps them."""

    def __init__(
        self,
        resolve: Callable[[StubGlobal], Any],
        build_check: Callable[[Any, Any], str | None],
        load_bytes: Callable[[bytes], Any],
        budget: LoadBudget,
        rules: Mapping[tuple[str, str], Any],
    ) -> None:
        self._rules = rules
        self._resolve = resolve
        self._build_check = build_check
        self._load_bytes = load_bytes
        self._budget = budget
        self._done: dict[int, Any] = {}

    def value(self, node: Any, depth: int = 0) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        key = id(node)
        if key in self._done:
            return self._done[key]
        if depth > self._budget.max_depth:
            raise LoadBudgetExceeded(
                "max_depth", f"objects nest deeper than {self._budget.max_depth} levels"
            )
        result = self._build(node, depth + 1)
        self._done[key] = result
        return result

    def _build(self, node: Any, depth: int) -> Any:
        key = id(node)
        if isinstance(node, RawBytes):
            self._budget.spend(len(node), "a byte string")
            return node.tobytes()
        if isinstance(node, bytearray):
            self._budget.spend(len(node), "a byte array")
            return bytearray(node)
        if isinstance(node, list):
            out: list[Any] = []
            self._done[key] = out
            out.extend(self.value(item, depth) for item in node)
            return out
        if isinstance(node, tuple):
            return tuple(self.value(item, depth) for item in node)
        if isinstance(node, dict):
            mapping: dict[Any, Any] = {}
            self._done[key] = mapping
            for k, v in node.items():
                mapping[self._key(k, depth)] = self.value(v, depth)
            return mapping
        if isinstance(node, set):
            members: set[Any] = set()
            self._done[key] = members
            members.update(self._key(item, depth) for item in node)
            return members
        if isinstance(node, frozenset):
            return frozenset(self._key(item, depth) for item in node)
        if isinstance(node, StubGlobal):
            return self._resolve(node)
        if isinstance(node, StubCall):
            return self._call(node, depth)
        if isinstance(node, StubPersistent):
            raise MaterialiseRefused("<persistent id>", "a data entry holds a persistent id")
        if isinstance(node, StubExtension):
            raise MaterialiseRefused(f"<copyreg extension {node.code}>", "extension codes")
        raise MaterialiseRefused(type(node).__name__, "unexpected value in the pickle")

    def _key(self, node: Any, depth: int) -> Any:
        value = self.value(node, depth)
        try:
            hash(value)
        except TypeError:
            raise MaterialiseInvalid("<dict key>", "an unhashable dict key or set item") from None
        return value

    def _call(self, node: StubCall, depth: int) -> Any:
        if not isinstance(node.func, StubGlobal):
            raise MaterialiseRefused("<call>", "a call of something other than a named global")
        name = node.func.name
        rule = self._rules.get((node.func.module, node.func.qualname))
        target = self.value(node.func, depth)
        args = tuple(self.value(arg, depth) for arg in node.args)
        if node.kind in ("NEWOBJ", "NEWOBJ_EX"):
            if rule is not NEW_EMPTY or args or node.kwargs or not isinstance(target, type):
                raise MaterialiseRefused(name, f"{name} may not be created with {node.kind} here")
            obj = target.__new__(target)
        elif rule is None or rule is NEW_EMPTY:
            if target is _LOAD_FROM_BYTES_TOKEN:
                obj = self._blob(args)
            elif callable(target) and getattr(target, "_dppo_checked", False):
                obj = target(*args)
            else:
                raise MaterialiseRefused(name, f"{name} is allowed as a value, not as a call")
        else:
            obj = rule(args, self._budget)
        self._done[id(node)] = obj
        if isinstance(obj, _PendingArray):
            obj = self._finish_array(node, depth)
            self._done[id(node)] = obj
            return obj
        for op, value in node.ops:
            if op == "build":
                self._apply_build(obj, self.value(value, depth), name)
            elif op == "append":
                self._append(obj, [self.value(v, depth) for v in value], name)
            else:
                self._setitems(
                    obj, [(self._key(k, depth), self.value(v, depth)) for k, v in value], name
                )
        return obj

    def _blob(self, args: tuple[Any, ...]) -> Any:
        if len(args) != 1 or not isinstance(args[0], (bytes, bytearray)):
            raise MaterialiseInvalid("torch.storage._load_from_bytes", "tensor blob is not bytes")
        return self._load_bytes(bytes(args[0]))

    def _finish_array(self, node: StubCall, depth: int) -> Any:
        if [op for op, _ in node.ops] != ["build"]:
            raise MaterialiseRefused(node.func.name, "an array must get exactly one state")
        return _array_state(self.value(node.ops[0][1], depth), self._budget)

    def _apply_build(self, obj: Any, state: Any, name: str) -> None:
        from gymnasium.spaces import Space

        reason = self._build_check(obj, state)
        if reason is not None:
            raise MaterialiseRefused(name, reason)
        if isinstance(obj, Space):
            reason = _space_state(obj, state, self._budget)
        elif type(obj).__name__ == "SeedSequence":
            reason = _seed_sequence_state(state)
        if reason is not None:
            raise MaterialiseInvalid(name, reason)
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
            return
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if state:
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise MaterialiseInvalid(name, "an object's state is not a dict of attributes")
            obj.__dict__.update(state)
        if slots:
            raise MaterialiseInvalid(name, "slot state is not accepted")

    @staticmethod
    def _append(obj: Any, items: list[Any], name: str) -> None:
        if not isinstance(obj, (list, collections.deque)):
            raise MaterialiseInvalid(name, "APPEND to something other than a list")
        obj.extend(items)

    @staticmethod
    def _setitems(obj: Any, pairs: list[tuple[Any, Any]], name: str) -> None:
        if not isinstance(obj, dict):
            raise MaterialiseInvalid(name, "SETITEM on something other than a dict")
        obj.update(pairs)


#: What :func:`materialise` resolves ``numpy.ndarray`` and ``_load_from_bytes`` to: tokens
#: that only their rules accept, never the real callables.
NDARRAY_TOKEN: Final = _NDARRAY_TOKEN
_LOAD_FROM_BYTES_TOKEN: Final = object()
LOAD_FROM_BYTES_TOKEN: Final = _LOAD_FROM_BYTES_TOKEN


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a replacement callable (written by this package) as callable with any arguments:
    it validates them itself."""
    fn._dppo_checked = True  # type: ignore[attr-defined]
    return fn


def materialise(
    root: Any,
    *,
    resolve: Callable[[StubGlobal], Any],
    build_check: Callable[[Any, Any], str | None],
    load_bytes: Callable[[bytes], Any],
    budget: LoadBudget,
    rules: Mapping[tuple[str, str], Any] = CALL_RULES,
) -> Any:
    """Build the real value of a stand-in graph.

    :param root: the graph from :func:`~dppo_ckpt.checkpoint.stub_pickle.stub_model`.
    :param resolve: the allowed object for a global (raises to refuse it); ``numpy.ndarray``
        and ``torch.storage._load_from_bytes`` must resolve to :data:`NDARRAY_TOKEN` and
        :data:`LOAD_FROM_BYTES_TOKEN`.
    :param build_check: why a ``BUILD`` of ``state`` on an object is unsafe, or None.
    :param load_bytes: rebuilds a nested tensor blob without running code.
    :param budget: the file's allocation budget.
    :param rules: how each global may be used (:data:`CALL_RULES`, plus the user's entries).
    :raises MaterialiseRefused: a global was used against its rule.
    :raises LoadBudgetExceeded: the objects would exceed ``budget``.
    """
    return _Evaluator(resolve, build_check, load_bytes, budget, rules).value(root)
