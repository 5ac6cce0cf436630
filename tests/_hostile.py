"""Generator of hostile checkpoints: each case is a clean fixture with one part replaced.

Every case names what it attacks and the verdict the product must give, for the full
``verify`` and for ``verify --static``. The payloads that would run code touch a marker file
in the current directory, so a test can tell that nothing ran.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dppo_ckpt.checkpoint.stub_pickle import StubCall, stub_dumps, stub_loads
from fixtures.make_fixtures import FIXTURES_DIR

BASE = FIXTURES_DIR / "dppo_quantile_vgs.zip"
_Edit = Callable[[bytes, bytes], dict[str, bytes]]
MARKER = "HOSTILE_MARKER"


def _touch() -> bytes:
    """GLOBAL posix.system, called on ``touch MARKER``."""
    return b"cposix\nsystem\n(S'touch " + MARKER.encode() + b"'\ntR"


def _frame(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _dtype(code: str) -> bytes:
    return b"cnumpy\ndtype\n(X" + struct.pack("<I", len(code)) + code.encode() + b"\x89\x88tR"


def _bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def _object_frombuffer() -> bytes:
    # An object array over 8 bytes from the file: numpy would take them as a pointer.
    body = b"cnumpy._core.numeric\n_frombuffer\n(" + _bytes(b"\x41" * 8) + _dtype("O8")
    return _frame(body + b"K\x01\x85X\x01\x00\x00\x00CtR")


def _object_reconstruct() -> bytes:
    body = (
        b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\nK\x00\x85"
        + _bytes(b"b")
        + b"tR(K\x01K\x01\x85"
        + _dtype("O8")
        + b"\x89"
        + _bytes(b"\x41" * 8)
        + b"tb"
    )
    return _frame(body)


def _ndarray_called() -> bytes:
    # ndarray(shape, dtype, buffer, offset, strides): a view anywhere in memory.
    return _frame(
        b"cnumpy\nndarray\n(K\x10\x85" + _dtype("u1") + _bytes(b"\0") + b"J\x00\x00\x00\x10tR"
    )


def _array_setstate_again() -> bytes:
    # A valid array, then a second __setstate__ that swaps its buffer and dtype.
    array = b"cnumpy._core.numeric\n_frombuffer\n(" + _bytes(b"\0" * 8) + _dtype("u1")
    state = b"(K\x01K\x01\x85" + _dtype("O8") + b"\x89" + _bytes(b"\x41" * 8) + b"tb"
    return _frame(array + b"K\x08\x85X\x01\x00\x00\x00CtR" + state)


def _object_scalar() -> bytes:
    return _frame(
        b"cnumpy._core.multiarray\nscalar\n(" + _dtype("O8") + _bytes(b"\x41" * 8) + b"tR"
    )


def _unsafe_then_damaged() -> bytes:
    # The unsafe global comes first; the stream breaks after it.
    return b"\x80\x02" + _touch() + b"\xff\xff"


def _huge_integer() -> bytes:
    return _frame(b"\x8b" + struct.pack("<i", 100_000) + b"\x01" * 100_000)


def _deep_nesting() -> bytes:
    depth = 5000
    return _frame(b"]" * depth + b"a" * (depth - 1))


def _seed_sequence_entropy() -> bytes:
    # SeedSequence with 100,000 entropy words: numpy's conversion is quadratic in them.
    words = b"(" + b"J\xff\xff\xff\x7f" * 100_000 + b"l"
    pool = b"cnumpy._core.numeric\n_frombuffer\n(" + _bytes(b"\0" * 16) + _dtype("u4")
    pool += b"K\x04\x85X\x01\x00\x00\x00CtR"
    body = (
        b"cnumpy.random.bit_generator\n__pyx_unpickle_SeedSequence\n"
        b"(cnumpy.random.bit_generator\nSeedSequence\nJ\x22\x11\x00\x00NtR"
        b"(" + words + b"K\x00" + pool + b"K\x04)tb"
    )
    return _frame(body)


def _stride_zero_tensor() -> bytes:
    import cloudpickle
    import torch

    root = stub_loads(cloudpickle.dumps(torch.zeros(1)))
    assert isinstance(root, StubCall)
    args = list(root.args)
    args[2], args[3] = (1 << 31,), (0,)  # two billion elements over one
    root.args = tuple(args)
    return stub_dumps(root, 5)


def _box_shape() -> bytes:
    import cloudpickle
    import gymnasium as gym
    import numpy as np

    root = stub_loads(cloudpickle.dumps(gym.spaces.Box(-1.0, 1.0, (3,), np.float32)))
    assert isinstance(root, StubCall)
    root.ops[0][1]["_shape"] = (1 << 30,)
    return stub_dumps(root, 5)


def _serialized(payload: bytes) -> dict[str, str]:
    return {":type:": "<class 'object'>", ":serialized:": base64.b64encode(payload).decode()}


def _data_entry(entry: str, payload: Callable[[], bytes]) -> Callable[[bytes], dict[str, bytes]]:
    def edit(data: bytes) -> dict[str, bytes]:
        doc = json.loads(data)
        doc[entry] = {
            ":type:": "<class 'object'>",
            ":serialized:": base64.b64encode(payload()).decode(),
        }
        return {"data": json.dumps(doc).encode()}

    return edit


def _policy_kwargs_net_arch(data: bytes) -> dict[str, bytes]:
    import cloudpickle

    doc = json.loads(data)
    kwargs = {"net_arch": [200_000, 200_000, 200_000]}
    doc["policy_kwargs"] = {
        ":type:": "<class 'dict'>",
        ":serialized:": base64.b64encode(cloudpickle.dumps(kwargs)).decode(),
    }
    return {"data": json.dumps(doc).encode()}


def _torch_save(value: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _attribute_path_variable(data: bytes) -> dict[str, bytes]:
    import torch

    return {"pytorch_variables.pth": _torch_save({"policy.__class__.__doc__": torch.zeros(1)})}


def _undeclared_member(data: bytes) -> dict[str, bytes]:
    import torch

    return {"policy.action_net.pth": _torch_save({"weight": torch.zeros(1)})}


def _rename_inner(policy_pth: bytes, rename: Callable[[str], str], payload: bytes | None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(policy_pth)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            name = rename(info.filename)
            if payload is not None and info.filename.endswith("/data.pkl"):
                body = payload
            dst.writestr(name, body)
    return out.getvalue()


def _pkl_in_other_case(data: bytes, policy: bytes) -> dict[str, bytes]:
    # torch finds data.pkl ignoring case: a scanner that opens only the exact name misses it.
    hostile = _frame(_touch())
    upper = _rename_inner(policy, lambda n: n.replace("data.pkl", "DATA.PKL"), hostile)
    return {"policy.pth": upper}


def _pkl_case_collision(data: bytes, policy: bytes) -> dict[str, bytes]:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(policy)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
            if info.filename.endswith("/data.pkl"):
                dst.writestr(info.filename.replace("data.pkl", "Data.pkl"), _frame(_touch()))
    return {"policy.pth": out.getvalue()}


@dataclass(frozen=True)
class HostileCase:
    """One hostile file: what it attacks, and the exit codes of ``verify`` and ``--static``.

    :param edit: new member bytes, given the base's ``data`` and ``policy.pth``.
    :param full: exit code of the full ``verify``.
    :param static: exit code of ``verify --static``.
    :param reason: text the refusal must contain.
    """

    edit: _Edit
    full: int
    static: int
    reason: str


def _in_entry(
    payload: Callable[[], bytes], entry: str = "_last_obs"
) -> Callable[[bytes, bytes], dict[str, bytes]]:
    edit = _data_entry(entry, payload)
    return lambda data, policy: edit(data)


_H = HostileCase
CASES: dict[str, HostileCase] = {
    "object_frombuffer": _H(_in_entry(_object_frombuffer), 3, 3, "numpy.dtype"),
    "object_reconstruct": _H(_in_entry(_object_reconstruct), 3, 3, "numpy.dtype"),
    "ndarray_called": _H(_in_entry(_ndarray_called), 3, 3, "numpy.ndarray"),
    "array_setstate_again": _H(_in_entry(_array_setstate_again), 3, 3, "BUILD on a numpy array"),
    "object_scalar": _H(_in_entry(_object_scalar), 3, 3, "numpy.dtype"),
    "unsafe_then_damaged": _H(_in_entry(_unsafe_then_damaged), 3, 3, "posix.system"),
    "huge_integer": _H(_in_entry(_huge_integer), 2, 2, "budget max_int_bytes"),
    "deep_nesting": _H(_in_entry(_deep_nesting), 2, 0, "budget max_depth"),
    "seed_sequence_entropy": _H(_in_entry(_seed_sequence_entropy), 2, 0, "budget max_int_bytes"),
    "stride_zero_tensor": _H(_in_entry(_stride_zero_tensor), 2, 0, "budget max_elements"),
    "box_shape": _H(_in_entry(_box_shape, "observation_space"), 2, 0, "budget max_elements"),
    "net_arch": _H(lambda d, p: _policy_kwargs_net_arch(d), 2, 0, "budget max_memory"),
    "attribute_path_variable": _H(lambda d, p: _attribute_path_variable(d), 3, 3, "attribute path"),
    "undeclared_member": _H(lambda d, p: _undeclared_member(d), 3, 3, "attribute path"),
    "pkl_in_other_case": _H(_pkl_in_other_case, 3, 3, "posix.system"),
    "pkl_case_collision": _H(_pkl_case_collision, 2, 2, "differ only in case"),
}


def build(name: str, dest: Path) -> Path:
    """Write hostile case ``name`` to ``dest`` (members of the base copied, one replaced)."""
    case = CASES[name]
    with zipfile.ZipFile(BASE) as src:
        replaced = case.edit(src.read("data"), src.read("policy.pth"))
        with zipfile.ZipFile(dest, "w") as dst:
            for info in src.infolist():
                body = replaced.pop(info.filename, None)
                dst.writestr(info, body if body is not None else src.read(info))
            for name_, body in replaced.items():
                dst.writestr(name_, body)
    return dest


def build_all(folder: Path) -> dict[str, Path]:
    """Every case, as ``folder/<name>.zip``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: build(name, folder / f"{name}.zip") for name in CASES}
