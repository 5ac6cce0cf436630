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
import warnings
import zipfile
import zlib
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


def _legacy_attribute_path_variable(data: bytes) -> dict[str, bytes]:
    # The same key in torch's legacy (non-zip) format, which torch.load reads as well.
    import torch

    buffer = io.BytesIO()
    variables = {"policy.__class__.__doc__": torch.zeros(1)}
    torch.save(variables, buffer, _use_new_zipfile_serialization=False)
    return {"pytorch_variables.pth": buffer.getvalue()}


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


# -- numpy dtypes reached through their BUILD state -------------------------------------------


def _dtype_state(code: str, state: bytes) -> bytes:
    # A plain type code, then a BUILD that hands dtype.__setstate__ a state of the file's.
    return _dtype(code) + b"(" + state + b"tb"


def _minus_one() -> bytes:
    return b"J\xff\xff\xff\xff"


def _dtype_flags_state() -> bytes:
    # u1 with the "holds references" flags: numpy would decref the array's bytes as pointers.
    state = b"K\x03X\x01\x00\x00\x00|NNN" + _minus_one() * 2 + b"K?"
    body = b"cnumpy._core.numeric\n_frombuffer\n(" + _bytes(b"\x41" * 8)
    return _frame(body + _dtype_state("u1", state) + b"K\x08\x85X\x01\x00\x00\x00CtR")


def _dtype_elsize_state() -> bytes:
    # S1 told its items are 4096 bytes long: reads past every buffer it is used with.
    state = b"K\x03X\x01\x00\x00\x00|NNNM\x00\x10K\x01K\x00"
    body = b"cnumpy._core.numeric\n_frombuffer\n(" + _bytes(b"\x41")
    return _frame(body + _dtype_state("S1", state) + b"K\x01\x85X\x01\x00\x00\x00CtR")


def _dtype_datetime_state() -> bytes:
    # A version-4 state whose datetime metadata is not numpy's own.
    meta = b"(N(C\x02xxK\x01K\x01K\x01tt"
    state = b"K\x04X\x01\x00\x00\x00<NNN" + _minus_one() * 2 + b"K\x00" + meta
    return _frame(_dtype_state("M8", state))


def _zero_size_dtype_code() -> bytes:
    return _frame(_dtype("S0"))


def _subarray_dtype_code() -> bytes:
    return _frame(_dtype("(2,)u1"))


def _structured_dtype_code() -> bytes:
    return _frame(_dtype("V8"))


def _reconstruct_short_buffer() -> bytes:
    # Four float64 items declared over 8 bytes.
    body = (
        b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\nK\x00\x85"
        + _bytes(b"b")
        + b"tR(K\x01K\x04\x85"
        + _dtype("f8")
        + b"\x89"
        + _bytes(b"\0" * 8)
        + b"tb"
    )
    return _frame(body)


# -- persistent ids and memo aliasing in data entries -----------------------------------------


def _persistent_in_data() -> bytes:
    return _frame(b"X\x05\x00\x00\x00data0Q")


def _persistent_line_in_data() -> bytes:
    return _frame(b"Parchive/data/0\n")


def _memo_overwritten() -> bytes:
    # Memo slot 0 holds a benign list, then the payload; GET 0 fetches the payload.
    return _frame(b"]q\x00" + _touch() + b"q\x000h\x00")


# -- tensor views in data entries -------------------------------------------------------------


def _tensor_view(
    offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> Callable[[], bytes]:
    def payload() -> bytes:
        import cloudpickle
        import torch

        root = stub_loads(cloudpickle.dumps(torch.zeros(1)))
        assert isinstance(root, StubCall)
        args = list(root.args)
        args[1], args[2], args[3] = offset, size, stride
        root.args = tuple(args)
        return stub_dumps(root, 5)

    return payload


# -- tensor blobs carried by every opcode that can hold bytes ---------------------------------


def _hostile_torch_zip() -> bytes:
    # A torch zip archive whose data.pkl is the payload.
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        dst.writestr("archive/data.pkl", _frame(_touch()))
        dst.writestr("archive/version", b"3\n")
    return out.getvalue()


def _blob_via(opcode: bytes, blob: Callable[[], bytes]) -> Callable[[], bytes]:
    def payload() -> bytes:
        data = blob()
        carried = {
            b"C": lambda: b"C" + bytes([len(data)]) + data,
            b"B": lambda: _bytes(data),
            b"\x8e": lambda: b"\x8e" + struct.pack("<Q", len(data)) + data,
            b"\x96": lambda: b"\x96" + struct.pack("<Q", len(data)) + data,
            b"X": lambda: b"X" + struct.pack("<I", len(data)) + data,
        }[opcode]()
        return b"\x80\x05ctorch.storage\n_load_from_bytes\n(" + carried + b"tR."

    return payload


def _legacy_hostile() -> bytes:
    # One pickle where torch's legacy format has three: the payload comes before the damage.
    return _frame(_touch())


def _text_hostile() -> bytes:
    # Protocol 0, all ASCII: it survives being carried as a str.
    return _touch() + b"."


# -- zip structure --------------------------------------------------------------------------


_DUPLICATE = "\0duplicate:"  # an extra member written under the name that follows


def _duplicate_data(data: bytes, policy: bytes) -> dict[str, bytes]:
    # Two "data" members: zipfile's name lookup reads the last one.
    doc = json.loads(data)
    doc["n_steps"] = 1 << 30
    return {_DUPLICATE + "data": json.dumps(doc).encode()}


def _inner_duplicate(data: bytes, policy: bytes) -> dict[str, bytes]:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(policy)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = next(n for n in src.namelist() if n.endswith("/data.pkl"))
            dst.writestr(name, _frame(_touch()))
    return {"policy.pth": out.getvalue()}


def _stored_records(members: list[tuple[str, bytes]], base: int) -> tuple[bytes, bytes]:
    """Stored local records written from offset ``base``, and their directory entries."""
    local, central = b"", b""
    for name, body in members:
        raw_name, crc = name.encode(), zlib.crc32(body)
        offset = base + len(local)
        local += struct.pack(
            "<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(body), len(body),
            len(raw_name), 0,
        ) + raw_name + body  # fmt: skip
        central += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, len(body), len(body),
            len(raw_name), 0, 0, 0, 0, 0, offset,
        ) + raw_name  # fmt: skip
    return local, central


def _two_faced_zip(seen: list[tuple[str, bytes]], loaded: list[tuple[str, bytes]]) -> bytes:
    """A zip that Python's zipfile reads as ``seen`` and torch's reader as ``loaded``.

    zipfile takes the bytes between the directory's declared and actual offsets as a prefix
    and shifts every offset by them; torch's reader takes the offsets as written.
    """
    local_l, central_l = _stored_records(loaded, 0)
    # Room enough that the shifted offsets of the seen records stay positive.
    local_l += b"\0" * max(0, len(_stored_records(seen, 0)[0]) - len(local_l))
    start_s = len(local_l) + len(central_l)
    local_s, _ = _stored_records(seen, start_s)
    shift = start_s + len(local_s) - len(local_l)
    _, central_s = _stored_records(seen, start_s - shift)
    assert len(central_s) == len(central_l)
    end = struct.pack(
        "<4s4H2IH", b"PK\x05\x06", 0, 0, len(loaded), len(loaded), len(central_l),
        len(local_l), 0,
    )  # fmt: skip
    return local_l + central_l + local_s + central_s + end


def _zip_members(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as src:
        return [(info.filename, src.read(info)) for info in src.infolist()]


def _policy_two_faced(data: bytes, policy: bytes) -> dict[str, bytes]:
    # Scanned: the real weights. Loaded by torch: the same records, every weight doubled.
    import numpy as np

    seen = _zip_members(policy)
    loaded = [
        (name, (np.frombuffer(body, "<f4") * 2).tobytes() if "/data/" in name else body)
        for name, body in seen
    ]
    return {"policy.pth": _two_faced_zip(seen, loaded)}


def _two_faced_blob() -> bytes:
    # A tensor blob that zipfile reads as a storage and torch's reader as the payload.
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage: pickled with an allowed storage tag
        seen = _zip_members(_torch_save(torch.zeros(1).storage()))
    loaded = [(n, _frame(_touch()) if n.endswith("data.pkl") else b) for n, b in seen]
    return _two_faced_zip(seen, loaded)


def _outer_case_collision(data: bytes, policy: bytes) -> dict[str, bytes]:
    return {"POLICY.pth": _torch_save({"weight": __import__("torch").zeros(1)})}


def _tensors_alias(data: bytes, policy: bytes) -> dict[str, bytes]:
    # SB3 reads tensors.pth as pytorch_variables: its keys are attribute paths too.
    import torch

    return {"tensors.pth": _torch_save({"policy.__class__.__doc__": torch.zeros(1)})}


def _storage_key_outside(data: bytes, policy: bytes) -> dict[str, bytes]:
    # A persistent id naming a record outside data/: torch looks it up as archive/data/KEY.
    pickled = zipfile.ZipFile(io.BytesIO(policy))
    name = next(n for n in pickled.namelist() if n.endswith("/data.pkl"))
    body = pickled.read(name)
    key = b"X\x01\x00\x00\x000"
    assert key in body
    bad = b"X" + struct.pack("<I", 11) + b"../data.pkl"
    return {"policy.pth": _rename_inner(policy, lambda n: n, body.replace(key, bad, 1))}


def _local_name_differs(data: bytes, policy: bytes) -> dict[str, bytes]:
    raw = bytearray(policy)
    at = raw.find(b"data.pkl")  # the first occurrence is the local header's name
    raw[at : at + 8] = b"xata.pkl"
    return {"policy.pth": bytes(raw)}


def _plain_json_net_arch(data: bytes, policy: bytes) -> dict[str, bytes]:
    # policy_kwargs as plain JSON (no ":serialized:"): SB3 takes the dict as it is.
    doc = json.loads(data)
    doc["policy_kwargs"] = {"net_arch": [200_000, 200_000, 200_000]}
    return {"data": json.dumps(doc).encode()}


def _plain_json_value(key: str, value: object) -> _Edit:
    def edit(data: bytes, policy: bytes) -> dict[str, bytes]:
        doc = json.loads(data)
        doc[key] = value
        return {"data": json.dumps(doc).encode()}

    return edit


def _policy_kwargs_quantiles(data: bytes, policy: bytes) -> dict[str, bytes]:
    # The critic's output layer is as wide as the file says.
    doc = json.loads(data)
    doc["n_quantiles"] = 1 << 31
    doc["policy_kwargs"] = {**doc["policy_kwargs"], "n_quantiles": 1 << 31}
    return {"data": json.dumps(doc).encode()}


def _json_huge_integer(data: bytes, policy: bytes) -> dict[str, bytes]:
    # Python's int() refuses more than 4300 digits with a ValueError of its own.
    doc = data.replace(b'"n_steps": 64', b'"n_steps": ' + b"9" * 5000)
    assert doc != data
    return {"data": doc}


def _json_deep_nesting(data: bytes, policy: bytes) -> dict[str, bytes]:
    doc = data.replace(b'"vgs_kwargs": {}', b'"vgs_kwargs": ' + b"[" * 100_000 + b"]" * 100_000)
    assert doc != data
    return {"data": doc}


def _features_dim(data: bytes, policy: bytes) -> dict[str, bytes]:
    # An extractor output as wide as the file says (NatureCNN and CombinedExtractor take it).
    doc = json.loads(data)
    kwargs = {"features_dim": 1 << 31}
    doc["policy_kwargs"] = {**doc["policy_kwargs"], "features_extractor_kwargs": kwargs}
    return {"data": json.dumps(doc).encode()}


def _rebuild_parameter_of_int() -> bytes:
    return _frame(b"ctorch._utils\n_rebuild_parameter\n(K\x01\x89ccollections\nOrderedDict\n)RtR")


def _torch_size_called() -> bytes:
    return _frame(b"ctorch\nSize\n((K\x01ttR")


def _reconstruct_fortran_int() -> bytes:
    body = (
        b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\nK\x00\x85"
        + _bytes(b"b")
        + b"tR(K\x01K\x01\x85"
        + _dtype("u1")
        + b"K\x01"
        + _bytes(b"\0")
        + b"tb"
    )
    return _frame(body)


def _plain_json_net_arch_dict(data: bytes, policy: bytes) -> dict[str, bytes]:
    doc = json.loads(data)
    doc["policy_kwargs"] = {"net_arch": {"pi": [64], "vf": [300_000, 300_000]}}
    return {"data": json.dumps(doc).encode()}


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
_OUTSIDE = "outside its storage"
_SYSTEM = "posix.system"
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
    "legacy_attribute_path_variable": _H(
        lambda d, p: _legacy_attribute_path_variable(d), 3, 3, "attribute path"
    ),
    "undeclared_member": _H(lambda d, p: _undeclared_member(d), 3, 3, "attribute path"),
    "pkl_in_other_case": _H(_pkl_in_other_case, 3, 3, "posix.system"),
    "pkl_case_collision": _H(_pkl_case_collision, 2, 2, "differ only in case"),
    "dtype_flags_state": _H(_in_entry(_dtype_flags_state), 3, 3, "crafted numpy"),
    "dtype_elsize_state": _H(_in_entry(_dtype_elsize_state), 3, 3, "crafted numpy"),
    "dtype_datetime_state": _H(_in_entry(_dtype_datetime_state), 3, 3, "crafted numpy"),
    "zero_size_dtype_code": _H(_in_entry(_zero_size_dtype_code), 3, 3, "numpy.dtype"),
    "subarray_dtype_code": _H(_in_entry(_subarray_dtype_code), 3, 3, "numpy.dtype"),
    "structured_dtype_code": _H(_in_entry(_structured_dtype_code), 3, 3, "numpy.dtype"),
    "reconstruct_short_buffer": _H(_in_entry(_reconstruct_short_buffer), 2, 0, "needs 32 bytes"),
    "persistent_in_data": _H(_in_entry(_persistent_in_data), 3, 3, "persistent id"),
    "persistent_line_in_data": _H(_in_entry(_persistent_line_in_data), 3, 3, "persistent id"),
    "memo_overwritten": _H(_in_entry(_memo_overwritten), 3, 3, "posix.system"),
    "tensor_offset_beyond": _H(_in_entry(_tensor_view(5, (1,), (1,))), 2, 0, _OUTSIDE),
    "tensor_shape_beyond": _H(_in_entry(_tensor_view(0, (1 << 20,), (1,))), 2, 0, _OUTSIDE),
    "tensor_stride_beyond": _H(_in_entry(_tensor_view(0, (2,), (1 << 40,))), 2, 0, _OUTSIDE),
    "tensor_negative_stride": _H(_in_entry(_tensor_view(0, (1,), (-1,))), 2, 0, "non-negative"),
    "tensor_huge_numel": _H(
        _in_entry(_tensor_view(0, (1 << 40, 1 << 40), (0, 0))), 2, 0, "budget max_elements"
    ),
    "blob_short_binbytes": _H(_in_entry(_blob_via(b"C", _legacy_hostile)), 3, 3, _SYSTEM),
    "blob_binbytes": _H(_in_entry(_blob_via(b"B", _hostile_torch_zip)), 3, 3, _SYSTEM),
    "blob_binbytes8": _H(_in_entry(_blob_via(b"\x8e", _hostile_torch_zip)), 3, 3, _SYSTEM),
    "blob_bytearray8": _H(_in_entry(_blob_via(b"\x96", _hostile_torch_zip)), 3, 3, _SYSTEM),
    "blob_binunicode": _H(_in_entry(_blob_via(b"X", _text_hostile)), 3, 3, "non-literal"),
    "duplicate_data": _H(_duplicate_data, 2, 2, "duplicate member"),
    "inner_duplicate": _H(_inner_duplicate, 2, 2, "duplicate member"),
    "policy_two_faced": _H(_policy_two_faced, 2, 2, "before its central directory"),
    "blob_two_faced": _H(
        _in_entry(_blob_via(b"B", _two_faced_blob)), 2, 2, "before its central directory"
    ),
    "outer_case_collision": _H(_outer_case_collision, 2, 2, "differ only in case"),
    "tensors_alias": _H(_tensors_alias, 3, 3, "attribute path"),
    "storage_key_outside": _H(_storage_key_outside, 2, 0, "data.pkl"),
    "local_name_differs": _H(_local_name_differs, 2, 2, "policy.pth"),
    "plain_json_net_arch": _H(_plain_json_net_arch, 2, 0, "budget max_memory"),
    "policy_kwargs_quantiles": _H(_policy_kwargs_quantiles, 2, 0, "budget max_memory"),
    "json_huge_integer": _H(_json_huge_integer, 2, 2, "data"),
    "json_deep_nesting": _H(_json_deep_nesting, 2, 2, "data"),
    "features_dim": _H(_features_dim, 2, 0, "budget max_memory"),
    "plain_json_n_steps": _H(_plain_json_value("n_steps", 1 << 30), 2, 0, "budget max_memory"),
    "rebuild_parameter_of_int": _H(_in_entry(_rebuild_parameter_of_int), 2, 0, "Parameter"),
    "torch_size_called": _H(_in_entry(_torch_size_called), 3, 3, "torch.Size"),
    "reconstruct_fortran_int": _H(_in_entry(_reconstruct_fortran_int), 2, 0, "is_fortran"),
    "plain_json_net_arch_dict": _H(_plain_json_net_arch_dict, 2, 0, "budget max_memory"),
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a duplicate name is the point of some cases
                for name_, body in replaced.items():
                    dst.writestr(name_.removeprefix(_DUPLICATE), body)
    return dest


def build_all(folder: Path) -> dict[str, Path]:
    """Every case, as ``folder/<name>.zip``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: build(name, folder / f"{name}.zip") for name in CASES}
