"""The one pickle interpreter against independent references, and scan against load.

- Differential: on every fixture's pickles and on generated benign pickles, the globals the
  interpreter counts are the globals ``pickletools.genops`` and CPython's own unpickler (with
  a recording ``find_class``) see, the pickle ends where genops says, and the safe loader
  builds a value equal to what ``pickle.loads`` builds.
- Property: for generated pickles made from allowed globals, used correctly or not, the
  static scan refuses exactly the pickles the loader refuses as unsafe.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import zipfile
from collections import Counter
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dppo_ckpt.checkpoint.archive import ArchiveError, open_checkpoint
from dppo_ckpt.checkpoint.safe_pickle import (
    ALLOWED_GLOBALS,
    SafeUnpickler,
    UnsafePickleError,
    scan_pickle,
)
from dppo_ckpt.checkpoint.stub_pickle import StubCall, StubGlobal, stub_dumps, stub_model
from fixtures.make_fixtures import FIXTURES_DIR

# -- references ------------------------------------------------------------------------------


def _genops_globals(payload: bytes, start: int = 0) -> tuple[Counter[tuple[str, str]], int]:
    """Globals named by GLOBAL/INST/STACK_GLOBAL, by the stdlib disassembler; and the end.

    Only strings are followed (with the memo), which is all a STACK_GLOBAL needs in a pickle
    written by a pickler.
    """
    seen: Counter[tuple[str, str]] = Counter()
    pushed: list[Any] = []
    memo: dict[int, Any] = {}
    stream = io.BytesIO(payload)
    stream.seek(start)
    end = start
    for opcode, arg, pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, qualname = arg.partition(" ")
            seen[(module, qualname)] += 1
        elif name == "STACK_GLOBAL":
            seen[(pushed[-2], pushed[-1])] += 1
        if name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif opcode.stack_after:
            pushed.append(arg if isinstance(arg, str) and "UNICODE" in name else None)
        end = pos + 1
    return seen, end


class _Inert:
    """What the recording unpickler hands out instead of a global: accepts any call."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Recording(pickle.Unpickler):
    """CPython's unpickler, recording every global it is asked to find.

    :param resolve: import the globals (benign generated pickles only); else hand out
        :class:`_Inert`, so that nothing of the file is imported or called.
    """

    def __init__(self, file: io.BytesIO, resolve: bool = True) -> None:
        super().__init__(file)
        self.resolve = resolve
        self.seen: Counter[tuple[str, str]] = Counter()

    def find_class(self, module: str, name: str) -> Any:
        self.seen[(module, name)] += 1
        return super().find_class(module, name) if self.resolve else _Inert

    def persistent_load(self, pid: Any) -> Any:
        return ("persistent", pid)


def _fixture_pickles() -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(FIXTURES_DIR.glob("*.zip")):
        if path.name.startswith(("broken_", "hostile_")):
            continue
        with open_checkpoint(path) as archive:
            for key, payload in archive.serialized_entries().items():
                out.append((f"{path.name}:{key}", payload))
            for name in archive.pth_members():
                if archive.pth_is_zip(name):
                    with zipfile.ZipFile(io.BytesIO(archive.read_member(name))) as inner:
                        for member in inner.namelist():
                            if member.endswith(".pkl"):
                                out.append((f"{path.name}:{name}:{member}", inner.read(member)))
    return out


FIXTURE_PICKLES = _fixture_pickles()


@pytest.mark.parametrize(
    "payload", [p for _, p in FIXTURE_PICKLES], ids=[n for n, _ in FIXTURE_PICKLES]
)
def test_the_interpreter_sees_what_the_references_see_in_every_fixture(payload: bytes) -> None:
    model = stub_model(payload)
    expected, end = _genops_globals(payload)
    assert model.end == end
    assert model.globals_seen == expected
    recorder = _Recording(io.BytesIO(payload), resolve=False)
    recorder.load()
    assert model.globals_seen == recorder.seen


# -- generated benign values -------------------------------------------------------------------

_DTYPES = [np.float32, np.float64, np.int64, np.uint8, np.bool_]

_arrays = st.builds(
    lambda dtype, shape, fortran, seed: np.asarray(
        np.random.default_rng(seed).integers(0, 5, size=shape),
        dtype=dtype,
        order="F" if fortran else "C",
    ),
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
    st.booleans(),
    st.integers(0, 1000),
)
_scalars = st.builds(
    lambda dtype, v: dtype(v),
    st.sampled_from([np.float32, np.int64, np.uint8]),
    st.integers(0, 100),
)
_spaces = st.one_of(
    st.builds(lambda n: gym.spaces.Box(-1.0, 1.0, (n,), np.float32), st.integers(1, 4)),
    st.builds(gym.spaces.Discrete, st.integers(1, 5)),
    st.builds(lambda a, b: gym.spaces.MultiDiscrete([a, b]), st.integers(1, 4), st.integers(1, 4)),
    st.builds(gym.spaces.MultiBinary, st.integers(1, 4)),
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=16),
    _arrays,
    _scalars,
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
        st.dictionaries(st.text(max_size=4), inner, max_size=3).map(collections.OrderedDict),
        st.lists(inner, max_size=3).map(lambda items: collections.deque(items, maxlen=5)),
    ),
    max_leaves=8,
)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    if isinstance(a, np.generic):
        return type(a) is type(b) and a == b
    if isinstance(a, gym.spaces.Space):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple, collections.deque)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(value=st.one_of(_values, _spaces), protocol=st.integers(3, 5))
def test_benign_pickles_load_as_cpython_loads_them(value: Any, protocol: int) -> None:
    # From protocol 3 on, bytes are a pickle type; protocol 2 writes them through
    # _codecs.encode, which is not on the list (SB3 writes protocol 5).
    payload = cloudpickle.dumps(value, protocol=protocol)
    model = stub_model(payload)
    recorder = _Recording(io.BytesIO(payload))
    reference = recorder.load()
    assert model.globals_seen == recorder.seen == _genops_globals(payload)[0]
    assert scan_pickle(payload).ok
    loaded = SafeUnpickler(io.BytesIO(payload)).load()
    assert _equal(reference, loaded)


# -- generated misuse of allowed globals -------------------------------------------------------

_ALLOWED = sorted(ALLOWED_GLOBALS)
_globals = st.one_of(
    st.sampled_from(_ALLOWED),
    st.sampled_from([("builtins", "eval"), ("os", "system"), ("numpy", "load")]),
).map(lambda pair: StubGlobal(*pair))
_args = st.lists(
    st.one_of(
        st.none(),
        st.integers(-3, 3),
        st.text(max_size=3),
        st.sampled_from(["f4", "O8", "C"]),
        _globals,
    ),
    max_size=3,
).map(tuple)


@st.composite
def _calls(draw: st.DrawFn) -> StubCall:
    call = StubCall(draw(st.sampled_from(["REDUCE", "NEWOBJ"])), draw(_globals), draw(_args))
    if draw(st.booleans()):
        call.ops.append(
            (
                "build",
                draw(
                    st.one_of(
                        st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
                    )
                ),
            )
        )
    return call


@_SETTINGS
@given(root=st.lists(st.one_of(_calls(), _globals), min_size=1, max_size=3))
def test_the_static_scan_refuses_exactly_what_the_loader_refuses(root: list[Any]) -> None:
    payload = stub_dumps(root, 4)
    try:
        static_refused = not scan_pickle(payload).ok
    except ArchiveError:
        return  # damaged, or over a budget, in the scan already: neither side calls it unsafe
    try:
        SafeUnpickler(io.BytesIO(payload)).load()
        loader_refused = False
    except UnsafePickleError:
        loader_refused = True
    except ArchiveError:
        loader_refused = False  # damaged (exit 2), or over a budget
    assert static_refused == loader_refused
