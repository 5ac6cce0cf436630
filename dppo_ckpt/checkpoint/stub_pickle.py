"""The one reader of pickle bytes: decode a pickle into inert stand-ins, and write them back.

Every part of the package that looks at pickle bytes (the static scan, ``inspect``, legacy
detection, ``migrate`` and the safe loader) goes through :func:`stub_model`; there is no
second opcode table. The scan and the loader are analyses of the same decoded graph, so what
is scanned is, by construction, what is loaded.

:func:`stub_loads` interprets the opcodes of a pickle of any protocol without importing
or calling anything it names: a global becomes a :class:`StubGlobal` holding its module and
qualified name, a call (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``OBJ``, ``INST``) becomes a
:class:`StubCall` recording the callable, its arguments and what was applied to the result
afterwards (``BUILD`` states, appended items, set items), and every ``bytes`` payload becomes
a :class:`RawBytes` view into the input buffer, so that tensor blobs are neither copied nor
decoded. Containers, strings and numbers are plain Python values, and the memo is honoured,
so shared objects stay shared.

:func:`stub_dumps` writes such a graph with the standard pickler's rules (memoisation,
framing, batching of ``APPENDS``/``SETITEMS``), emitting every stand-in back as the very same
global, call or bytes. A stub round trip of a pickle written by ``pickle``/``cloudpickle``
therefore reproduces it byte for byte, and editing the graph in between (e.g. dropping keys
of a ``BUILD`` state) gives exactly what the pickler would have written for the edited state.

Nothing here imports torch or numpy, and nothing from the pickle is ever executed. The
reader is bounded: a budget on opcodes, on the size of integers and on wall time is checked
as it goes (:class:`ReadBudget`), so a small hostile file cannot make it run long or grow
large.
"""

from __future__ import annotations

import codecs
import io
import pickle
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final

__all__ = [
    "PickleModel",
    "RawBytes",
    "ReadBudget",
    "ReadBudgetExceeded",
    "StubCall",
    "StubExtension",
    "StubGlobal",
    "StubPersistent",
    "StubPickleError",
    "iter_stubs",
    "pickle_protocol",
    "stub_dumps",
    "stub_loads",
    "stub_model",
]


class StubPickleError(ValueError):
    """The pickle is corrupt, or uses a construct the stand-ins cannot represent faithfully.

    ``globals_seen`` holds the globals read before the error, so that a caller can report an
    unsafe global found earlier in the stream ahead of the structural error that follows it.
    """

    def __init__(self, reason: str, globals_seen: Counter[tuple[str, str]] | None = None):
        super().__init__(reason)
        self.globals_seen: Counter[tuple[str, str]] = globals_seen or Counter()


class ReadBudgetExceeded(StubPickleError):
    """The pickle needs more of a budget than :class:`ReadBudget` grants.

    :param budget: the budget's name, as the command line spells its option.
    """

    def __init__(self, budget: str, reason: str) -> None:
        super().__init__(reason)
        self.budget = budget


@dataclass
class ReadBudget:
    """What reading pickles may cost, shared by every pickle of one file.

    :param max_opcodes: opcodes over all pickles read with this budget.
    :param max_int_bytes: the largest integer, in bytes of two's complement (a decimal
        integer is limited to the same magnitude); converting huge integers is quadratic.
    :param deadline: ``time.monotonic()`` value after which reading stops, or ``None``.
    """

    max_opcodes: int = 5_000_000
    max_int_bytes: int = 1024
    deadline: float | None = None
    opcodes: int = field(default=0, init=False)

    def spend(self, opcodes: int) -> None:
        self.opcodes += opcodes
        if self.opcodes > self.max_opcodes:
            raise ReadBudgetExceeded(
                "max_opcodes", f"more than {self.max_opcodes} pickle opcodes in one file"
            )
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ReadBudgetExceeded("timeout", "reading the pickles took longer than the timeout")


class StubGlobal:
    """A global named by the pickle (``module.qualname``), never imported.

    :param module: module name as written in the pickle.
    :param qualname: qualified name as written in the pickle.
    :param stacked: whether it was written as ``STACK_GLOBAL`` (the operands are then string
        objects of the graph, kept so that their memoisation is reproduced) or as ``GLOBAL``.
    """

    __slots__ = ("module", "qualname", "stacked")

    def __init__(self, module: str, qualname: str, stacked: bool = True) -> None:
        self.module = module
        self.qualname = qualname
        self.stacked = stacked

    @property
    def name(self) -> str:
        """``module.qualname``."""
        return f"{self.module}.{self.qualname}"

    def __repr__(self) -> str:
        return f"StubGlobal({self.name})"


class StubCall:
    """The result of calling a stand-in: what would have been built, and how.

    :param kind: the opcode that made it: ``"REDUCE"``, ``"NEWOBJ"``, ``"NEWOBJ_EX"``, ``"OBJ"``
        or ``"INST"``.
    :param func: the callable (a :class:`StubGlobal`, or another stand-in).
    :param args: positional arguments (a tuple).
    :param kwargs: keyword arguments of ``NEWOBJ_EX`` (a dict), else ``None``.
    :param inst: for ``INST``, the ``(module, qualname)`` written in the opcode.

    ``ops`` lists what the pickle applied to the result afterwards, in order: ``("build",
    state)``, ``("append", [items])`` and ``("setitems", [(key, value), ...])``.
    """

    __slots__ = ("args", "func", "inst", "kind", "kwargs", "ops")

    def __init__(
        self,
        kind: str,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        inst: tuple[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.inst = inst
        self.ops: list[tuple[str, Any]] = []

    @property
    def states(self) -> list[Any]:
        """The ``BUILD`` states applied to the result, in order."""
        return [value for op, value in self.ops if op == "build"]

    def __repr__(self) -> str:
        return f"StubCall({self.kind}, {self.func!r}, {len(self.args)} args, {len(self.ops)} ops)"


class StubPersistent:
    """A persistent id (``PERSID``/``BINPERSID``): torch's reference to a tensor storage."""

    __slots__ = ("pid",)

    def __init__(self, pid: Any) -> None:
        self.pid = pid

    def __repr__(self) -> str:
        return f"StubPersistent({self.pid!r})"


class StubExtension:
    """A ``copyreg`` extension code (``EXT1``/``EXT2``/``EXT4``): a global named by a number
    whose meaning lives in the reading process, not in the file."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

    def __repr__(self) -> str:
        return f"StubExtension({self.code})"


class RawBytes:
    """A ``bytes`` payload of the pickle, kept as a view of the input (never copied)."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def tobytes(self) -> bytes:
        return self.view.tobytes()

    def __repr__(self) -> str:
        return f"RawBytes({len(self.view)} bytes)"


class _Mark:
    __slots__ = ()


_MARK: Final = _Mark()


def pickle_protocol(data: bytes | memoryview) -> int:
    """The protocol announced by the ``PROTO`` opcode at the start of ``data`` (0 if none)."""
    view = memoryview(data)
    if len(view) >= 2 and view[0] == 0x80:
        return view[1]
    return 0


@dataclass
class PickleModel:
    """One decoded pickle: its graph of stand-ins and what the reader saw on the way.

    :param root: the unpickled value, with stand-ins for globals, calls and bytes.
    :param globals_seen: every global named, with how often (``GLOBAL``, ``STACK_GLOBAL``
        and ``INST``); ``("?", "?")``-style names mark a ``STACK_GLOBAL`` of non-strings.
    :param dynamic: descriptions of globals whose names are not literal strings.
    :param builds_on_globals: globals that a ``BUILD`` was applied to (it would rewrite the
        class or function itself).
    :param extensions: the ``copyreg`` extension codes used.
    :param end: offset just past the ``STOP`` opcode.
    """

    root: Any
    globals_seen: Counter[tuple[str, str]]
    dynamic: list[str]
    builds_on_globals: list[str]
    extensions: list[int]
    end: int


def stub_model(
    data: bytes | bytearray | memoryview, *, start: int = 0, budget: ReadBudget | None = None
) -> PickleModel:
    """Decode the pickle at ``start`` of ``data`` into stand-ins, with what the reader saw.

    :param data: the bytes; ``RawBytes`` in the result are views of them, so keep them alive.
    :param start: offset of the pickle (torch's legacy format holds several in a row).
    :param budget: limits shared with the other pickles of the file.
    :raises ReadBudgetExceeded: the pickle needs more than ``budget`` grants.
    :raises StubPickleError: corrupt pickle, or an unsupported construct (out-of-band
        buffers, ``POP_MARK`` of values that were built).
    """
    reader = _StubReader(memoryview(data).cast("B"), start, budget or ReadBudget())
    try:
        root = reader.load()
    except StubPickleError as exc:
        exc.globals_seen = reader.globals_seen
        raise
    except RecursionError:
        raise StubPickleError("corrupt pickle: nested too deeply", reader.globals_seen) from None
    except (
        IndexError, struct.error, ValueError, TypeError, KeyError, OverflowError, MemoryError,
    ) as exc:  # fmt: skip
        raise StubPickleError(
            f"corrupt pickle: {type(exc).__name__}: {exc}", reader.globals_seen
        ) from None
    return PickleModel(
        root,
        reader.globals_seen,
        reader.dynamic,
        reader.builds_on_globals,
        reader.extensions,
        reader.pos,
    )


def stub_loads(data: bytes | bytearray | memoryview) -> Any:
    """Decode one pickle into stand-ins without importing or calling anything.

    :param data: the pickle; ``RawBytes`` in the result are views of it, so keep it alive.
    :return: the root of the decoded graph.
    :raises StubPickleError: see :func:`stub_model`.
    """
    return stub_model(data).root


class _StubReader:
    """A pickle virtual machine whose only effects are building stand-ins."""

    def __init__(self, buf: memoryview, start: int, budget: ReadBudget) -> None:
        self.buf = buf
        self.pos = start
        self.budget = budget
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.globals_seen: Counter[tuple[str, str]] = Counter()
        self.dynamic: list[str] = []
        self.builds_on_globals: list[str] = []
        self.extensions: list[int] = []

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise StubPickleError(f"pickle data was truncated at byte {self.pos}")
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def _unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(fmt, self._take(size))
        return value

    def _pop(self) -> Any:
        if not self.stack:
            raise StubPickleError(f"stack underflow at byte {self.pos}")
        return self.stack.pop()

    def _pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise StubPickleError(f"no MARK on the stack at byte {self.pos}")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _top(self) -> Any:
        if not self.stack:
            raise StubPickleError(f"stack underflow at byte {self.pos}")
        return self.stack[-1]

    def _text(self, n: int) -> str:
        return str(self._take(n), "utf-8", "surrogatepass")

    def _raw_line(self) -> memoryview:
        end = bytes(self.buf[self.pos : self.pos + _MAX_LINE]).find(b"\n")
        if end < 0:
            raise StubPickleError(f"unterminated line at byte {self.pos}")
        return self._take(end + 1)[:-1]

    def _line(self) -> str:
        return str(self._raw_line(), "utf-8")

    def _int(self, value: int) -> int:
        if value.bit_length() > 8 * self.budget.max_int_bytes:
            raise ReadBudgetExceeded(
                "max_int_bytes",
                f"an integer at byte {self.pos} is larger than {self.budget.max_int_bytes} bytes",
            )
        return value

    def load(self) -> Any:
        handlers = _HANDLERS
        count = 0
        try:
            while True:
                if self.pos >= len(self.buf):
                    raise StubPickleError("pickle ends without STOP")
                start = self.pos
                code = self.buf[self.pos]
                self.pos += 1
                count += 1
                if count == _BUDGET_EVERY:
                    self.budget.spend(count)
                    count = 0
                handler = handlers.get(code)
                if handler is None:
                    raise StubPickleError(f"unknown opcode {bytes([code])!r} at byte {start}")
                if handler(self) is _STOP:
                    result = self._pop()
                    if self.stack or self.metastack:
                        raise StubPickleError("values left on the stack at STOP")
                    return result
        finally:
            self.budget.spend(count)

    # -- opcodes ----------------------------------------------------------------------------

    def op_proto(self) -> None:
        self._take(1)

    def op_frame(self) -> None:
        self._take(8)  # frames only group opcodes; the whole pickle is in memory

    def op_stop(self) -> object:
        return _STOP

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_dup(self) -> None:
        self.stack.append(self._top())

    def op_none(self) -> None:
        self.stack.append(None)

    def op_true(self) -> None:
        self.stack.append(True)

    def op_false(self) -> None:
        self.stack.append(False)

    def op_binint(self) -> None:
        self.stack.append(self._unpack("<i"))

    def op_binint1(self) -> None:
        self.stack.append(self._unpack("<B"))

    def op_binint2(self) -> None:
        self.stack.append(self._unpack("<H"))

    def op_long1(self) -> None:
        n = self._unpack("<B")
        self.stack.append(int.from_bytes(self._take(n), "little", signed=True))

    def op_long4(self) -> None:
        n = self._unpack("<i")
        if n > self.budget.max_int_bytes:
            raise ReadBudgetExceeded(
                "max_int_bytes",
                f"an integer at byte {self.pos} is larger than {self.budget.max_int_bytes} bytes",
            )
        self.stack.append(int.from_bytes(self._take(n), "little", signed=True))

    def op_binfloat(self) -> None:
        self.stack.append(struct.unpack(">d", self._take(8))[0])

    def op_short_binunicode(self) -> None:
        self.stack.append(self._text(self._unpack("<B")))

    def op_binunicode(self) -> None:
        self.stack.append(self._text(self._unpack("<I")))

    def op_binunicode8(self) -> None:
        self.stack.append(self._text(self._unpack("<Q")))

    def op_short_binbytes(self) -> None:
        self.stack.append(RawBytes(self._take(self._unpack("<B"))))

    def op_binbytes(self) -> None:
        self.stack.append(RawBytes(self._take(self._unpack("<I"))))

    def op_binbytes8(self) -> None:
        self.stack.append(RawBytes(self._take(self._unpack("<Q"))))

    def op_bytearray8(self) -> None:
        self.stack.append(bytearray(self._take(self._unpack("<Q"))))

    def op_empty_tuple(self) -> None:
        self.stack.append(())

    def op_tuple(self) -> None:
        items = self._pop_mark()  # before self.stack.append: popping swaps the stack
        self.stack.append(tuple(items))

    def op_tuple1(self) -> None:
        self.stack.append((self._pop(),))

    def op_tuple2(self) -> None:
        b, a = self._pop(), self._pop()
        self.stack.append((a, b))

    def op_tuple3(self) -> None:
        c, b, a = self._pop(), self._pop(), self._pop()
        self.stack.append((a, b, c))

    def op_empty_list(self) -> None:
        self.stack.append([])

    def op_list(self) -> None:
        items = self._pop_mark()
        self.stack.append(items)

    def op_empty_dict(self) -> None:
        self.stack.append({})

    def op_dict(self) -> None:
        items = self._pop_mark()
        self.stack.append(dict(zip(items[::2], items[1::2], strict=True)))

    def op_empty_set(self) -> None:
        self.stack.append(set())

    def op_frozenset(self) -> None:
        items = self._pop_mark()
        self.stack.append(frozenset(items))

    def op_append(self) -> None:
        value = self._pop()
        self._extend(self._top(), [value])

    def op_appends(self) -> None:
        items = self._pop_mark()
        self._extend(self._top(), items)

    def _extend(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, StubCall):
            target.ops.append(("append", items))
        else:
            raise StubPickleError(f"APPEND to a {type(target).__name__} at byte {self.pos}")

    def op_setitem(self) -> None:
        value, key = self._pop(), self._pop()
        self._setitems(self._top(), [(key, value)])

    def op_setitems(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise StubPickleError(f"odd number of SETITEMS operands at byte {self.pos}")
        self._setitems(self._top(), list(zip(items[::2], items[1::2], strict=True)))

    def _setitems(self, target: Any, pairs: list[tuple[Any, Any]]) -> None:
        if isinstance(target, dict):
            target.update(pairs)
        elif isinstance(target, StubCall):
            target.ops.append(("setitems", pairs))
        else:
            raise StubPickleError(f"SETITEM on a {type(target).__name__} at byte {self.pos}")

    def op_additems(self) -> None:
        items = self._pop_mark()
        target = self._top()
        if not isinstance(target, set):
            raise StubPickleError(f"ADDITEMS on a {type(target).__name__} at byte {self.pos}")
        target.update(items)

    # -- protocols 0 and 1 (text opcodes) ------------------------------------------------

    def op_int(self) -> None:
        line = bytes(self._raw_line())
        if line == b"00":
            self.stack.append(False)
        elif line == b"01":
            self.stack.append(True)
        else:
            self.stack.append(self._int(self._decimal(line)))

    def op_long(self) -> None:
        line = bytes(self._raw_line())
        self.stack.append(self._int(self._decimal(line[:-1] if line.endswith(b"L") else line)))

    def _decimal(self, line: bytes) -> int:
        # Checked before int() runs: decimal conversion is quadratic in the digit count.
        if len(line) > 3 * self.budget.max_int_bytes:
            raise ReadBudgetExceeded(
                "max_int_bytes",
                f"an integer at byte {self.pos} is larger than {self.budget.max_int_bytes} bytes",
            )
        return int(line)

    def op_float(self) -> None:
        self.stack.append(float(bytes(self._raw_line())))

    def op_string(self) -> None:
        line = bytes(self._raw_line())
        if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
            raise StubPickleError(f"STRING opcode argument must be quoted at byte {self.pos}")
        # As the standard unpickler does (its default encoding is ASCII).
        self.stack.append(str(codecs.escape_decode(line[1:-1])[0], "ascii"))

    def op_binstring(self) -> None:
        n = self._unpack("<i")
        self.stack.append(str(self._take(n), "ascii"))

    def op_short_binstring(self) -> None:
        self.stack.append(str(self._take(self._unpack("<B")), "ascii"))

    def op_unicode(self) -> None:
        self.stack.append(str(self._raw_line(), "raw-unicode-escape"))

    def op_put(self) -> None:
        self.memo[int(bytes(self._raw_line()))] = self._top()

    def op_get(self) -> None:
        self._get(int(bytes(self._raw_line())))

    def op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def op_pop_mark(self) -> None:
        self._pop_mark()

    def op_persid(self) -> None:
        self.stack.append(StubPersistent(str(self._raw_line(), "ascii")))

    def op_binpersid(self) -> None:
        self.stack.append(StubPersistent(self._pop()))

    def _extension(self, code: int) -> None:
        self.extensions.append(code)
        self.stack.append(StubExtension(code))

    def op_ext1(self) -> None:
        self._extension(self._unpack("<B"))

    def op_ext2(self) -> None:
        self._extension(self._unpack("<H"))

    def op_ext4(self) -> None:
        self._extension(self._unpack("<i"))

    def op_out_of_band(self) -> None:
        raise StubPickleError(f"out-of-band buffer at byte {self.pos} (none was supplied)")

    # -- globals and calls ---------------------------------------------------------------

    def op_global(self) -> None:
        module = self._line()
        qualname = self._line()
        self.globals_seen[(module, qualname)] += 1
        self.stack.append(StubGlobal(module, qualname, stacked=False))

    def op_stack_global(self) -> None:
        qualname, module = self._pop(), self._pop()
        if not (isinstance(module, str) and isinstance(qualname, str)):
            # Named by values built at load time: refused by every analysis, never resolved.
            described = f"{_describe(module)}.{_describe(qualname)}"
            self.dynamic.append(described)
            self.stack.append(StubGlobal("<dynamic>", described, stacked=True))
            return
        self.globals_seen[(module, qualname)] += 1
        # The very string objects are kept, so their memo entries are reproduced on writing.
        self.stack.append(StubGlobal(module, qualname, stacked=True))

    def op_reduce(self) -> None:
        args, func = self._pop(), self._pop()
        if not isinstance(args, tuple):
            raise StubPickleError(f"REDUCE with non-tuple arguments at byte {self.pos}")
        self.stack.append(StubCall("REDUCE", func, args))

    def op_newobj(self) -> None:
        args, cls = self._pop(), self._pop()
        if not isinstance(args, tuple):
            raise StubPickleError(f"NEWOBJ with non-tuple arguments at byte {self.pos}")
        self.stack.append(StubCall("NEWOBJ", cls, args))

    def op_newobj_ex(self) -> None:
        kwargs, args, cls = self._pop(), self._pop(), self._pop()
        if not (isinstance(args, tuple) and isinstance(kwargs, dict)):
            raise StubPickleError(f"NEWOBJ_EX with bad arguments at byte {self.pos}")
        self.stack.append(StubCall("NEWOBJ_EX", cls, args, kwargs))

    def op_obj(self) -> None:
        items = self._pop_mark()
        if not items:
            raise StubPickleError(f"OBJ without a class at byte {self.pos}")
        self.stack.append(StubCall("OBJ", items[0], tuple(items[1:])))

    def op_inst(self) -> None:
        module = self._line()
        qualname = self._line()
        self.globals_seen[(module, qualname)] += 1
        args = tuple(self._pop_mark())
        glob = StubGlobal(module, qualname, stacked=False)
        self.stack.append(StubCall("INST", glob, args, inst=(module, qualname)))

    def op_build(self) -> None:
        state = self._pop()
        target = self._top()
        if isinstance(target, StubGlobal):
            # Recorded, not fatal: the analyses refuse it as unsafe rather than as damage.
            self.builds_on_globals.append(target.name)
            return
        if not isinstance(target, StubCall):
            raise StubPickleError(f"BUILD on a {type(target).__name__} at byte {self.pos}")
        target.ops.append(("build", state))

    def op_binput(self) -> None:
        self.memo[self._unpack("<B")] = self._top()

    def op_long_binput(self) -> None:
        self.memo[self._unpack("<I")] = self._top()

    def op_memoize(self) -> None:
        self.memo[len(self.memo)] = self._top()

    def _get(self, index: int) -> None:
        if index not in self.memo:
            raise StubPickleError(f"memo key {index} missing at byte {self.pos}")
        self.stack.append(self.memo[index])

    def op_binget(self) -> None:
        self._get(self._unpack("<B"))

    def op_long_binget(self) -> None:
        self._get(self._unpack("<I"))


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value)[:80]
    if isinstance(value, StubGlobal):
        return value.name
    return "?"


_STOP: Final = object()
_MAX_LINE: Final = 64 * 1024
# How many opcodes run between two checks of the shared budget (and of the clock).
_BUDGET_EVERY: Final = 4096

_HANDLERS: Final = {
    pickle.PROTO[0]: _StubReader.op_proto,
    pickle.FRAME[0]: _StubReader.op_frame,
    pickle.STOP[0]: _StubReader.op_stop,
    pickle.MARK[0]: _StubReader.op_mark,
    pickle.DUP[0]: _StubReader.op_dup,
    pickle.NONE[0]: _StubReader.op_none,
    pickle.NEWTRUE[0]: _StubReader.op_true,
    pickle.NEWFALSE[0]: _StubReader.op_false,
    pickle.BININT[0]: _StubReader.op_binint,
    pickle.BININT1[0]: _StubReader.op_binint1,
    pickle.BININT2[0]: _StubReader.op_binint2,
    pickle.LONG1[0]: _StubReader.op_long1,
    pickle.LONG4[0]: _StubReader.op_long4,
    pickle.BINFLOAT[0]: _StubReader.op_binfloat,
    pickle.SHORT_BINUNICODE[0]: _StubReader.op_short_binunicode,
    pickle.BINUNICODE[0]: _StubReader.op_binunicode,
    pickle.BINUNICODE8[0]: _StubReader.op_binunicode8,
    pickle.SHORT_BINBYTES[0]: _StubReader.op_short_binbytes,
    pickle.BINBYTES[0]: _StubReader.op_binbytes,
    pickle.BINBYTES8[0]: _StubReader.op_binbytes8,
    pickle.BYTEARRAY8[0]: _StubReader.op_bytearray8,
    pickle.EMPTY_TUPLE[0]: _StubReader.op_empty_tuple,
    pickle.TUPLE[0]: _StubReader.op_tuple,
    pickle.TUPLE1[0]: _StubReader.op_tuple1,
    pickle.TUPLE2[0]: _StubReader.op_tuple2,
    pickle.TUPLE3[0]: _StubReader.op_tuple3,
    pickle.EMPTY_LIST[0]: _StubReader.op_empty_list,
    pickle.LIST[0]: _StubReader.op_list,
    pickle.APPEND[0]: _StubReader.op_append,
    pickle.APPENDS[0]: _StubReader.op_appends,
    pickle.EMPTY_DICT[0]: _StubReader.op_empty_dict,
    pickle.DICT[0]: _StubReader.op_dict,
    pickle.SETITEM[0]: _StubReader.op_setitem,
    pickle.SETITEMS[0]: _StubReader.op_setitems,
    pickle.EMPTY_SET[0]: _StubReader.op_empty_set,
    pickle.ADDITEMS[0]: _StubReader.op_additems,
    pickle.FROZENSET[0]: _StubReader.op_frozenset,
    pickle.GLOBAL[0]: _StubReader.op_global,
    pickle.STACK_GLOBAL[0]: _StubReader.op_stack_global,
    pickle.REDUCE[0]: _StubReader.op_reduce,
    pickle.NEWOBJ[0]: _StubReader.op_newobj,
    pickle.NEWOBJ_EX[0]: _StubReader.op_newobj_ex,
    pickle.OBJ[0]: _StubReader.op_obj,
    pickle.INST[0]: _StubReader.op_inst,
    pickle.BUILD[0]: _StubReader.op_build,
    pickle.BINPUT[0]: _StubReader.op_binput,
    pickle.LONG_BINPUT[0]: _StubReader.op_long_binput,
    pickle.MEMOIZE[0]: _StubReader.op_memoize,
    pickle.BINGET[0]: _StubReader.op_binget,
    pickle.LONG_BINGET[0]: _StubReader.op_long_binget,
    pickle.INT[0]: _StubReader.op_int,
    pickle.LONG[0]: _StubReader.op_long,
    pickle.FLOAT[0]: _StubReader.op_float,
    pickle.STRING[0]: _StubReader.op_string,
    pickle.BINSTRING[0]: _StubReader.op_binstring,
    pickle.SHORT_BINSTRING[0]: _StubReader.op_short_binstring,
    pickle.UNICODE[0]: _StubReader.op_unicode,
    pickle.PUT[0]: _StubReader.op_put,
    pickle.GET[0]: _StubReader.op_get,
    pickle.POP[0]: _StubReader.op_pop,
    pickle.POP_MARK[0]: _StubReader.op_pop_mark,
    pickle.PERSID[0]: _StubReader.op_persid,
    pickle.BINPERSID[0]: _StubReader.op_binpersid,
    pickle.EXT1[0]: _StubReader.op_ext1,
    pickle.EXT2[0]: _StubReader.op_ext2,
    pickle.EXT4[0]: _StubReader.op_ext4,
    pickle.NEXT_BUFFER[0]: _StubReader.op_out_of_band,
    pickle.READONLY_BUFFER[0]: _StubReader.op_out_of_band,
}


# -- writing ----------------------------------------------------------------------------------


class _StubPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """The standard (pure Python) pickler, taught to write stand-ins back as they were read.

    The pure Python pickler produces the same bytes as the C one (same memoisation, framing
    and batching); it is used because stand-ins must be written as globals and calls that
    cannot be looked up here.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def persistent_id(self, obj: Any) -> None:
        return None

    def _unwritable(self, obj: Any) -> None:
        raise StubPickleError(f"a {type(obj).__name__} cannot be rewritten")

    def _save_persistent(self, obj: StubPersistent) -> None:
        # As pickle.Pickler.save_pers writes it with a binary protocol: torch's storage
        # references in a data.pkl.
        self.save(obj.pid)
        self.write(pickle.BINPERSID)

    dispatch[StubPersistent] = _save_persistent
    dispatch[StubExtension] = _unwritable

    def _save_global_stub(self, obj: StubGlobal) -> None:
        if obj.module == "<dynamic>":
            raise StubPickleError(f"a global named at load time ({obj.qualname}) is not writable")
        if obj.stacked and self.proto >= 4:
            self.save(obj.module)
            self.save(obj.qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(
                pickle.GLOBAL
                + obj.module.encode("utf-8")
                + b"\n"
                + obj.qualname.encode("utf-8")
                + b"\n"
            )
        self.memoize(obj)

    dispatch[StubGlobal] = _save_global_stub

    def _save_call(self, obj: StubCall) -> None:
        save, write = self.save, self.write
        if obj.kind == "NEWOBJ":
            save(obj.func)
            save(obj.args)
            write(pickle.NEWOBJ)
        elif obj.kind == "NEWOBJ_EX":
            save(obj.func)
            save(obj.args)
            save(obj.kwargs)
            write(pickle.NEWOBJ_EX)
        elif obj.kind == "REDUCE":
            save(obj.func)
            save(obj.args)
            write(pickle.REDUCE)
        elif obj.kind == "OBJ":
            write(pickle.MARK)
            save(obj.func)
            for arg in obj.args:
                save(arg)
            write(pickle.OBJ)
        else:  # INST
            write(pickle.MARK)
            for arg in obj.args:
                save(arg)
            module, qualname = obj.inst or (obj.func.module, obj.func.qualname)
            write(pickle.INST + module.encode("utf-8") + b"\n" + qualname.encode() + b"\n")
        if id(obj) in self.memo:
            raise StubPickleError("a call that refers to its own result cannot be rewritten")
        self.memoize(obj)
        for op, value in obj.ops:
            if op == "build":
                save(value)
                write(pickle.BUILD)
            elif op == "append":
                self._appends(value)
            else:
                self._setitems(value)

    dispatch[StubCall] = _save_call

    def _save_raw_bytes(self, obj: RawBytes) -> None:
        # pickle.Pickler.save_bytes, for a view (protocol >= 3).
        n = len(obj.view)
        if self.proto < 3:
            raise StubPickleError("bytes payloads need protocol 3 or later")
        if n <= 0xFF:
            self.write(pickle.SHORT_BINBYTES + struct.pack("<B", n) + obj.view)
        elif n > 0xFFFFFFFF and self.proto >= 4:
            self._write_large_bytes(pickle.BINBYTES8 + struct.pack("<Q", n), obj.view)
        elif n >= self.framer._FRAME_SIZE_TARGET:
            self._write_large_bytes(pickle.BINBYTES + struct.pack("<I", n), obj.view)
        else:
            self.write(pickle.BINBYTES + struct.pack("<I", n) + obj.view)
        self.memoize(obj)

    dispatch[RawBytes] = _save_raw_bytes

    def _appends(self, items: list[Any]) -> None:
        # pickle.Pickler._batch_appends (its signature differs between Python versions).
        it = iter(items)
        while True:
            batch = list(islice(it, self._BATCHSIZE))
            if len(batch) > 1:
                self.write(pickle.MARK)
                for item in batch:
                    self.save(item)
                self.write(pickle.APPENDS)
            elif batch:
                self.save(batch[0])
                self.write(pickle.APPEND)
            if len(batch) < self._BATCHSIZE:
                return

    def _setitems(self, pairs: list[tuple[Any, Any]]) -> None:
        it = iter(pairs)
        while True:
            batch = list(islice(it, self._BATCHSIZE))
            if len(batch) > 1:
                self.write(pickle.MARK)
                for key, value in batch:
                    self.save(key)
                    self.save(value)
                self.write(pickle.SETITEMS)
            elif batch:
                key, value = batch[0]
                self.save(key)
                self.save(value)
                self.write(pickle.SETITEM)
            if len(batch) < self._BATCHSIZE:
                return


def stub_dumps(root: Any, protocol: int) -> bytes:
    """Write a stand-in graph back as a pickle of ``protocol`` (use the source's protocol).

    :raises StubPickleError: the graph cannot be written faithfully.
    """
    if protocol < 2:
        raise StubPickleError("only protocol 2 or later is supported")
    buffer = io.BytesIO()
    _StubPickler(buffer, protocol=protocol).dump(root)
    return buffer.getvalue()


def iter_stubs(root: Any) -> Iterator[Any]:
    """Every object reachable from ``root`` (each once), stand-ins and containers alike."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                todo.extend((key, value))
        elif isinstance(obj, StubCall):
            todo.extend((obj.func, obj.args))
            if obj.kwargs is not None:
                todo.append(obj.kwargs)
            for _, value in obj.ops:
                todo.append(value)
