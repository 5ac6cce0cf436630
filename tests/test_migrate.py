"""`dppo-ckpt migrate`: lossless, code-free and atomic rewriting of legacy checkpoints."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import pickletools
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dppo_ckpt.checkpoint import migrate
from dppo_ckpt.checkpoint.archive import open_checkpoint
from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.checkpoint.migrate import orchestrate
from dppo_ckpt.checkpoint.safe_pickle import SafeUnpickler, safe_load
from dppo_ckpt.cli import app
from fixtures.make_fixtures import (
    FIXTURES_DIR,
    FOREIGN_MODULES,
    foreign_modules,
    write_legacy_checkpoint,
)
from tests._bytes import assert_same_bytes
from tests._models import make_env, make_model

LEGACY = FIXTURES_DIR / "dppo_legacy.zip"
CURRENT = FIXTURES_DIR / "dppo_quantile_vgs.zip"
LAYOUT_1 = FIXTURES_DIR / "dppo_layout1.zip"
FOREIGN = FIXTURES_DIR / "dppo_legacy_foreign_modules.zip"
SCALER = migrate.SCALER_ENTRY
CLI = [sys.executable, "-m", "dppo_ckpt.cli", "migrate"]

runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, _sha256(p))
        for p in sorted(folder.iterdir())
    }


def _scaler_pickle(path: Path) -> bytes:
    with open_checkpoint(path) as archive:
        return archive.serialized_entries()[SCALER]


def _vgs_state(path: Path) -> dict:
    """Layout 2's scaler state, read as SB3 reads it (``torch.load(weights_only=True)``)."""
    import torch

    with zipfile.ZipFile(path) as archive:
        return torch.load(io.BytesIO(archive.read("vgs.pth")), weights_only=True)


def _state_bytes(state: dict) -> dict:
    return {
        key: [t.numpy().tobytes() for t in value] if isinstance(value, list) else value
        for key, value in state.items()
    }


_MARK, _STATE, _OTHER = object(), object(), object()
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


def _pickled_state_keys(payload: bytes) -> list[str]:
    """The keys of the scaler's state dict, read from the opcodes (nothing is unpickled).

    A stack machine over opcode stack effects: strings are kept, everything else is opaque,
    the state dict is the pickle's first dict, and its keys are the even items of the
    ``SETITEMS`` applied to it.
    """
    stack: list[object] = []
    memo: dict[int, object] = {}
    state_seen = False
    for opcode, arg, _ in pickletools.genops(payload):
        name = opcode.name
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in _MEMO_PUT:
            memo[arg] = stack[-1]
        elif name in _MEMO_GET:
            stack.append(memo[arg])
        elif name == "EMPTY_DICT" and not state_seen:
            state_seen = True
            stack.append(_STATE)
        elif name in ("SETITEMS", "SETITEM"):
            if name == "SETITEMS":
                mark = max(i for i, item in enumerate(stack) if item is _MARK)
                items, stack = stack[mark + 1 :], stack[:mark]
            else:
                items, stack = stack[-2:], stack[:-2]
            if stack[-1] is _STATE:
                return [key for key in items[::2] if isinstance(key, str)]
        elif name == "STOP":
            break
        else:
            before = opcode.stack_before
            if pickletools.markobject in before:
                mark = max(i for i, item in enumerate(stack) if item is _MARK)
                stack = stack[: mark - before.index(pickletools.markobject)]
            elif before:
                del stack[len(stack) - len(before) :]
            for kind in opcode.stack_after:
                if kind is pickletools.markobject:
                    stack.append(_MARK)
                else:
                    stack.append(arg if isinstance(arg, str) else _OTHER)
    raise AssertionError("no state dict with items found")


def _raw_members(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, compress type, local header + compressed bytes) of every member, in file order."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [zf.start_dir]
    return [
        (i.filename, i.compress_type, raw[i.header_offset : end])
        for i, end in zip(infos, ends, strict=True)
    ]


def _run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


# -- the legacy fixture --------------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("migrated") / "new.zip"
    outcome = migrate.migrate_file(LEGACY, out)
    assert outcome.exit_code == 0, outcome.message
    assert outcome.status == "migrated"
    # The classes import here, so the temporary result went through the load checks too.
    assert outcome.checks is not None and outcome.checks.exit_code == 0
    verdicts = {r.check_id: r.verdict.value for r in outcome.checks.results}
    assert verdicts["DPPO008"] == verdicts["DPPO010"] == "pass"
    return out


@pytest.fixture(scope="module")
def loaded(migrated):
    """The migrated checkpoint, loaded with the allow-list loader."""
    return safe_load(migrated, env=make_env())


def test_legacy_fixture_is_legacy():
    assert "_parameters" in _pickled_state_keys(_scaler_pickle(LEGACY))


def test_migrated_legacy_verifies_and_tracks_live_parameters(migrated, loaded):
    report = run_checks(migrated)
    assert report.exit_code == 0, [(r.check_id, r.message) for r in report.results]
    assert {r.verdict.value for r in report.results} == {"pass"}
    with open_checkpoint(migrated) as archive:
        assert SCALER not in archive.data and "vgs.pth" in archive
        assert archive.metadata["layout"] == 2
    model = loaded
    policy = list(model.policy.parameters())
    tracked = model._variance_gradient_scaler.parameters
    assert len(tracked) == len(policy)
    assert [id(p) for p in tracked] == [id(p) for p in policy]


def test_plain_sb3_load_sees_no_legacy_scaler(migrated):
    from dppo_ckpt import DistributionalPPO
    from dppo_ckpt.ppo import LegacyCheckpointWarning

    with pytest.warns(LegacyCheckpointWarning):
        DistributionalPPO.load(LEGACY, env=make_env())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyCheckpointWarning)
        model = DistributionalPPO.load(migrated, env=make_env())
    tracked = {id(p) for p in model._variance_gradient_scaler.parameters}
    assert tracked == {id(p) for p in model.policy.parameters()}


def test_legacy_fixture_holds_a_format_1_state():
    keys = _pickled_state_keys(_scaler_pickle(LEGACY))
    assert "variance_cap" in keys and "_state_version" not in keys and "_level" not in keys


def test_statistics_equal_the_legacy_ones_bit_for_bit(migrated, loaded):
    legacy = SafeUnpickler(io.BytesIO(_scaler_pickle(LEGACY)), entry=SCALER).load()
    assert legacy.legacy_parameters_dropped
    expected = legacy.state_dict()  # upgraded from format 1 on unpickling
    assert expected["format_version"] == 2 and expected["level"] is None
    for state in (_vgs_state(migrated), loaded._variance_gradient_scaler.state_dict()):
        for key in ("format_version", "config", "step_count", "scaling_factor", "noise_ratio"):
            assert state[key] == expected[key], key
        for key in ("level", "post_warmup_steps", "at_min_steps", "at_one_steps", "scale_sum"):
            assert state[key] == expected[key], key
        for key in ("exp_avg", "exp_avg_sq"):
            assert [t.numpy().tobytes() for t in state[key]] == [
                t.numpy().tobytes() for t in expected[key]
            ]
    assert expected["step_count"] > 0


def _writer_opcodes(payload: bytes) -> list[tuple[str, object]]:
    """The opcodes of a pickle with their arguments, but for the raw bytes of tensor blobs
    (torch names each storage by a memory address inside them) and the frame sizes."""
    return [
        (op.name, None if op.name == "FRAME" or isinstance(arg, bytes) else arg)
        for op, arg, _ in pickletools.genops(payload)
    ]


def test_migrated_legacy_is_what_the_fixed_code_writes(migrated):
    # The legacy and the current fixture come from the same seeded training run. The legacy
    # one holds a format-1 state; migration upgrades it, so the running level and the
    # factor's counters start afresh and vgs.pth differs from the current fixture's. Every
    # other member is the fixed code's layout-2 checkpoint, byte for byte, in its order.
    current, result = _raw_members(CURRENT), _raw_members(migrated)
    assert [(n, c) for n, c, _ in current] == [(n, c) for n, c, _ in result]
    for (name, _, a), (_, _, b) in zip(current, result, strict=True):
        if name != "vgs.pth":
            assert a == b, f"member {name} differs"
    state, reference = _vgs_state(migrated), _vgs_state(CURRENT)
    assert list(state) == list(reference)
    assert state["config"] == reference["config"] and state["step_count"] == 8
    assert (state["level"], state["post_warmup_steps"]) == (None, 0)  # started afresh


def test_layout_1_migrates_to_the_fixed_codes_checkpoint_bit_for_bit(tmp_path):
    # The same run saved in layout 1 (current state format): the migrated statistics are the
    # very ones the current code writes, and so is every other member.
    out = tmp_path / "new.zip"
    outcome = migrate.migrate_file(LAYOUT_1, out)
    assert outcome.exit_code == 0 and outcome.status == "migrated", outcome.message
    assert "rewrote layout 1 as layout 2" in outcome.message
    current, result = _raw_members(CURRENT), _raw_members(out)
    assert [(n, c) for n, c, _ in current] == [(n, c) for n, c, _ in result]
    for (name, _, a), (_, _, b) in zip(current, result, strict=True):
        if name != "vgs.pth":
            assert a == b, f"member {name} differs"
    assert _state_bytes(_vgs_state(out)) == _state_bytes(_vgs_state(CURRENT))
    from dppo_ckpt import DistributionalPPO

    model = DistributionalPPO.load(out, env=make_env())  # a plain load
    assert _state_bytes(model._variance_gradient_scaler.state_dict()) == _state_bytes(
        _vgs_state(CURRENT)
    )


@pytest.mark.parametrize("source", [LAYOUT_1, LEGACY], ids=["layout1", "legacy"])
def test_a_scaler_taken_from_the_bytes_of_data_migrates_as_the_parsed_one(
    source, tmp_path, monkeypatch
):
    # A large scaler is decoded from `data`'s bytes without its base64 text being built
    # (data_outline); the fixtures' are small, so the threshold is lowered for the second
    # run. Both ways give the same file, byte for byte.
    from dppo_ckpt.checkpoint import data_outline
    from dppo_ckpt.checkpoint.archive import CheckpointArchive

    detached: list[bool] = []
    original = CheckpointArchive.detach_payload

    def spy(self, key):
        found = original(self, key)
        detached.append(found is not None)
        return found

    monkeypatch.setattr(CheckpointArchive, "detach_payload", spy)
    parsed, outlined = tmp_path / "parsed.zip", tmp_path / "outlined.zip"
    assert migrate.migrate_file(source, parsed, static=True).exit_code == 0
    monkeypatch.setattr(data_outline, "MIN_PAYLOAD_CHARS", 4096)
    outcome = migrate.migrate_file(source, outlined, static=True)
    assert outcome.exit_code == 0 and outcome.status == "migrated", outcome.message
    assert detached == [False, True]
    assert outlined.read_bytes() == parsed.read_bytes()
    assert _state_bytes(_vgs_state(outlined)) == _state_bytes(_vgs_state(parsed))


def test_a_layout_1_scaler_that_is_off_loses_its_null_entry(tmp_path):
    from fixtures.make_fixtures import to_layout_1

    layout_1 = tmp_path / "off.zip"
    to_layout_1(FIXTURES_DIR / "dppo_vgs_off.zip", layout_1, None)
    with zipfile.ZipFile(layout_1) as archive:
        assert json.loads(archive.read("data"))[SCALER] is None
    out = tmp_path / "new.zip"
    outcome = migrate.migrate_file(layout_1, out)
    assert outcome.exit_code == 0 and outcome.status == "migrated", outcome.message
    assert_same_bytes((FIXTURES_DIR / "dppo_vgs_off.zip").read_bytes(), out.read_bytes(), "off")


def test_migration_says_it_upgraded_the_state(tmp_path):
    outcome = migrate.migrate_file(LEGACY, tmp_path / "new.zip", static=True)
    assert outcome.facts["state_version_before"] == 1
    assert outcome.facts["state_version_after"] == 2
    assert "from format 1 to 2" in outcome.message and "_parameters" in outcome.message


def test_a_newer_state_format_is_refused_as_unusable():
    from dppo_ckpt.checkpoint.stub_pickle import pickle_protocol, stub_dumps, stub_loads

    payload = _scaler_pickle(LAYOUT_1)
    root = stub_loads(payload)
    root.ops[0][1]["_state_version"] = 3
    newer = stub_dumps(root, pickle_protocol(payload))
    with pytest.raises(migrate.MigrationError, match="format 3 is newer") as info:
        migrate.scaler_member(newer)
    assert info.value.exit_code == 2
    assert migrate.scaler_member(payload).facts["state_version_before"] == 2


def test_the_scaler_and_migration_share_one_description_of_its_state():
    import torch

    from dppo_ckpt import vgs, vgs_format
    from dppo_ckpt.checkpoint.migrate import scaler_rewrite

    fresh = vgs.VarianceGradientScaler([torch.nn.Parameter(torch.zeros(2))])
    assert list(vgs_format.PICKLED_ORDER) == list(fresh.__getstate__())
    assert list(vgs_format.STATE_KEYS) == list(fresh.state_dict())
    assert vgs._STATE_DEFAULTS is vgs_format.PICKLED_DEFAULTS
    assert scaler_rewrite.STATE_FORMAT_VERSION is vgs_format.STATE_FORMAT_VERSION
    assert vgs.VarianceGradientScaler.STATE_FORMAT_VERSION == vgs_format.STATE_FORMAT_VERSION
    # The torch-free module stays torch-free, and migration with it.
    code = (
        "import sys, dppo_ckpt.checkpoint.migrate, dppo_ckpt.vgs_format; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_every_member_and_data_key_is_kept(migrated):
    before = {n: (c, raw) for n, c, raw in _raw_members(LEGACY)}
    after = {n: (c, raw) for n, c, raw in _raw_members(migrated)}
    assert set(after) == set(before) | {"vgs.pth"}
    for name in before:
        if name not in ("data", "dppo_ckpt.json"):
            assert before[name] == after[name], f"member {name} changed"
    with zipfile.ZipFile(LEGACY) as zf:
        old_text = zf.read("data").decode()
        old_meta = json.loads(zf.read("dppo_ckpt.json"))
    with zipfile.ZipFile(migrated) as zf:
        new_text = zf.read("data").decode()
        new_meta = json.loads(zf.read("dppo_ckpt.json"))
    old_data, new_data = json.loads(old_text), json.loads(new_text)
    assert [key for key in old_data if key != SCALER] == list(new_data)
    for key in new_data:
        assert json.dumps(old_data[key], indent=4) == json.dumps(new_data[key], indent=4), key
    # Textually too: the scaler entry's characters are cut out, nothing else.
    start = old_text.index(f'"{SCALER}"')
    end = old_text.index('"', old_text.index('":serialized:"') + 15) + 1
    assert old_text[:start] == new_text[:start]
    assert new_text[start:].startswith(old_text[old_text.index('"', old_text.index("}", end)) :])
    # The plain-JSON member only gains the layout.
    assert new_meta == {**old_meta, "layout": 2, "requires": new_meta["requires"]}


def test_migrating_twice_is_a_no_op(migrated, tmp_path):
    again = tmp_path / "again.zip"
    result = runner.invoke(app, ["migrate", str(migrated), str(again)])
    assert result.exit_code == 0, result.output
    assert "already current" in result.output
    assert_same_bytes(migrated.read_bytes(), again.read_bytes(), "a second migration")

    in_place = tmp_path / "current.zip"
    shutil.copyfile(migrated, in_place)
    before = _listing(tmp_path)
    result = runner.invoke(app, ["migrate", "--in-place", str(in_place)])
    assert result.exit_code == 0 and "already current" in result.output
    assert _listing(tmp_path) == before  # left alone, no backup


# -- classes that do not exist here ----------------------------------------------------------


def test_foreign_modules_fixture_migrates_without_those_modules(tmp_path):
    for module, _ in FOREIGN_MODULES:
        assert module not in sys.modules
        assert importlib.util.find_spec(module) is None
    out = tmp_path / "new.zip"
    outcome = migrate.migrate_file(FOREIGN, out)
    assert outcome.exit_code == 0, outcome.message
    for module, _ in FOREIGN_MODULES:
        assert module not in sys.modules
    with open_checkpoint(out) as archive:
        assert SCALER not in archive.data
        strings = [
            arg for _, arg, _ in pickletools.genops(archive.pth_data_pkl("vgs.pth"))
            if isinstance(arg, str)
        ]  # fmt: skip
    # The state dict names no class of the old modules: only what torch's loader accepts.
    assert not any("variance_gradient_scaler" in text for text in strings)
    assert "_parameters" not in strings and "variance_cap" not in strings
    # Everything but data, the layout and the new member is the input's, byte for byte.
    before = {n: raw for n, _, raw in _raw_members(FOREIGN)}
    for name, _, raw in _raw_members(out):
        if name not in ("data", "dppo_ckpt.json", "vgs.pth"):
            assert before[name] == raw, name
    # With the old modules back, the result loads and the scaler tracks the live parameters.
    from dppo_ckpt import DistributionalPPO

    with foreign_modules():
        model = DistributionalPPO.load(out, env=make_env())
    policy = [id(p) for p in model.policy.parameters()]
    assert [id(p) for p in model._variance_gradient_scaler.parameters] == policy


def test_verify_refuses_the_foreign_fixture_that_migrate_accepts(tmp_path):
    # verify follows the allow-list strictly; migrate only names these classes, runs nothing.
    report = run_checks(FOREIGN, static=True)
    assert report.exit_code == 3
    refused = {r.check_id: r for r in report.results}["DPPO004"]
    assert {item["global"] for item in refused.details["refused"]} == {
        f"{module}.{name}" for module, name in FOREIGN_MODULES if name != "DistributionalPPO"
    }
    outcome = migrate.migrate_file(FOREIGN, tmp_path / "new.zip", dry_run=True)
    assert outcome.exit_code == 0 and outcome.status == "would migrate"
    assert outcome.facts["named_off_allow_list"] == sorted(
        item["global"] for item in refused.details["refused"]
    )


def test_foreign_result_keeps_the_same_statistics(tmp_path):
    out = tmp_path / "new.zip"
    assert migrate.migrate_file(FOREIGN, out, static=True).exit_code == 0
    # Same training run as the legacy fixture: the module names are gone with the pickle,
    # and the scaler members are identical, byte for byte.
    legacy_out = tmp_path / "legacy.zip"
    assert migrate.migrate_file(LEGACY, legacy_out, static=True).exit_code == 0
    with zipfile.ZipFile(out) as a, zipfile.ZipFile(legacy_out) as b:
        assert a.read("vgs.pth") == b.read("vgs.pth")
    assert _state_bytes(_vgs_state(out)) == _state_bytes(_vgs_state(legacy_out))


# -- refusals and errors -----------------------------------------------------------------------


def test_unsafe_input_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "new.zip"
    for name in ("hostile_data_entry.zip", "hostile_nested_blob.zip", "hostile_policy_pth.zip"):
        outcome = migrate.migrate_file(FIXTURES_DIR / name, out)
        assert outcome.exit_code == 3, (name, outcome.message)
        assert outcome.status == "refused"
    assert list(tmp_path.iterdir()) == []


def test_only_the_scaler_class_may_come_from_anywhere():
    from dppo_ckpt.checkpoint.safe_pickle import Finding, GlobalVerdict

    def finding(entry: str, name: str, path: tuple[str, ...] = ()) -> Finding:
        return Finding("data", entry, name, GlobalVerdict.NOT_ALLOWED, path)

    assert migrate.is_exempt(finding(SCALER, "old.VarianceGradientScaler"))
    assert not migrate.is_exempt(finding(SCALER, "os.system"))
    assert not migrate.is_exempt(finding("clip_range", "old.VarianceGradientScaler"))
    assert not migrate.is_exempt(finding(SCALER, "old.VarianceGradientScaler", ("blob",)))
    assert not migrate.is_exempt(
        Finding("data", SCALER, "cloudpickle.VarianceGradientScaler", GlobalVerdict.CODE_BY_VALUE)
    )


def test_broken_input_is_unusable(tmp_path):
    for name in ("broken_not_a_zip.zip", "broken_truncated.zip", "broken_no_data.zip"):
        outcome = migrate.migrate_file(FIXTURES_DIR / name, tmp_path / "new.zip")
        assert outcome.exit_code == 2, (name, outcome.message)
    assert list(tmp_path.iterdir()) == []


def test_a_current_looking_file_that_fails_its_plan_leaves_no_copy_behind(tmp_path):
    # It records layout 2, so its copy starts while the plan reads it; the plan finds the
    # damage, and the copy is thrown away.
    outcome = migrate.migrate_file(FIXTURES_DIR / "broken_bitflip.zip", tmp_path / "new.zip")
    assert outcome.exit_code == 2 and outcome.status == "unusable", outcome.message
    assert list(tmp_path.iterdir()) == []


def test_a_copy_that_fails_is_unusable_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(orchestrate, "copy_range", full_disk)
    outcome = migrate.migrate_file(CURRENT, tmp_path / "new.zip")
    assert outcome.exit_code == 2 and outcome.status == "unusable"
    assert "No space left on device" in outcome.message
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(path, **_):
        assert path.exists() and path.parent == tmp_path  # the temporary file, beside NEW
        raise migrate.MigrationError("the result does not verify: simulated")

    monkeypatch.setattr(orchestrate, "_verify", refuse)
    outcome = migrate.migrate_file(LEGACY, tmp_path / "new.zip")
    assert outcome.exit_code == 1 and outcome.status == "failed"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_writes_nothing(tmp_path):
    work = tmp_path / "old.zip"
    shutil.copyfile(LEGACY, work)
    before = _listing(tmp_path)
    for extra in ([str(tmp_path / "new.zip")], ["--in-place"]):
        result = runner.invoke(app, ["migrate", "--dry-run", str(work), *extra])
        assert result.exit_code == 0, result.output
        assert "would migrate" in result.output
        assert _listing(tmp_path) == before


def _migrated_bytes(tmp_path: Path) -> bytes:
    """The legacy fixture as :func:`migrate.migrate_file` rewrites it (in a folder of its own)."""
    folder = tmp_path / "reference"
    folder.mkdir()
    outcome = migrate.migrate_file(LEGACY, folder / "migrated.zip", static=True)
    assert outcome.exit_code == 0, outcome.message
    data = (folder / "migrated.zip").read_bytes()
    shutil.rmtree(folder)
    return data


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "new.zip"
    out.write_bytes(b"precious")
    result = runner.invoke(app, ["migrate", str(LEGACY), str(out)])
    assert result.exit_code == 2
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zip"]
    result = runner.invoke(app, ["migrate", "--force", "--static", str(LEGACY), str(out)])
    assert result.exit_code == 0, result.output
    assert_same_bytes(_migrated_bytes(tmp_path), out.read_bytes(), "the output")


def test_in_place_keeps_an_atomic_backup(tmp_path):
    work = tmp_path / "model.zip"
    shutil.copyfile(LEGACY, work)
    result = runner.invoke(app, ["migrate", "--in-place", "--static", str(work)])
    assert result.exit_code == 0, result.output
    assert_same_bytes(LEGACY.read_bytes(), (tmp_path / "model.zip.bak").read_bytes(), "the backup")
    assert_same_bytes(_migrated_bytes(tmp_path), work.read_bytes(), "the file migrated in place")
    # A second legacy file whose backup name is taken is refused, and left as it was.
    shutil.copyfile(LEGACY, work)
    result = runner.invoke(app, ["migrate", "--in-place", "--static", str(work)])
    assert result.exit_code == 2 and "exists" in result.output
    assert_same_bytes(LEGACY.read_bytes(), work.read_bytes(), "the refused file")
    result = runner.invoke(
        app, ["migrate", "--in-place", "--static", "--backup-suffix", ".old", str(work)]
    )
    assert result.exit_code == 0
    assert_same_bytes(LEGACY.read_bytes(), (tmp_path / "model.zip.old").read_bytes(), "the backup")


def test_several_inputs_with_a_summary(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    shutil.copyfile(LEGACY, inputs / "a_legacy.zip")
    shutil.copyfile(CURRENT, inputs / "b_current.zip")
    shutil.copyfile(FIXTURES_DIR / "broken_not_a_zip.zip", inputs / "c_broken.zip")
    result = runner.invoke(
        app, ["migrate", "--static", "--format", "json", "--out-dir", str(out), str(inputs)]
    )
    assert result.exit_code == 2  # the worst outcome: an unusable input
    report = json.loads(result.stdout)
    assert report["exit_code"] == 2
    statuses = {Path(f["source"]).name: f["status"] for f in report["files"]}
    assert statuses == {
        "a_legacy.zip": "migrated",
        "b_current.zip": "already current",
        "c_broken.zip": "unusable",
    }
    assert sorted(p.name for p in out.iterdir()) == ["a_legacy.zip", "b_current.zip"]
    result = runner.invoke(app, ["migrate", "--out-dir", str(out), str(inputs / "a_legacy.zip")])
    assert result.exit_code == 2  # exists, no --force
    table = runner.invoke(app, ["migrate", "--dry-run", "--out-dir", str(tmp_path), str(inputs)])
    assert "would migrate" in table.output and "already current" in table.output


# -- crash safety --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_legacy(tmp_path_factory) -> Path:
    """A legacy checkpoint of some 20 MB: a wide policy, trained one update, saved the old way."""
    import torch

    torch.set_num_threads(1)
    model = make_model(
        n_steps=64,
        batch_size=64,
        n_epochs=1,
        vgs_warmup_steps=0,
        policy_kwargs=dict(net_arch=dict(pi=[600, 600], vf=[600, 600])),
    )
    model.learn(64)
    path = tmp_path_factory.mktemp("big") / "big_legacy.zip"
    write_legacy_checkpoint(model, path)
    assert path.stat().st_size > 15_000_000
    return path


def _kill_after(args: list[str], delay: float) -> int | None:
    """Run the command, SIGKILL it after ``delay`` seconds; its exit code if it finished."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _timed_run(*args: str | os.PathLike[str]) -> float:
    start = time.monotonic()
    done = _run(*args)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - start


def test_sigkill_never_leaves_a_partial_output(big_legacy, tmp_path):
    original = _sha256(big_legacy)
    out = tmp_path / "new.zip"
    duration = _timed_run(big_legacy, out, "--static")
    report = run_checks(out, static=True)
    assert report.exit_code == 0 and _sha256(out) != original
    # Migration is deterministic: any complete output has exactly these bytes.
    migrated_sha = _sha256(out)
    rng = random.Random(9)
    killed = 0
    for _ in range(20):
        out.unlink(missing_ok=True)
        code = _kill_after([str(big_legacy), str(out), "--static"], rng.uniform(0, duration))
        killed += code is None
        assert _sha256(big_legacy) == original
        if out.exists():
            assert _sha256(out) == migrated_sha
        else:
            assert code is None, "a finished run must leave its output"
        for leftover in tmp_path.glob(".new.zip.*"):  # what a killed run cannot clean up
            leftover.unlink()
    assert killed > 0


def test_sigkill_in_place_keeps_input_or_result_and_backup_whole(big_legacy, tmp_path):
    original = _sha256(big_legacy)
    work, backup = tmp_path / "model.zip", tmp_path / "model.zip.bak"
    shutil.copyfile(big_legacy, work)
    duration = _timed_run(work, "--in-place", "--static")
    assert run_checks(work, static=True).exit_code == 0
    migrated_sha = _sha256(work)
    assert _sha256(backup) == original
    rng = random.Random(10)
    seen = set()
    for _ in range(12):
        backup.unlink(missing_ok=True)
        shutil.copyfile(big_legacy, work)
        _kill_after([str(work), "--in-place", "--static"], rng.uniform(0, duration))
        state = _sha256(work)
        assert state in (original, migrated_sha)
        if state == migrated_sha:
            assert _sha256(backup) == original  # the backup came first
        elif backup.exists():
            assert _sha256(backup) == original
        seen.add((state == migrated_sha, backup.exists()))
        for leftover in tmp_path.glob(".model.zip.*"):
            leftover.unlink()
    assert (False, False) in seen  # some kills landed before anything was published


def test_only_the_scaler_entry_leaves_data_for_a_big_file(big_legacy, tmp_path):
    out = tmp_path / "new.zip"
    assert migrate.migrate_file(big_legacy, out, static=True).exit_code == 0
    with zipfile.ZipFile(big_legacy) as a, zipfile.ZipFile(out) as b:
        old, new = json.loads(a.read("data")), json.loads(b.read("data"))
        old_pickle = base64.b64decode(old[SCALER][":serialized:"])
        member = b.getinfo("vgs.pth").file_size
    assert set(old) - set(new) == {SCALER} and all(old[k] == new[k] for k in new)
    assert member < len(old_pickle) * 0.75  # a third of the pickle was parameter copies


def test_a_later_run_removes_stale_temporaries_of_its_own_and_says_so(tmp_path: Path) -> None:
    dst = tmp_path / "new.zip"
    stale = tmp_path / ".new.zip.abc123.migrate-tmp"
    fresh = tmp_path / ".new.zip.def456.migrate-tmp"
    foreign = tmp_path / ".other.zip.abc123.migrate-tmp"
    for path in (stale, fresh, foreign):
        path.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    outcome = migrate.migrate_file(LEGACY, dst, static=True)
    assert outcome.exit_code == 0, outcome.message
    assert "removed 1 stale temporary file" in outcome.message
    assert not stale.exists()
    assert fresh.exists() and foreign.exists()  # in use, or not this destination's


def test_migrate_into_a_read_only_folder_is_unusable_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root every folder is writable, so the refusal of a read-only one is simulated
    # where the operating system reports it: creating the temporary file.
    def refuse(*args: object, dir: str, **kwargs: object) -> None:  # noqa: A002
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(orchestrate.tempfile, "mkstemp", refuse)
    outcome = migrate.migrate_file(LEGACY, tmp_path / "new.zip", static=True)
    assert outcome.exit_code == 2
    assert outcome.message == f"cannot write {tmp_path}: Permission denied"
