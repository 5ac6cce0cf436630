"""The stand-in unpickler runs nothing, and writing the stand-ins back gives the same bytes."""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
import zipfile

import cloudpickle
import pytest

from dppo_ckpt.checkpoint.archive import open_checkpoint
from dppo_ckpt.checkpoint.safe_pickle import SafeUnpickler
from dppo_ckpt.checkpoint.stub_pickle import (
    RawBytes,
    ReadBudget,
    ReadBudgetExceeded,
    StubCall,
    StubExtension,
    StubGlobal,
    StubPersistent,
    StubPickleError,
    iter_stubs,
    stub_dumps,
    stub_loads,
    stub_model,
)
from fixtures.make_fixtures import FIXTURES_DIR

DPPO_FIXTURES = sorted(FIXTURES_DIR.glob("dppo_*.zip")) + [FIXTURES_DIR / "sb3_ppo.zip"]


@pytest.mark.parametrize("path", DPPO_FIXTURES, ids=lambda p: p.name)
def test_every_entry_round_trips_byte_for_byte(path):
    with open_checkpoint(path) as archive:
        entries = archive.serialized_entries()
    assert entries
    for key, payload in entries.items():
        assert stub_dumps(stub_loads(payload), payload[1]) == payload, key


def test_a_fresh_cloudpickle_dump_round_trips():
    with open_checkpoint(FIXTURES_DIR / "dppo_layout1.zip") as archive:  # a pickled scaler
        payload = archive.serialized_entries()["_variance_gradient_scaler"]
    scaler = SafeUnpickler(io.BytesIO(payload), entry="_variance_gradient_scaler").load()
    fresh = cloudpickle.dumps(scaler)
    assert stub_dumps(stub_loads(fresh), 5) == fresh
    for protocol in (2, 3, 4, 5):
        plain = pickle.dumps({"a": [1, 2.5, "x", b"y" * 300, (None, True)], "b": scaler}, protocol)
        assert stub_dumps(stub_loads(plain), protocol) == plain


class _Boom:
    def __reduce__(self):
        return (_explode, ("ran",))


def _explode(text: str) -> None:
    raise AssertionError(f"code from the pickle {text}")


def test_nothing_is_imported_or_called():
    payload = pickle.dumps([_Boom(), StubGlobal], protocol=5)
    # A module that does not exist (same length, so the framing stays valid).
    payload = payload.replace(b"tests.test_stub_pickle", b"nosuch.module_x_pickle")
    root = stub_loads(payload)
    assert "nosuch" not in sys.modules and "nosuch.module_x_pickle" not in sys.modules
    call = root[0]
    assert isinstance(call, StubCall) and call.kind == "REDUCE"
    assert call.func.name.endswith("._explode") and call.args == ("ran",)
    assert stub_dumps(root, 5) == payload
    kinds = {type(obj).__name__ for obj in iter_stubs(root)}
    assert {"StubCall", "StubGlobal"} <= kinds


def test_bytes_are_views_not_copies():
    blob = bytes(range(256)) * 1000
    payload = pickle.dumps({"blob": blob}, protocol=5)
    root = stub_loads(payload)
    assert isinstance(root["blob"], RawBytes) and root["blob"].tobytes() == blob
    assert root["blob"].view.obj is not None
    assert stub_dumps(root, 5) == payload


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x80\x05",
        b"\x80\x05K\x01",
        b"\x80\x05)R.",  # REDUCE with too few operands
        b"\x80\x05h\x07.",  # memo key missing
        b"\x80\x05\x97.",  # out-of-band buffer
        b"\x80\x05\xff.",  # no such opcode
    ],
)
def test_corrupt_or_unsupported_pickles_raise(payload):
    with pytest.raises(StubPickleError):
        stub_loads(payload)


def test_random_corruption_gives_a_clean_error_or_a_value():
    import random

    with open_checkpoint(FIXTURES_DIR / "dppo_legacy.zip") as archive:
        payload = archive.serialized_entries()["_variance_gradient_scaler"]
    rng = random.Random(0)
    for _ in range(300):
        damaged = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cut = rng.choice([len(damaged), rng.randrange(len(damaged))])
        try:
            root = stub_loads(bytes(damaged[:cut]))
        except StubPickleError:
            continue
        with contextlib.suppress(StubPickleError, RecursionError):
            stub_dumps(root, 5)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_decodes_to_the_same_structure(protocol):
    import collections

    value = {"a": [1, -(2**70), 2.5, "x\u00e9\n", (None, True, False)], "b": {3: b"y" * 3}}
    value["od"] = collections.OrderedDict(k=1)
    model = stub_model(pickle.dumps(value, protocol=protocol))
    root = model.root
    assert root["a"] == value["a"]
    assert [type(v) for v in root["a"]] == [type(v) for v in value["a"]]
    assert model.globals_seen[("collections", "OrderedDict")] == 1
    od = root["od"]
    assert isinstance(od, StubCall) and od.func.name == "collections.OrderedDict"


def test_persistent_ids_and_extensions_become_stand_ins():
    model = stub_model(b"\x80\x02X\x01\x00\x00\x00sQ\x82\x07\x86.")
    pid, ext = model.root
    assert isinstance(pid, StubPersistent) and pid.pid == "s"
    assert isinstance(ext, StubExtension) and ext.code == 7
    assert model.extensions == [7]
    with pytest.raises(StubPickleError):
        stub_dumps(model.root, 2)


def test_build_on_a_global_is_recorded_not_fatal():
    payload = b"\x80\x02cbuiltins\nlist\n}b."
    model = stub_model(payload)
    assert model.builds_on_globals == ["builtins.list"]


def test_a_structural_error_keeps_the_globals_read_before_it():
    payload = b"\x80\x02cos\nsystem\n)R0000"
    with pytest.raises(StubPickleError) as info:
        stub_model(payload)
    assert info.value.globals_seen[("os", "system")] == 1


@pytest.mark.parametrize(
    ("payload", "budget"),
    [
        (b"\x80\x02\x8b" + (5000).to_bytes(4, "little") + b"\x01" * 5000 + b".", "max_int_bytes"),
        (b"L" + b"9" * 5000 + b"L\n.", "max_int_bytes"),
        (b"\x80\x02" + b"N0" * 10_000 + b"N.", "max_opcodes"),
    ],
)
def test_budgets_refuse_before_the_work(payload, budget):
    with pytest.raises(ReadBudgetExceeded) as info:
        stub_model(payload, budget=ReadBudget(max_opcodes=10_000))
    assert info.value.budget == budget


def test_persistent_ids_are_written_back_as_torch_reads_them():
    import torch

    buffer = io.BytesIO()
    torch.save({"a": [torch.arange(3.0)], "b": None}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data_pkl = archive.read("archive/data.pkl")
    assert stub_dumps(stub_loads(data_pkl), 2) == data_pkl
