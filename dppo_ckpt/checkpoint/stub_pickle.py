"""Decode a pickle into inert stand-ins, and write the stand-ins back as the same pickle.

:func:`stub_loads` interprets the opcodes of a (protocol 2 or later) pickle without importing
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

Nothing here imports torch or numpy, and nothing from the pickle is ever executed.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Iterator
from itertools import islice
from typing import Any, Final

__all__ = [
    "RawBytes",
    "StubCall",
    "StubGlobal",
    "StubPickleError",
    "iter_stubs",
    "pickle_protocol",
    "stub_dumps",
    "stub_loads",
]


class StubPickleError(ValueError):
    """The pickle is corrupt, or uses a construct the stand-ins cannot represent faithfully."""


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


def stub_loads(data: bytes | bytearray | memoryview) -> Any:
    """Decode one pickle into stand-ins without importing or calling anything.

    :param data: the pickle; ``RawBytes`` in the result are views of it, so keep it alive.
    :return: the root of the decoded graph.
    :raises StubPickleError: corrupt pickle, protocol below 2, or an unsupported construct
        (persistent ids, out-of-band buffers, extension codes, ``POP`` of a built object).
    """
    try:
        return _StubReader(memoryview(data).cast("B")).load()
    except StubPickleError:
        raise
    except (IndexError, struct.error, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise StubPickleError(f"corrupt pickle: {type(exc).__name__}: {exc}") from None


class _StubReader:
    """A pickle virtual machine whose only effects are building stand-ins."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

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

    def _line(self) -> str:
        end = bytes(self.buf[self.pos : self.pos + 4096]).find(b"\n")
        if end < 0:
            raise StubPickleError(f"unterminated line at byte {self.pos}")
        text = self._take(end + 1)[:-1]
        return str(text, "utf-8")

    def load(self) -> Any:
        if pickle_protocol(self.buf) < 2:
            raise StubPickleError("only pickles of protocol 2 or later are supported")
        while True:
            if self.pos >= len(self.buf):
                raise StubPickleError("pickle ends without STOP")
            start = self.pos
            code = self.buf[self.pos]
            self.pos += 1
            handler = _HANDLERS.get(code)
            if handler is None:
                raise StubPickleError(f"unsupported opcode {bytes([code])!r} at byte {start}")
            if handler(self) is _STOP:
                result = self._pop()
                if self.stack or self.metastack:
                    raise StubPickleError("values left on the stack at STOP")
                return result

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

    def op_global(self) -> None:
        module = self._line()
        qualname = self._line()
        self.stack.append(StubGlobal(module, qualname, stacked=False))

    def op_stack_global(self) -> None:
        qualname, module = self._pop(), self._pop()
        if not (isinstance(module, str) and isinstance(qualname, str)):
            raise StubPickleError(f"STACK_GLOBAL of non-strings at byte {self.pos}")
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
        args = tuple(self._pop_mark())
        glob = StubGlobal(module, qualname, stacked=False)
        self.stack.append(StubCall("INST", glob, args, inst=(module, qualname)))

    def op_build(self) -> None:
        state = self._pop()
        target = self._top()
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


_STOP: Final = object()

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

    def _save_global_stub(self, obj: StubGlobal) -> None:
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
