"""The checkpoint zip as untrusted input: limits, hostile names, corruption, data and entries."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dppo_ckpt.checkpoint import data_outline
from dppo_ckpt.checkpoint.archive import (
    ArchiveError,
    CheckpointArchive,
    CheckpointError,
    Limits,
    _BoundedReader,
    _reject_duplicate_keys,
    open_checkpoint,
    read_checkpoint_bytes,
)
from dppo_ckpt.checkpoint.data_outline import DataOutline, outline_data

# -- helpers --------------------------------------------------------------------------------


def zip_bytes(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip holding ``members`` exactly as named (duplicates and odd names included)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = compression
            archive.writestr(info, payload)
    return buffer.getvalue()


def entry(payload: bytes) -> dict[str, str]:
    """A ``data`` value the way SB3 stores a non-JSON attribute."""
    return {":type:": "<class 'object'>", ":serialized:": base64.b64encode(payload).decode()}


def checkpoint_bytes(data: object = None, extra: list[tuple[str, bytes]] | None = None) -> bytes:
    """A minimal checkpoint-shaped zip with the given ``data`` (a dict is JSON-encoded)."""
    if data is None:
        data = {"verbose": 0, "policy_class": entry(b"\x80\x05N.")}
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return zip_bytes([("data", raw), ("_stable_baselines3_version", b"2.9.2"), *(extra or [])])


def write(tmp_path: Path, name: str, payload: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(payload)
    return path


def member_data_offset(raw: bytes, name: str) -> int:
    """Offset of the first byte of a stored member's data in the zip file."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = archive.getinfo(name)
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    return info.header_offset + 30 + name_len + extra_len


def assert_refused(source: object, match: str, limits: Limits | None = None) -> ArchiveError:
    """Opening ``source`` (and using it) raises ArchiveError whose one-line reason matches."""
    with (
        pytest.raises(ArchiveError, match=match) as caught,
        open_checkpoint(source, limits) as archive,  # type: ignore[arg-type]
    ):
        archive.data  # noqa: B018 - parsing is part of using the file
        archive.serialized_entries()
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, CheckpointError)
    return caught.value


# -- a real checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real SB3 PPO checkpoint (Pendulum-v1)."""
    import torch
    from stable_baselines3 import PPO

    torch.set_num_threads(1)
    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0)
    model.learn(64)
    path = tmp_path_factory.mktemp("archive") / "ppo.zip"
    model.save(path)
    return path


def test_real_checkpoint_members_data_and_entries(ppo_zip: Path) -> None:
    with open_checkpoint(ppo_zip) as archive, zipfile.ZipFile(ppo_zip) as reference:
        assert isinstance(archive, CheckpointArchive)
        assert [m.name for m in archive.members] == reference.namelist()
        for info in archive.members:
            payload = archive.read_member(info.name)
            assert payload == reference.read(info.name)
            assert info.uncompressed_size == len(payload)
            assert info.crc == zlib.crc32(payload)
            assert info.compression == "stored"
        assert archive.data["n_steps"] == 64
        entries = archive.serialized_entries()
        assert {"policy_class", "observation_space", "action_space", "lr_schedule"} <= set(entries)
        assert all(payload[:1] == b"\x80" for payload in entries.values())  # pickle PROTO
        assert archive.sb3_version == archive.text_member("_stable_baselines3_version").strip()
        assert "Python" in archive.text_member("system_info.txt")
        assert set(archive.pth_members()) == {
            "policy.pth",
            "policy.optimizer.pth",
            "pytorch_variables.pth",
        }


def test_real_checkpoint_inner_torch_archives(ppo_zip: Path) -> None:
    with open_checkpoint(ppo_zip) as archive:
        for name in archive.pth_members():
            assert archive.pth_is_zip(name)
            pickles = archive.pth_pickles(name)
            data_pkl = archive.pth_data_pkl(name)
            assert list(pickles) == ["archive/data.pkl"]
            assert pickles["archive/data.pkl"] == data_pkl
            assert data_pkl[:1] == b"\x80" and data_pkl.endswith(b".")
            with archive.open_pth(name) as inner:
                assert "archive/byteorder" in inner
                assert inner.read_member("archive/byteorder") == b"little"


def test_open_member_streams_in_pieces(ppo_zip: Path) -> None:
    with open_checkpoint(ppo_zip) as archive:
        expected = archive.read_member("policy.pth")
        with archive.open_member("policy.pth") as stream:
            pieces = []
            while piece := stream.read(1000):
                pieces.append(piece)
        assert len(pieces) > 1
        assert b"".join(pieces) == expected


def test_archive_accepts_bytes_and_file_objects(ppo_zip: Path) -> None:
    raw = read_checkpoint_bytes(ppo_zip)
    with open_checkpoint(raw) as from_bytes:
        assert from_bytes.path == "<memory>"
        assert from_bytes.read_raw() == raw
        data = from_bytes.data
    with open(ppo_zip, "rb") as handle:
        with open_checkpoint(handle) as from_file:
            assert from_file.data == data
        assert not handle.closed  # a caller's file object stays the caller's


def test_an_archive_read_into_memory_is_the_bytes_it_was_opened_on(
    ppo_zip: Path, tmp_path: Path
) -> None:
    path = tmp_path / "model.zip"
    original = ppo_zip.read_bytes()
    path.write_bytes(original)
    with open_checkpoint(path, in_memory=True) as archive:
        assert archive.label == str(path)
        path.write_bytes(b"replaced after the open")  # later reads still see the first bytes
        raw = archive.read_raw()
        assert raw == original
        assert archive.read_raw() is raw  # no copy of the file per reader
        assert archive.read_member("data") == zipfile.ZipFile(io.BytesIO(original)).read("data")
    path.unlink()
    with pytest.raises(ArchiveError, match="no such file"):
        open_checkpoint(path, in_memory=True)


def _big_stored_zip(path: Path, flip: tuple[str, ...] = ()) -> None:
    """``data`` and two stored members of 24 MiB each (more than the CRC pass does on one
    thread), with a byte flipped inside each member named in ``flip``."""
    import random

    members = {name: random.Random(name).randbytes(24 << 20) for name in ("a.bin", "b.bin")}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("data", "{}")
        for name, content in members.items():
            archive.writestr(name, content)
    with zipfile.ZipFile(path) as archive:
        offsets = {info.filename: info.header_offset for info in archive.infolist()}
    raw = bytearray(path.read_bytes())
    for name in flip:
        header = offsets[name]
        name_len, extra_len = struct.unpack_from("<HH", raw, header + 26)
        raw[header + 30 + name_len + extra_len + (12 << 20)] ^= 0x01
    path.write_bytes(raw)


@pytest.mark.parametrize("threads", [True, False])
def test_the_crc_pass_finds_the_first_damaged_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: bool
) -> None:
    from dppo_ckpt.checkpoint import archive as archive_module

    if not threads:  # every file below the bound: one member after the other
        monkeypatch.setattr(archive_module, "_PARALLEL_CRC_BYTES", 1 << 40)
    path = tmp_path / "big.zip"
    _big_stored_zip(path)
    for in_memory in (False, True):
        with open_checkpoint(path, in_memory=in_memory) as archive:
            archive.check_members(archive.names())
            assert set(archive.names()) <= archive._checked
    for flipped, named in ((("b.bin",), "b.bin"), (("a.bin", "b.bin"), "a.bin")):
        _big_stored_zip(path, flipped)
        mismatch = f"member '{named}': CRC mismatch"
        # From the file and from its bytes in memory: the same verdict.
        for in_memory in (False, True):
            with (
                open_checkpoint(path, in_memory=in_memory) as archive,
                pytest.raises(ArchiveError, match=mismatch),
            ):
                archive.check_members(archive.names())


def test_the_crc_pass_reports_in_member_order(tmp_path: Path) -> None:
    # a.bin's bytes are damaged, and b.bin's local header names another member: one member
    # after the other finds a.bin first, and so must the two threads.
    path = tmp_path / "big.zip"
    _big_stored_zip(path, ("a.bin",))
    with zipfile.ZipFile(path) as archive:
        header = archive.getinfo("b.bin").header_offset
    raw = bytearray(path.read_bytes())
    assert raw[header + 30 : header + 35] == b"b.bin"
    raw[header + 30 : header + 35] = b"c.bin"
    path.write_bytes(raw)
    for in_memory in (False, True):
        with (
            open_checkpoint(path, in_memory=in_memory) as archive,
            pytest.raises(ArchiveError, match="member 'a.bin': CRC mismatch"),
        ):
            archive.check_members(archive.names())


def test_a_wrapped_stream_is_read_through_its_wrapper(tmp_path: Path) -> None:
    import gzip

    from dppo_ckpt.checkpoint.archive import _crc_source

    path = tmp_path / "big.zip"
    _big_stored_zip(path)
    packed = tmp_path / "big.zip.gz"
    with gzip.open(packed, "wb", compresslevel=1) as out:
        out.write(path.read_bytes())
    with gzip.open(packed, "rb") as stream:
        assert _crc_source(stream) is None  # its descriptor holds the compressed bytes
        with open_checkpoint(stream) as archive:
            archive.check_members(archive.names())
    with open(path, "rb") as plain:
        assert _crc_source(plain) == plain.fileno()


def test_a_stored_crc_past_the_end_of_the_file_says_so(tmp_path: Path) -> None:
    import os

    from dppo_ckpt.checkpoint.archive import _stored_crc

    path = tmp_path / "short"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _stored_crc(fd, 0, 3) == zlib.crc32(b"abc")
        assert _stored_crc(fd, 1, 5) is None
    finally:
        os.close(fd)
    assert _stored_crc(memoryview(b"abc"), 1, 2) == zlib.crc32(b"bc")
    assert _stored_crc(memoryview(b"abc"), 1, 5) is None


def test_closing_releases_the_file(ppo_zip: Path) -> None:
    with open_checkpoint(ppo_zip) as archive:
        pass
    with pytest.raises(ArchiveError, match="closed"):
        archive.read_member("data")


def test_missing_member(ppo_zip: Path) -> None:
    with open_checkpoint(ppo_zip) as archive, pytest.raises(ArchiveError, match="no member"):
        archive.read_member("nope")


# -- files that are not checkpoints -----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    error = assert_refused(tmp_path / "absent.zip", "no such file")
    assert error.path == str(tmp_path / "absent.zip")


def test_directory(tmp_path: Path) -> None:
    assert_refused(tmp_path, "directory")


def test_empty_file(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, "empty.zip", b""), "empty file")


def test_not_a_zip(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, "text.zip", b"hello, I am not a zip\n" * 50), "not a zip")


def test_zip_without_data(tmp_path: Path) -> None:
    raw = zip_bytes([("policy.pth", b"x"), ("_stable_baselines3_version", b"2.9.2")])
    assert_refused(write(tmp_path, "nodata.zip", raw), "no 'data' member")


def test_truncated(ppo_zip: Path, tmp_path: Path) -> None:
    raw = ppo_zip.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 10, 100):
        assert_refused(write(tmp_path, f"cut{cut}.zip", raw[:cut]), "truncated")


def test_file_larger_than_the_limit(ppo_zip: Path) -> None:
    assert_refused(ppo_zip, "more than the limit", Limits(max_file_bytes=1000))
    with pytest.raises(ArchiveError, match="more than the limit"):
        read_checkpoint_bytes(ppo_zip, Limits(max_file_bytes=1000))


# -- corruption -------------------------------------------------------------------------------


def test_bit_flip_in_data_is_a_crc_error(ppo_zip: Path, tmp_path: Path) -> None:
    raw = bytearray(ppo_zip.read_bytes())
    raw[member_data_offset(bytes(raw), "data") + 40] ^= 0x01
    path = write(tmp_path, "flipped.zip", bytes(raw))
    error = assert_refused(path, "CRC mismatch")
    assert error.member == "data"


def test_bit_flip_in_a_pth_is_a_crc_error(ppo_zip: Path, tmp_path: Path) -> None:
    raw = bytearray(ppo_zip.read_bytes())
    raw[member_data_offset(bytes(raw), "policy.pth") + 2000] ^= 0x10
    with open_checkpoint(bytes(raw)) as archive:
        archive.data  # noqa: B018 - the other members are intact
        with pytest.raises(ArchiveError, match="'policy.pth': CRC mismatch"):
            archive.pth_pickles("policy.pth")


def test_lying_size_header_is_caught_while_reading(tmp_path: Path) -> None:
    payload = json.dumps({"verbose": 0, "pad": "x" * 5000}).encode()
    raw = bytearray(zip_bytes([("data", payload)], compression=zipfile.ZIP_DEFLATED))
    # Declare 100 bytes instead of the real size, in the local and the central header.
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        info = archive.getinfo("data")
    struct.pack_into("<I", raw, info.header_offset + 22, 100)
    central = bytes(raw).rindex(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 100)
    with open_checkpoint(bytes(raw)) as archive:
        assert archive.member("data").uncompressed_size == 100
        with pytest.raises(ArchiveError, match="member 'data'"):
            archive.read_member("data")


def test_a_local_header_naming_another_member_is_refused() -> None:
    # The stored member is read from the file directly: the local header must still name it
    # as the directory does, as zipfile requires before its own reads.
    raw = bytearray(checkpoint_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        offset = archive.getinfo("data").header_offset
    assert raw[offset + 30 : offset + 34] == b"data"
    raw[offset + 30 : offset + 34] = b"dat4"
    error = assert_refused(bytes(raw), "member 'data': the local header names it b'dat4'")
    assert error.member == "data"


def test_a_stored_member_whose_sizes_disagree_is_refused() -> None:
    raw = bytearray(checkpoint_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        info = archive.getinfo("data")
    central = bytes(raw).index(b"PK\x01\x02")  # the first record is data's
    struct.pack_into("<I", raw, central + 20, info.compress_size - 1)
    assert_refused(bytes(raw), "'data' is stored but declares")


def test_stored_members_are_read_once_and_crc_checked_whole(ppo_zip: Path) -> None:
    raw = ppo_zip.read_bytes()
    # A caller's stream: read through its own position (files and bytes are read in place).
    with open_checkpoint(io.BytesIO(raw)) as archive:
        archive.read_member("policy.pth")
        reads: list[int] = []
        source = archive._fileobj
        original = source.readinto

        def counting(buffer: memoryview) -> int:
            reads.append(len(buffer))
            return original(buffer)

        source.readinto = counting  # type: ignore[method-assign]
        archive.check_member("policy.pth")  # read whole already: its CRC was checked then
        assert reads == []
        archive.check_member("policy.optimizer.pth")
        assert sum(reads) == archive.member("policy.optimizer.pth").uncompressed_size
    flipped = bytearray(raw)
    flipped[member_data_offset(raw, "policy.optimizer.pth") + 100] ^= 0x01
    with (
        open_checkpoint(bytes(flipped)) as archive,
        pytest.raises(ArchiveError, match="'policy.optimizer.pth': CRC mismatch"),
    ):
        archive.read_member("policy.optimizer.pth")


def test_counting_reader_stops_at_the_limit() -> None:
    # A source that yields more than it declared (what a lying header would do to a reader
    # that trusted it) is cut off at the limit.
    source = io.BytesIO(b"z" * 10_000)
    reader = io.BufferedReader(
        _BoundedReader(source, limit=4096, declared=4096, member="data", label="x.zip")
    )
    with pytest.raises(ArchiveError, match="inflates beyond 4096 bytes"):
        reader.read()
    short = io.BufferedReader(
        _BoundedReader(io.BytesIO(b"z" * 10), limit=100, declared=100, member="data", label="x")
    )
    with pytest.raises(ArchiveError, match="truncated"):
        short.read()


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_gives_archive_errors_only(ppo_zip: Path, data: st.DataObject) -> None:
    raw = bytearray(ppo_zip.read_bytes())
    positions = data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8))
    for position in positions:
        raw[position] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        with open_checkpoint(bytes(raw)) as archive:
            for info in archive.members:
                archive.read_member(info.name)
            archive.serialized_entries()
            for name in archive.pth_members():
                if archive.pth_is_zip(name):
                    archive.pth_pickles(name)
    except ArchiveError as error:
        assert error.reason and "\n" not in error.reason


# -- limits -----------------------------------------------------------------------------------


def test_zip_bomb_by_compression_ratio(tmp_path: Path) -> None:
    bomb = zip_bytes(
        [("data", b"{}"), ("policy.pth", b"\0" * (8 * 1024 * 1024))],
        compression=zipfile.ZIP_DEFLATED,
    )
    assert len(bomb) < 100_000
    error = assert_refused(write(tmp_path, "bomb.zip", bomb), r"compression ratio \d+:1")
    assert error.member == "policy.pth"


def test_the_ratio_check_applies_to_members_of_every_size_with_bounded_slack() -> None:
    small = [("data", b"{}"), ("pad", b"\0" * 60_000)]
    with open_checkpoint(zip_bytes(small, compression=zipfile.ZIP_DEFLATED)) as archive:
        assert archive.member("pad").ratio > 100
        assert archive.read_member("pad") == b"\0" * 60_000
    medium = [("data", b"{}"), ("pad", b"\0" * 200_000)]
    assert_refused(zip_bytes(medium, compression=zipfile.ZIP_DEFLATED), "zip bomb")


def test_members_with_names_differing_only_in_case_are_refused() -> None:
    raw = zip_bytes([("data", b"{}"), ("policy.pth", b"a"), ("POLICY.pth", b"b")])
    assert_refused(raw, "differ only in case")


def test_nested_archives_share_one_decompressed_budget(ppo_zip: Path) -> None:
    from dppo_ckpt.checkpoint.archive import BudgetExceeded

    size = ppo_zip.stat().st_size
    limits = Limits(max_decompressed_bytes=size)
    with open_checkpoint(ppo_zip, limits) as archive, pytest.raises(BudgetExceeded) as info:
        for _name, _inner in archive.iter_pth():
            for member in _inner.names() if _inner is not None else ():
                _inner.read_member(member)
    assert "budget max_decompressed exceeded" in str(info.value)


def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "model.zip"
    os.mkfifo(fifo)
    assert_refused(fifo, "not a regular file")


def test_member_and_total_size_limits() -> None:
    raw = checkpoint_bytes(extra=[("big", b"x" * 5000), ("big2", b"y" * 5000)])
    assert_refused(raw, "'big' declares 5000 bytes", Limits(max_member_bytes=4000))
    assert_refused(raw, "in total", Limits(max_total_bytes=8000))
    with open_checkpoint(raw, Limits(max_member_bytes=5000, max_total_bytes=11_000)) as archive:
        assert archive.read_member("big2") == b"y" * 5000


def test_too_many_members() -> None:
    raw = checkpoint_bytes(extra=[(f"m{i}", b"") for i in range(10)])
    assert_refused(raw, "12 members, more than the limit of 5", Limits(max_members=5))


def test_an_oversized_central_directory_is_refused_before_it_is_parsed() -> None:
    """zipfile parses as many entries as the directory's size holds, whatever count the end
    record gives: a count that lies low must not let it build them all."""
    raw = checkpoint_bytes(extra=[("n" * 2000 + str(i), b"") for i in range(3)])
    assert_refused(raw, r"central directory of \d+ bytes, more than the limit of 5120",
                   Limits(max_members=5))  # fmt: skip
    lying = bytearray(checkpoint_bytes(extra=[(f"member{i:04d}", b"") for i in range(200)]))
    end = lying.rfind(b"PK\x05\x06")
    lying[end + 8 : end + 12] = (2).to_bytes(2, "little") * 2  # 2 entries, on disk and in all
    assert_refused(bytes(lying), "central directory of", Limits(max_members=5))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_members"):
        Limits(max_members=0)


def test_default_limits_admit_a_large_policy_and_refuse_a_bomb() -> None:
    limits = Limits()
    policy_bytes = 300 * 1024 * 1024
    assert limits.max_member_bytes >= 2 * policy_bytes  # its Adam state is twice the policy
    assert limits.max_total_bytes >= 3 * policy_bytes
    assert limits.max_compression_ratio <= 200


# -- hostile member names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.pth", "'..' component"),
        ("sub/../../evil", "'..' component"),
        ("/etc/evil", "absolute path"),
        ("sub\\evil.pth", "backslash"),
        ("C:evil.pth", "drive letter"),
        ("evil\x01.pth", "control characters"),
    ],
)
def test_hostile_member_names(name: str, reason: str) -> None:
    assert_refused(checkpoint_bytes(extra=[(name, b"x")]), reason)


def test_duplicate_member_names() -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        raw = checkpoint_bytes(extra=[("data", b'{"evil": 1}')])
    assert_refused(raw, "duplicate member name 'data'")


def test_encrypted_member() -> None:
    raw = bytearray(zip_bytes([("data", b"{}"), ("policy.pth", b"x")]))
    # Set the "encrypted" flag bit in every local and central header.
    for magic, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := bytes(raw).find(magic, start)) >= 0:
            raw[start + flag_offset] |= 0x1
            start += 4
    assert_refused(bytes(raw), "member 'data' is encrypted")


def test_hostile_names_inside_a_pth() -> None:
    inner = zip_bytes([("archive/data.pkl", b"\x80\x02N."), ("../escape", b"x")])
    with (
        open_checkpoint(checkpoint_bytes(extra=[("policy.pth", inner)])) as archive,
        pytest.raises(ArchiveError, match="'..' component") as caught,
    ):
        archive.pth_pickles("policy.pth")
    assert "policy.pth" in str(caught.value)


def test_pth_that_is_not_a_zip() -> None:
    with open_checkpoint(checkpoint_bytes(extra=[("policy.pth", b"\x80\x02N." * 10)])) as archive:
        assert archive.pth_members() == ("policy.pth",)
        assert not archive.pth_is_zip("policy.pth")
        with pytest.raises(ArchiveError, match="not a zip"):
            archive.pth_pickles("policy.pth")


def test_pth_members_follow_sb3s_rule() -> None:
    extra = [(n, b"x") for n in ("a.pth", "dir/b.pth", ".pth", "c.PTH", "d.pth.bak")]
    with open_checkpoint(checkpoint_bytes(extra=extra)) as archive:
        assert archive.pth_members() == ("a.pth", "dir/b.pth")


# -- the data member --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, found list"),
        (b'"text"', "must be a JSON object, found str"),
        (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_bad_data_json(payload: bytes, reason: str) -> None:
    error = assert_refused(checkpoint_bytes(payload), reason)
    assert error.member == "data"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({":serialized:": "not base64!"}, "entry 'x': ':serialized:' is not valid base64"),
        ({":serialized:": "QUJDR"}, "not valid base64"),  # bad length
        ({":serialized:": "gAVOLg\u00e9=="}, "not valid base64"),  # non-ASCII
        ({":serialized:": 42}, "holds int, not a string"),
    ],
)
def test_bad_serialized_entries(value: dict[str, object], reason: str) -> None:
    assert_refused(checkpoint_bytes({"x": value}), reason)


def test_serialized_entries_match_sb3s_rule() -> None:
    data = {
        "plain": {"a": 1},  # a dict without ':serialized:' is plain JSON
        "pickled": entry(b"\x80\x05K\x01."),
        "number": 3,
    }
    with open_checkpoint(checkpoint_bytes(data)) as archive:
        assert archive.serialized_entries() == {"pickled": b"\x80\x05K\x01."}
        assert archive.data["plain"] == {"a": 1}


# -- data without the text of its large payload -----------------------------------------------

_B64 = base64.b64encode(bytes(range(256)) * 20).decode()  # 6,828 characters


def _outline(data: object, key: str = "s", min_chars: int = 4096) -> DataOutline | None:
    raw = data if isinstance(data, bytes) else json.dumps(data, indent=4).encode()
    return outline_data(raw, key, _reject_duplicate_keys, min_chars=min_chars)


def test_a_large_payload_is_decoded_from_the_bytes_and_left_out_of_data(monkeypatch) -> None:
    data = {"verbose": 0, "s": entry(bytes(range(256)) * 20), "policy_class": entry(b"\x80.")}
    found = _outline(data)
    assert found is not None
    assert found.payload == bytes(range(256)) * 20
    expected = json.loads(json.dumps(data))
    expected["s"][":serialized:"] = ""
    assert found.data == expected
    assert len(found.text) < 1000 and found.placeholder in found.text
    monkeypatch.setattr(data_outline, "MIN_PAYLOAD_CHARS", 4096)
    raw = checkpoint_bytes(data)
    with open_checkpoint(raw) as archive, open_checkpoint(raw) as parsed:
        assert archive.detach_payload("s") is not None
        assert archive.data == expected
        assert archive.serialized_entries() == parsed.serialized_entries()
        assert archive.detach_payload("s") is None  # parsed already: nothing changes
    with open_checkpoint(raw) as archive:
        assert archive.detach_payload("absent") is None
        assert archive.data == data  # parsed as usual


@pytest.mark.parametrize(
    "data",
    [
        # inside another string, after an escaped quote: the outline's placeholder is not
        # a string of its own there
        {"x": 'say "' + _B64, "s": entry(b"\x80.")},
        {"x": 'say "' + _B64 + '"', "s": entry(b"\x80.")},
        {_B64: 1, "s": entry(b"\x80.")},  # a key
        {"s": entry(b"\x80."), "other": {":serialized:": _B64}},  # another entry's
        {"s": {":serialized:": _B64, "longer": "AAAA" + _B64}},  # not the longest
        {"s": {":serialized:": _B64[:-1]}},  # not valid base64 (its length)
        {"s": {":serialized:": [_B64]}},  # not the string itself
        {"s": {":serialized:": _B64}, "x": ['"'] * 70_000},  # more quotes than it looks at
    ],
    ids=["escaped-quote", "escaped-quotes", "key", "other-entry", "not-longest", "bad-length",
         "in-a-list", "many-quotes"],
)  # fmt: skip
def test_the_outline_is_refused_where_the_string_is_not_the_payload(data: object) -> None:
    assert _outline(data) is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"s": {":serialized:": "' + _B64.encode() + b'"}, "a": 1,}', "not valid JSON"),
        (b'{"s": {":serialized:": "' + _B64.encode() + b'"}, "s": 1}', "duplicate key 's'"),
        (b'{"s": {":serialized:": "' + _B64.encode() + b'"}, "a": "\xff"}', "not valid UTF-8"),
        (b'{"a": \\"' + _B64.encode() + b'"}', "not valid JSON"),  # a backslash outside
    ],
)
def test_a_damaged_data_gives_no_outline_and_the_usual_error(
    raw: bytes, reason: str, monkeypatch
) -> None:
    assert _outline(raw) is None
    monkeypatch.setattr(data_outline, "MIN_PAYLOAD_CHARS", 4096)
    with open_checkpoint(checkpoint_bytes(raw)) as archive:
        assert archive.detach_payload("s") is None
        with pytest.raises(ArchiveError, match=reason):
            archive.data  # noqa: B018


_JSON_TEXT = st.text(st.sampled_from('ab"\\/\n=+' + _B64[:8]), max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_JSON_TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    before=st.dictionaries(_JSON_TEXT, _JSON, max_size=3),
    after=st.dictionaries(_JSON_TEXT, _JSON, max_size=3),
    around=st.sampled_from(["", '"', '\\"', "a", "="]),
    indent=st.sampled_from([None, 4]),
)
def test_an_outline_always_parses_as_data_itself(
    before: dict, after: dict, around: str, indent: int | None
) -> None:
    # Whatever surrounds the payload, an outline is given only when it is exactly the parse
    # of the whole text with that one string left out.
    payload = around + _B64 + around.replace("\\", "")
    document = {**before, "s": {":type:": "t", ":serialized:": payload}, **after}
    raw = json.dumps(document, indent=indent).encode()
    found = _outline(raw, min_chars=16)
    if found is None:
        return
    whole = json.loads(raw)
    assert found.payload == base64.b64decode(whole["s"][":serialized:"], validate=True)
    whole["s"][":serialized:"] = ""
    assert found.data == whole


def test_the_scaler_payload_is_decoded_once() -> None:
    from dppo_ckpt.checkpoint.contents import scaler_payload

    pickled = bytes(range(256)) * 4
    raw = checkpoint_bytes({"_variance_gradient_scaler": entry(pickled), "x": entry(b"\x80.")})
    with open_checkpoint(raw) as archive:
        assert archive.decoded_entry("_variance_gradient_scaler") is None
        alone = scaler_payload(archive)  # decoded on its own
        assert alone == pickled and archive.decoded_entry("_variance_gradient_scaler") is None
        entries = archive.serialized_entries()
        assert archive.decoded_entry("_variance_gradient_scaler") is entries[
            "_variance_gradient_scaler"
        ]
        assert scaler_payload(archive) is entries["_variance_gradient_scaler"]


def test_text_member_must_be_utf8() -> None:
    raw = checkpoint_bytes(extra=[("system_info.txt", b"\xff\xfe")])
    with open_checkpoint(raw) as archive, pytest.raises(ArchiveError, match="UTF-8"):
        archive.text_member("system_info.txt")


def test_rewritten_replaces_one_member_and_copies_the_rest_unchanged():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data", b'{"n_envs": 1}', compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("policy.pth", b"\x00" * 1000, compress_type=zipfile.ZIP_STORED)
        archive.writestr("dppo_ckpt.json", b"{}", compress_type=zipfile.ZIP_DEFLATED)
    with open_checkpoint(buffer.getvalue()) as archive:
        rewritten = archive.rewritten({"dppo_ckpt.json": b'{"new": 1}'})
        with pytest.raises(ArchiveError, match="no member 'absent'"):
            archive.rewritten({"absent": b""})
        assert archive.read_member("policy.pth") == b"\x00" * 1000  # still readable after
    with zipfile.ZipFile(io.BytesIO(rewritten)) as result:
        infos = result.infolist()
        assert [i.filename for i in infos] == ["data", "policy.pth", "dppo_ckpt.json"]
        assert [i.compress_type for i in infos] == [
            zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
        ]  # fmt: skip
        assert result.read("data") == b'{"n_envs": 1}'
        assert result.read("policy.pth") == b"\x00" * 1000
        assert result.read("dppo_ckpt.json") == b'{"new": 1}'
