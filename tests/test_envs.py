"""The environment spec: recorded as plain JSON, built into a stack, snapshotted and restored."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dppo_ckpt import envs
from dppo_ckpt.checkpoint.metadata import (
    LAYOUT_REQUIRES,
    LAYOUT_VERSION,
    MetadataError,
    encode_metadata,
    parse_metadata,
)
from dppo_ckpt.envs import EnvError, EnvOptions, EnvSpec

VECTOR = "tests.ux_envs:UxVector-v0"


def test_a_spec_survives_its_json_form():
    spec = EnvSpec(VECTOR, 3, {"scale": 2.0}, "subproc", {"clip_obs": 5.0}, 4, False)
    text = json.dumps(spec.to_json())
    assert EnvSpec.from_json(json.loads(text), "x") == spec
    assert spec.module == "tests.ux_envs" and spec.gym_id == "UxVector-v0"
    assert EnvSpec("CartPole-v1").module is None
    assert spec.describe() == (
        'tests.ux_envs:UxVector-v0 x3 (subproc), env_kwargs {"scale": 2.0}, '
        "VecNormalize(clip_obs=5.0), 4 stacked frames"
    )


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"env_id": ""}, "has no env_id"),
        ({"env_id": "X-v0", "vec_env": "threads"}, "vec_env is 'threads'"),
        ({"env_id": "X-v0", "frame_stack": -1}, "frame_stack is not a count"),
        ({"env_id": "X-v0", "normalize": {"clip": 1}}, "unknown key 'clip'"),
        ({"env_id": "X-v0", "extra": 1}, "unknown environment spec field 'extra'"),
        ([], "not a JSON object"),
    ],
)
def test_a_malformed_spec_is_refused_by_name(document, expected):
    with pytest.raises(EnvError, match=expected):
        EnvSpec.from_json(document, "run.json")


def test_options_override_a_record_and_cannot_change_a_fixed_stack():
    recorded = EnvSpec(VECTOR, 2, normalize={"clip_obs": 5.0}, frame_stack=2)
    moved = envs.resolve_spec(EnvOptions(vec_env="subproc", normalize=True), recorded, fixed=True)
    assert moved.vec_env == "subproc" and moved.normalize == {"clip_obs": 5.0}
    with pytest.raises(EnvError, match="--frame-stack differs from the recorded environment"):
        envs.resolve_spec(EnvOptions(frame_stack=4), recorded, fixed=True)
    with pytest.raises(EnvError, match="--normalize differs"):
        envs.resolve_spec(EnvOptions(normalize=False), recorded, fixed=True)
    with pytest.raises(EnvError, match="pass --env ID"):
        envs.resolve_spec(EnvOptions(), None, default_id=None)
    with pytest.raises(EnvError, match="--vec-env must be"):
        envs.resolve_spec(EnvOptions(vec_env="threads"), None)


def test_a_recorded_module_is_imported_only_when_allowed():
    spec = EnvSpec("tests.ux_envs_never_imported:Nothing-v0")
    with pytest.raises(EnvError) as caught:
        envs.build_vec_env(spec, 0, allowed=False, source="model.zip")
    message = str(caught.value)
    assert message.startswith("model.zip names environment")
    assert "pass --env tests.ux_envs_never_imported:Nothing-v0" in message
    with pytest.raises(EnvError, match="cannot import module 'tests.ux_envs_never_imported'"):
        envs.build_vec_env(spec, 0, allowed=True)


def test_a_tuple_observation_space_is_one_line():
    with pytest.raises(EnvError) as caught:
        envs.build_vec_env(EnvSpec("Blackjack-v1"), 0, allowed=True)
    assert str(caught.value) == (
        "Blackjack-v1 is not supported: its observation space is Tuple "
        "(supported: Box, Discrete, MultiDiscrete, MultiBinary or a Dict of them)"
    )


@pytest.mark.skipif(importlib.util.find_spec("ale_py") is not None, reason="ale-py installed")
def test_atari_without_ale_py_names_the_extra():
    with pytest.raises(EnvError, match=r"--atari needs ale-py.*pip install 'dppo-ckpt\[atari\]'"):
        envs.build_vec_env(EnvSpec("CartPole-v1", atari=True), 0, allowed=True)


def test_policies_follow_the_observations():
    image = envs.build_vec_env(EnvSpec("tests.ux_envs:UxImage-v0", frame_stack=4), 0, allowed=True)
    vector = envs.build_vec_env(EnvSpec(VECTOR), 0, allowed=True)
    try:
        assert image.observation_space.shape == (36, 36, 4)
        assert envs.policy_for(image.observation_space) == "CnnPolicy"
        assert envs.policy_for(vector.observation_space) == "MlpPolicy"
    finally:
        image.close()
        vector.close()


@pytest.mark.parametrize("vec_env", ["dummy", "subproc"])
def test_a_restored_stack_steps_exactly_as_the_original(vec_env):
    spec = EnvSpec(VECTOR, 2, vec_env=vec_env, normalize={}, frame_stack=2)
    original = envs.build_vec_env(spec, 0, allowed=True)
    restored = envs.build_vec_env(spec, 99, allowed=True)
    try:
        original.reset()
        push = np.full((2, 1), 0.5, dtype=np.float32)
        for _ in range(45):  # past the 40-step time limit: the episode counters matter
            original.step(push)
        snapshot = envs.snapshot_environments(original)
        statistics = envs.save_normalization(original)
        assert envs.restore_snapshot(restored, snapshot) is None
        envs.load_normalization(restored, statistics)
        for _ in range(40):
            a, b = original.step(push), restored.step(push)
            for x, y in zip(a[:3], b[:3], strict=True):
                assert np.array_equal(x, y)
    finally:
        original.close()
        restored.close()


def test_statistics_that_do_not_fit_are_refused_whole():
    small = envs.build_vec_env(EnvSpec(VECTOR, normalize={}), 0, allowed=True)
    large = envs.build_vec_env(EnvSpec(VECTOR, 2, normalize={}), 0, allowed=True)
    try:
        large.reset()
        data = envs.save_normalization(large)
        before = envs.save_normalization(small)
        with pytest.raises(ValueError, match="returns has shape"):
            envs.load_normalization(small, data)
        with pytest.raises(ValueError, match="not a statistics file"):
            envs.load_normalization(small, b"not an npz")
        assert envs.save_normalization(small) == before
    finally:
        small.close()
        large.close()


def test_the_checkpoint_member_records_the_spec_and_stays_unchanged_without_it():
    numerics = {"numerics": "portable", "threads": 1}
    plain = encode_metadata(numerics)
    layout = {"layout": LAYOUT_VERSION, "requires": LAYOUT_REQUIRES}
    assert json.loads(plain) == {"format": 1, "numerics": numerics, **layout}
    assert parse_metadata(plain) == {"format": 1, "numerics": numerics, **layout}
    # A layout-1 member (written before layout 2) has neither key, and reads as layout 1.
    old = encode_metadata(numerics, layout=None)
    assert json.loads(old) == {"format": 1, "numerics": numerics}
    assert parse_metadata(old) == {"format": 1, "layout": 1, "numerics": numerics}
    spec = EnvSpec(VECTOR, env_kwargs={"scale": [1, {"a": 2}]}).to_json()
    raw = encode_metadata(numerics, env=spec, run={"timesteps": 512, "seed": 0})
    parsed = parse_metadata(raw)
    assert EnvSpec.from_json(parsed["env"], "x").env_kwargs == {"scale": [1, {"a": 2}]}
    assert parsed["run"] == {"timesteps": 512, "seed": 0}
    deep: dict = {}
    cursor = deep
    for _ in range(20):
        cursor["a"] = {}
        cursor = cursor["a"]
    hostile = json.dumps({"format": 1, "numerics": numerics, "env": deep}).encode()
    with pytest.raises(MetadataError, match="nested more than"):
        parse_metadata(hostile)


@pytest.mark.parametrize("axes", [(0, 3, 1, 2), (2, 0, 3, 1)])
def test_a_transposed_array_survives_the_allow_list_loader(axes):
    # VecTransposeImage hands the model channel-first views of channel-last frames, so a
    # checkpoint's last observation is such a view; numpy pickles it in memory order.
    import pickle

    from dppo_ckpt.checkpoint.safe_pickle import SafeUnpickler

    view = np.arange(2 * 3 * 5 * 7, dtype=np.uint8).reshape(2, 3, 5, 7).transpose(axes)
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    loaded = SafeUnpickler(io.BytesIO(pickle.dumps(view, protocol=5))).load()
    assert loaded.shape == view.shape and np.array_equal(loaded, view)


# -- a statistics file nobody vouches for -----------------------------------------------------

_CAP = 64 * 1024 * 1024  # the size limit of a statistics file (envs._MAX_NORMALIZATION_BYTES)


def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _deflate_bomb() -> bytes:
    """A few hundred KB whose one member inflates to more than the size limit."""
    count = _CAP // 8 + 1024
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("returns.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header((count,)))
        zeros = bytes(1 << 20)
        for _ in range(count * 8 // len(zeros)):
            member.write(zeros)
        member.write(bytes(count * 8 % len(zeros)))
    return buffer.getvalue()


def _object_arrays() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, returns=np.array([{"a": 1}, None], dtype=object))
    return buffer.getvalue()


HOSTILE_STATISTICS = {
    # One member that inflates to more than the limit, from a file a thousand times smaller.
    "deflate-bomb": (_deflate_bomb, "member 'returns.npy' brings the uncompressed size to"),
    # A header declaring 8 TiB of float64 over 8 bytes of data: numpy would allocate it first.
    "huge-shape": (
        lambda: _zip({"returns.npy": _npy_header((1 << 40,)) + bytes(8)}),
        "array 'returns' declares shape (1099511627776,) of float64",
    ),
    "object-array": (_object_arrays, "array 'returns' holds Python objects"),
    "strings": (
        lambda: _zip({"returns.npy": _npy_header((2,), "<U4") + bytes(32)}),
        "array 'returns' holds <U4 values, not numbers",
    ),
    "lzma": (
        lambda: _zip({"returns.npy": _npy_header((1,)) + bytes(8)}, zipfile.ZIP_LZMA),
        "member 'returns.npy' uses compression method 14",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_STATISTICS))
def test_a_hostile_statistics_file_is_refused_before_it_is_read(case):
    make, reason = HOSTILE_STATISTICS[case]
    data = make()
    assert len(data) < _CAP // 100
    venv = envs.build_vec_env(EnvSpec(VECTOR, normalize={}), 0, allowed=True)
    try:
        before = envs.save_normalization(venv)
        with pytest.raises(EnvError) as caught:
            envs.load_normalization(venv, data)
        assert caught.value.exit_code == 2
        assert str(caught.value).startswith(reason) and "\n" not in str(caught.value)
        assert envs.save_normalization(venv) == before
    finally:
        venv.close()


@pytest.mark.parametrize("kind", ["directory", "too-large", "deflate-bomb"])
def test_build_stack_refuses_a_hostile_statistics_file_in_one_line(tmp_path, kind):
    path = tmp_path / "start.vecnorm.npz"
    if kind == "directory":
        path.mkdir()
        reason = "start.vecnorm.npz is a directory, not a regular file"
    elif kind == "too-large":
        with path.open("wb") as handle:  # sparse: the size is what the check looks at
            handle.truncate(_CAP + 1)
        reason = f"start.vecnorm.npz is {_CAP + 1:,} bytes, more than the {_CAP:,}"
    else:
        path.write_bytes(_deflate_bomb())
        reason = "start.vecnorm.npz member 'returns.npy' brings the uncompressed size to"
    with pytest.raises(EnvError) as caught:
        envs.build_stack(EnvSpec(VECTOR, normalize={}), 0, allowed=True, statistics=path)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert message.startswith("VecNormalize statistics refused: " + reason), message
    assert message.endswith("(move it away to start the statistics fresh)")


def _flagged(bit: int) -> bytes:
    """A valid .npz whose member's directory entry sets a general-purpose flag ``bit``
    (encrypted, patched data, strong encryption), on which zipfile raises its own errors."""
    data = bytearray(_zip({"returns.npy": _npy_header((1,)) + bytes(8)}))
    entry = data.find(b"PK\x01\x02")
    flags = int.from_bytes(data[entry + 8 : entry + 10], "little")
    data[entry + 8 : entry + 10] = (flags | bit).to_bytes(2, "little")
    return bytes(data)


def test_damaged_statistics_still_start_fresh(tmp_path):
    path = tmp_path / "start.vecnorm.npz"
    spec = EnvSpec(VECTOR, normalize={})
    for data, reason in [
        (b"not an npz", "not a statistics file (not an .npz"),
        (_zip({"returns.npy": _npy_header((1,)) + bytes(16)}), "followed by 8 stray bytes"),
        (_zip({"returns.npy": b"\x93NUMPY\x09\x00"}), "is not an .npy array"),
        (_flagged(0x20), "uses a zip feature not supported"),
        (_flagged(0x40), "uses a zip feature not supported"),
        (_flagged(0x1), "is encrypted"),
    ]:
        path.write_bytes(data)
        venv, line = envs.build_stack(spec, 0, allowed=True, statistics=path)
        venv.close()
        assert line is not None and line.startswith("VecNormalize statistics start fresh")
        assert reason in line, line


def test_the_reader_gives_the_arrays_numpy_would():
    from dppo_ckpt import _npz

    arrays = {
        "fortran": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">f4"),
        "scalar": np.float64(7.5),
        "empty": np.zeros((0, 3)),
        "obs_rms/key/mean": np.arange(4, dtype=np.int64),
    }
    for compressed in (False, True):
        buffer = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
        read = _npz.read_arrays(buffer.getvalue(), _CAP)
        with np.load(io.BytesIO(buffer.getvalue())) as expected:
            assert sorted(read) == sorted(expected.files)
            for name in read:
                assert read[name].dtype == expected[name].dtype
                assert np.array_equal(read[name], expected[name]), name


@pytest.mark.parametrize("kind", ["fifo", "deflate-bomb"])
def test_cycle_refuses_hostile_statistics_beside_the_checkpoint_without_hanging(tmp_path, kind):
    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "fixtures" / "dppo_quantile_vgs.zip", tmp_path / "model.zip")
    statistics = tmp_path / "model.vecnorm.npz"
    if kind == "fifo":
        os.mkfifo(statistics)  # opening it to read would wait for a writer forever
        reason = "model.vecnorm.npz is a FIFO, not a regular file"
    else:
        statistics.write_bytes(_deflate_bomb())
        reason = "model.vecnorm.npz member 'returns.npy' brings the uncompressed size to"
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "cycle", "model.zip", "--env", "Pendulum-v1",
         "--normalize", "--cycles", "1", "--steps", "32"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: VecNormalize statistics refused: {reason}")
