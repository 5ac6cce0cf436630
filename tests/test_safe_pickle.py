"""Hostile pickles anywhere in a checkpoint are named and refused, and never run.

Every hostile payload below would create a marker file if it ever ran; the ``*_payload_is_live``
tests prove that by running each one through the loader it targets (cloudpickle, or torch.load
without weights_only). The refusal tests then assert the exact member, entry and global, and
that the marker never appears.

The payload builders (``reduce_payload``, ``legacy_torch_stream``, ``torch_zip``,
``rewrite_checkpoint``, ...) are plain functions so that fixture scripts can reuse them.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3 import PPO

from dppo_ckpt.checkpoint.archive import ArchiveError, CheckpointError, Limits, open_checkpoint
from dppo_ckpt.checkpoint.safe_pickle import (
    ALLOWED_GLOBALS,
    GlobalVerdict,
    PickleScanError,
    SafeUnpickler,
    UnsafePickleError,
    _resolve,
    classify_global,
    decode_entries,
    safe_load,
    scan_checkpoint,
    scan_pickle,
)
from dppo_ckpt.ppo import DistributionalPPO
from dppo_ckpt.vgs import VarianceGradientScaler

torch.set_num_threads(1)

# -- payload builders -----------------------------------------------------------------------


class Reduce:
    """Pickles as the call ``fn(*args)``: how a hostile file runs code when it is loaded."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def touch_command(marker: Path) -> Reduce:
    """``os.system("touch MARKER")``; pickles as the global ``posix.system``."""
    return Reduce(os.system, f"touch {shlex.quote(str(marker))}")


def open_for_write(marker: Path) -> Reduce:
    """``open(MARKER, "w")``; pickles as the global ``io.open``."""
    return Reduce(io.open, str(marker), "w")


def reduce_payload(obj: Any, protocol: int = 5) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001


def legacy_torch_stream(obj: Any, protocol: int = 2) -> bytes:
    """A legacy (non-zip) ``torch.save`` stream whose main pickle is ``obj``: magic number,
    protocol version, system info, the object, an empty list of storage keys. torch writes
    protocol 2, which spells bytes as ``_codecs.encode`` calls: nest blobs with protocol 4."""
    sys_info = {
        "protocol_version": TORCH_LEGACY_PROTOCOL,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    parts = (TORCH_LEGACY_MAGIC, TORCH_LEGACY_PROTOCOL, sys_info, obj, [])
    return b"".join(pickle.dumps(part, protocol=protocol) for part in parts)


def nested_blob(stream: bytes) -> Reduce:
    """A tensor storage as data entries pickle it: ``torch.storage._load_from_bytes(stream)``."""
    return Reduce(torch.storage._load_from_bytes, stream)


def replace_in_zip(raw: bytes, replacements: dict[str, bytes]) -> bytes:
    """Copy a zip, replacing the contents of some members (names and order kept)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            payload = replacements.get(info.filename, source.read(info))
            target.writestr(info, payload)
    return out.getvalue()


def torch_zip(data_pkl: bytes) -> bytes:
    """A zip-format ``torch.save`` archive whose ``data.pkl`` is ``data_pkl``."""
    buffer = io.BytesIO()
    torch.save(collections.OrderedDict(), buffer)
    template = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(template)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
    return replace_in_zip(template, {name: data_pkl})


def replace_pth_data_pkl(pth: bytes, data_pkl: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(pth)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
    return replace_in_zip(pth, {name: data_pkl})


def rewrite_checkpoint(
    source: Path,
    target: Path,
    *,
    entries: dict[str, bytes] | None = None,
    members: dict[str, Callable[[bytes], bytes]] | None = None,
) -> Path:
    """Copy an SB3 checkpoint, replacing ``:serialized:`` payloads of ``data`` entries and
    transforming members."""
    with zipfile.ZipFile(source) as archive:
        data = json.loads(archive.read("data"))
    for key, payload in (entries or {}).items():
        data[key] = {
            ":type:": "<class 'object'>",
            ":serialized:": base64.b64encode(payload).decode(),
        }
    with zipfile.ZipFile(source) as archive:
        replacements = {"data": json.dumps(data).encode()}
        for name, transform in (members or {}).items():
            replacements[name] = transform(archive.read(name))
    target.write_bytes(replace_in_zip(source.read_bytes(), replacements))
    return target


def code_by_value(marker: Path) -> bytes:
    """A closure pickled by value by cloudpickle whose call on load would touch the marker."""
    path = str(marker)

    def touch() -> None:
        with open(path, "w"):
            pass

    return cloudpickle.dumps(Reduce(touch))


def dynamic_global(marker: Path) -> bytes:
    """STACK_GLOBAL whose module name is computed (``str("posix")``), then ``system(cmd)``."""
    command = f"touch {shlex.quote(str(marker))}".encode()
    return (
        b"\x80\x04"
        + b"\x8c\x08builtins\x8c\x03str\x93"  # builtins.str
        + b"\x8c\x05posix\x85R"  # str("posix")
        + b"\x8c\x06system\x93"  # STACK_GLOBAL on a computed module name
        + b"\x8c"
        + bytes([len(command)])
        + command
        + b"\x85R."
    )


# -- checkpoints ----------------------------------------------------------------------------

SMALL = dict(n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Plain SB3 PPO and DistributionalPPO checkpoints, with the models that wrote them."""
    folder = tmp_path_factory.mktemp("checkpoints")
    models = {
        "pendulum": PPO("MlpPolicy", "Pendulum-v1", **SMALL),
        "pendulum_sde": PPO("MlpPolicy", "Pendulum-v1", use_sde=True, **SMALL),
        "cartpole": PPO("MlpPolicy", "CartPole-v1", **SMALL),
        "cartpole_lambda_lr": PPO(
            "MlpPolicy", "CartPole-v1", learning_rate=lambda f: 3e-4 * f, **SMALL
        ),
        "dppo_quantile": DistributionalPPO("MlpPolicy", "Pendulum-v1", vgs_warmup_steps=2, **SMALL),
        "dppo_categorical_sde": DistributionalPPO(
            "MlpPolicy",
            "Pendulum-v1",
            critic="categorical",
            use_sde=True,
            normalize_returns=True,
            vgs_warmup_steps=2,
            **SMALL,
        ),
    }
    saved = {}
    for name, model in models.items():
        model.learn(128)
        path = folder / f"{name}.zip"
        model.save(path)
        saved[name] = (path, model)
    return saved


PLAIN = ["pendulum", "pendulum_sde", "cartpole", "dppo_quantile", "dppo_categorical_sde"]


# -- the allow-list -------------------------------------------------------------------------


def test_allow_list_holds_exact_pairs_that_resolve() -> None:
    for (module, name), why in ALLOWED_GLOBALS.items():
        assert module and name and "*" not in module + name and why
        assert _resolve(module, name) is not None
    for module, name in [
        ("numpy", "load"),
        ("numpy.lib.npyio", "load"),
        ("torch", "load"),
        ("torch.serialization", "load"),
        ("gymnasium", "make"),
        ("stable_baselines3.common.utils", "get_schedule_fn"),
        ("builtins", "open"),
        ("posix", "system"),
        ("copyreg", "_reconstructor"),
    ]:
        assert classify_global(module, name) is GlobalVerdict.NOT_ALLOWED, (module, name)


def test_code_by_value_globals_have_their_own_verdict() -> None:
    for module, name in [
        ("cloudpickle.cloudpickle", "_make_function"),
        ("cloudpickle.cloudpickle", "_builtin_type"),
        ("cloudpickle.cloudpickle", "_make_skeleton_class"),
        ("types", "CodeType"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("__builtin__", "eval"),
    ]:
        assert classify_global(module, name) is GlobalVerdict.CODE_BY_VALUE, (module, name)


# -- plain checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PLAIN)
def test_plain_checkpoints_scan_clean(checkpoints: dict[str, tuple[Path, Any]], name: str) -> None:
    path, _ = checkpoints[name]
    with open_checkpoint(path) as archive:
        report = scan_checkpoint(archive)
    assert report.ok, report.refused
    members = {f.member for f in report.findings}
    assert {"data", "policy.pth", "policy.optimizer.pth"} <= members
    pth = {f.global_name for f in report.findings if f.member == "policy.pth"}
    assert "torch._utils._rebuild_tensor_v2" in pth
    assert all(f.path == ("archive/data.pkl",) for f in report.findings if f.member != "data")
    expected = {
        "pendulum": "gymnasium.spaces.box.Box",
        "pendulum_sde": "gymnasium.spaces.box.Box",
        "cartpole": "gymnasium.spaces.discrete.Discrete",
        # Layout 2: the scaler's state dict is a torch-saved parameter, no pickled object.
        "dppo_quantile": "dppo_ckpt.policy.CustomActorCriticPolicy",
        "dppo_categorical_sde": "dppo_ckpt.policy.CustomActorCriticPolicy",
    }[name]
    assert expected in report.globals_referenced
    if name.startswith("dppo"):
        vgs = {f.global_name for f in report.findings if f.member == "vgs.pth"}
        assert "dppo_ckpt.vgs.VarianceGradientScaler" not in report.globals_referenced
        assert vgs == {"torch._utils._rebuild_tensor_v2", "torch.FloatStorage",
                       "collections.OrderedDict"}  # fmt: skip


def test_scaler_tensors_are_scanned_inside_their_blobs() -> None:
    from fixtures.make_fixtures import FIXTURES_DIR

    # Layout 1: the scaler pickled in `data`, its tensors in nested blobs.
    with open_checkpoint(FIXTURES_DIR / "dppo_layout1.zip") as archive:
        report = scan_checkpoint(archive)
    nested = [
        f for f in report.findings if f.entry == "_variance_gradient_scaler" and len(f.path) == 2
    ]
    assert nested, "the scaler's tensor storages were not scanned"
    assert {f.global_name for f in nested} == {"torch.FloatStorage"}
    assert all(f.path[0].startswith("tensor blob") for f in nested)
    assert {f.path[1] for f in nested} == {"pickle 4 of 5"}


def test_scanner_imports_neither_torch_nor_numpy(
    checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    hostile = rewrite_checkpoint(
        checkpoints["pendulum"][0],
        tmp_path / "hostile.zip",
        entries={
            "clip_range": reduce_payload(
                nested_blob(legacy_torch_stream(open_for_write(tmp_path / "m")))
            )
        },
    )
    paths = [str(checkpoints["dppo_quantile"][0]), str(hostile)]
    script = (
        "import json, sys\n"
        "from dppo_ckpt.checkpoint.archive import open_checkpoint\n"
        "from dppo_ckpt.checkpoint.safe_pickle import scan_checkpoint\n"
        "oks = []\n"
        "for path in sys.argv[1:]:\n"
        "    with open_checkpoint(path) as archive:\n"
        "        oks.append(scan_checkpoint(archive).ok)\n"
        "heavy = ['torch', 'numpy', 'stable_baselines3', 'gymnasium', 'cloudpickle']\n"
        "print(json.dumps([oks, [m for m in heavy if m in sys.modules]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, check=True
    )
    oks, imported = json.loads(result.stdout)
    assert oks == [True, False]
    assert imported == []
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", PLAIN)
def test_safe_load_restores_the_model(
    checkpoints: dict[str, tuple[Path, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, original = checkpoints[name]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("cloudpickle.loads must not see checkpoint content")

    monkeypatch.setattr(cloudpickle, "loads", refuse)
    loaded = safe_load(path)
    assert type(loaded) is type(original)
    saved_params = original.policy.state_dict()
    loaded_params = loaded.policy.state_dict()
    assert saved_params.keys() == loaded_params.keys()
    for key, value in saved_params.items():
        assert torch.equal(value, loaded_params[key]), key
    saved_opt = original.policy.optimizer.state_dict()["state"]
    loaded_opt = loaded.policy.optimizer.state_dict()["state"]
    for index, state in saved_opt.items():
        assert torch.equal(state["exp_avg"], loaded_opt[index]["exp_avg"])
    assert loaded.observation_space == original.observation_space
    assert loaded.action_space == original.action_space
    assert loaded.num_timesteps == original.num_timesteps


# The foreign-module legacy fixture names classes from modules that no longer exist; its
# refusal (and migration) is tested in test_migrate.py.
COMMITTED_FIXTURES = sorted(
    path
    for path in (Path(__file__).resolve().parent.parent / "fixtures").glob("dppo_*.zip")
    if "foreign" not in path.stem
)


def test_committed_fixtures_exist() -> None:
    assert COMMITTED_FIXTURES


@pytest.mark.parametrize("path", COMMITTED_FIXTURES, ids=lambda p: p.stem)
def test_committed_fixtures_scan_clean_and_safe_load(path: Path) -> None:
    with open_checkpoint(path) as archive:
        report = scan_checkpoint(archive)
    assert report.ok, report.refused
    with warnings.catch_warnings():
        # the legacy fixture warns that its pickled parameter copies were dropped
        warnings.simplefilter("ignore")
        loaded = safe_load(path)
    assert isinstance(loaded, DistributionalPPO)
    scaler = loaded._variance_gradient_scaler
    if scaler is not None:
        assert [id(p) for p in scaler.parameters] == [
            id(p) for p in loaded.policy.parameters() if p.requires_grad
        ]


def test_safe_load_restores_the_scaler_statistics(
    checkpoints: dict[str, tuple[Path, Any]],
) -> None:
    path, original = checkpoints["dppo_quantile"]
    loaded = safe_load(path)
    saved = original._variance_gradient_scaler.state_dict()
    restored = loaded._variance_gradient_scaler.state_dict()
    assert restored["step_count"] == saved["step_count"] > 0
    assert restored["scaling_factor"] == saved["scaling_factor"]
    for a, b in zip(
        saved["exp_avg"] + saved["exp_avg_sq"],
        restored["exp_avg"] + restored["exp_avg_sq"],
        strict=True,
    ):
        assert torch.equal(a, b)


def test_safe_load_accepts_an_open_archive_and_an_explicit_class(
    checkpoints: dict[str, tuple[Path, Any]],
) -> None:
    path, original = checkpoints["cartpole"]
    with open_checkpoint(path) as archive:
        loaded = safe_load(archive, algo_cls=PPO)
    assert torch.equal(loaded.policy.action_net.weight, original.policy.action_net.weight.detach())


def test_decode_entries_gives_the_saved_objects(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    path, original = checkpoints["pendulum_sde"]
    with open_checkpoint(path) as archive:
        decoded = decode_entries(archive)
        assert set(decoded) == set(archive.serialized_entries())
    assert decoded["policy_class"] is type(original.policy)
    assert decoded["observation_space"] == original.observation_space
    assert decoded["lr_schedule"](0.5) == original.lr_schedule(0.5)
    assert np.array_equal(decoded["_last_obs"], original._last_obs)


def test_lambda_schedule_needs_trust(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    path, _ = checkpoints["cartpole_lambda_lr"]
    with pytest.raises(UnsafePickleError, match="code pickled by value") as caught:
        safe_load(path)
    assert caught.value.member == "data"
    assert caught.value.entry in {"learning_rate", "lr_schedule"}
    assert caught.value.verdict is GlobalVerdict.CODE_BY_VALUE
    assert caught.value.global_name.startswith("cloudpickle.")
    loaded = safe_load(path, trust=True)
    assert loaded.lr_schedule(1.0) == pytest.approx(3e-4)


# -- hostile checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class HostileCase:
    """A tampered checkpoint and the refusal it must earn.

    :param edits: keyword arguments of :func:`rewrite_checkpoint`, given the marker path.
    :param member, entry, global_name, verdict: what the scanner must report.
    :param blob: the global sits in a tensor blob nested in the pickle.
    :param inner: last element of the finding's nesting path (``None``: top-level pickle).
    :param named: the global a refusal names: the first refused one in file order.
    """

    edits: Callable[[Path], dict[str, Any]]
    member: str
    entry: str | None
    global_name: str
    verdict: GlobalVerdict = GlobalVerdict.NOT_ALLOWED
    blob: bool = False
    inner: str | None = None
    named: str | None = None

    def build(self, source: Path, target: Path, marker: Path) -> Path:
        return rewrite_checkpoint(source, target, **self.edits(marker))

    @property
    def refusal_names(self) -> str:
        return self.named or self.global_name


def _in_entry(entry: str, payload: Callable[[Path], bytes]) -> Callable[[Path], dict[str, Any]]:
    return lambda marker: {"entries": {entry: payload(marker)}}


def _in_pth(member: str, data_pkl: Callable[[Path], bytes]) -> Callable[[Path], dict[str, Any]]:
    return lambda marker: {
        "members": {member: lambda pth: replace_pth_data_pkl(pth, data_pkl(marker))}
    }


HOSTILE: dict[str, HostileCase] = {
    "data_entry": HostileCase(
        _in_entry("lr_schedule", lambda m: reduce_payload(touch_command(m))),
        "data",
        "lr_schedule",
        "posix.system",
    ),
    "data_entry_open": HostileCase(
        _in_entry("observation_space", lambda m: reduce_payload(open_for_write(m))),
        "data",
        "observation_space",
        "io.open",
    ),
    "policy_pth": HostileCase(
        _in_pth(
            "policy.pth",
            lambda m: reduce_payload(collections.OrderedDict(w=touch_command(m)), protocol=2),
        ),
        "policy.pth",
        None,
        "posix.system",
        inner="archive/data.pkl",
    ),
    "optimizer_pth": HostileCase(
        _in_pth(
            "policy.optimizer.pth",
            lambda m: reduce_payload({"state": {0: open_for_write(m)}, "param_groups": []}, 2),
        ),
        "policy.optimizer.pth",
        None,
        "io.open",
        inner="archive/data.pkl",
    ),
    "nested_legacy_blob": HostileCase(
        _in_entry(
            "clip_range",
            lambda m: reduce_payload(nested_blob(legacy_torch_stream(touch_command(m)))),
        ),
        "data",
        "clip_range",
        "posix.system",
        blob=True,
        inner="pickle 4 of 5",
    ),
    "nested_zip_blob": HostileCase(
        _in_entry(
            "_last_obs",
            lambda m: reduce_payload(nested_blob(torch_zip(reduce_payload(open_for_write(m), 2)))),
        ),
        "data",
        "_last_obs",
        "io.open",
        blob=True,
        inner="archive/data.pkl",
    ),
    "code_by_value": HostileCase(
        _in_entry("lr_schedule", code_by_value),
        "data",
        "lr_schedule",
        "cloudpickle.cloudpickle._make_function",
        GlobalVerdict.CODE_BY_VALUE,
    ),
    "dynamic_global": HostileCase(
        _in_entry("action_space", dynamic_global),
        "data",
        "action_space",
        "<dynamic global ?.'system'>",
        GlobalVerdict.DYNAMIC,
        named="builtins.str",  # computes the module name, before the STACK_GLOBAL
    ),
}


@pytest.fixture(params=sorted(HOSTILE))
def hostile(
    request: pytest.FixtureRequest, checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path
) -> tuple[HostileCase, Path, Path]:
    """(case, hostile checkpoint, marker that must never appear)."""
    marker = tmp_path / "MARKER"
    case = HOSTILE[request.param]
    path = case.build(checkpoints["pendulum"][0], tmp_path / "hostile.zip", marker)
    return case, path, marker


def test_scanner_names_the_hostile_global(hostile: tuple[HostileCase, Path, Path]) -> None:
    case, path, marker = hostile
    with open_checkpoint(path) as archive:
        report = scan_checkpoint(archive)
    assert not report.ok
    refused = {(f.member, f.entry, f.global_name, f.verdict) for f in report.refused}
    assert (case.member, case.entry, case.global_name, case.verdict) in refused
    # Only the tampered place is refused: the rest of the checkpoint is clean.
    assert {(f.member, f.entry) for f in report.refused} == {(case.member, case.entry)}
    finding = next(f for f in report.refused if f.global_name == case.global_name)
    if case.inner is None:
        assert finding.path == ()
    else:
        assert finding.path[-1] == case.inner
    assert any(p.startswith("tensor blob") for p in finding.path) == case.blob
    assert not marker.exists()


def test_safe_load_refuses_and_names_member_entry_global(
    hostile: tuple[HostileCase, Path, Path],
) -> None:
    case, path, marker = hostile
    with pytest.raises(UnsafePickleError) as caught:
        safe_load(path)
    error = caught.value
    assert (error.member, error.entry, error.global_name) == (
        case.member,
        case.entry,
        case.refusal_names,
    )
    assert isinstance(error, CheckpointError) and not isinstance(error, ArchiveError)
    message = str(error)
    assert "\n" not in message
    assert repr(case.member) in message and case.refusal_names in message
    if case.entry is not None:
        assert repr(case.entry) in message
    assert not marker.exists()


def test_decode_entries_refuses_hostile_entries(hostile: tuple[HostileCase, Path, Path]) -> None:
    case, path, marker = hostile
    with open_checkpoint(path) as archive:
        if case.member == "data":
            with pytest.raises(UnsafePickleError) as caught:
                decode_entries(archive)
            assert (caught.value.entry, caught.value.global_name) == (
                case.entry,
                case.refusal_names,
            )
        else:
            assert "policy_class" in decode_entries(archive)  # .pth members are not entries
    assert not marker.exists()


def test_safe_unpickler_alone_refuses_every_hostile_pickle(
    hostile: tuple[HostileCase, Path, Path],
) -> None:
    # Without the static scan in front: the unpickler itself must hold the line.
    case, path, marker = hostile
    with open_checkpoint(path) as archive:
        if case.entry is not None:
            payload = archive.serialized_entries()[case.entry]
        else:
            payload = archive.pth_data_pkl(case.member)
    with pytest.raises(UnsafePickleError) as caught:
        SafeUnpickler(io.BytesIO(payload), member=case.member, entry=case.entry).load()
    assert (caught.value.member, caught.value.entry) == (case.member, case.entry)
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_payload_is_live(
    name: str, checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    # The loaders SB3 and torch use without weights_only run every payload, so the refusals
    # above are not vacuous. (SB3 itself passes weights_only=True for .pth members.)
    case, marker = HOSTILE[name], tmp_path / "MARKER"
    path = case.build(checkpoints["pendulum"][0], tmp_path / "h.zip", marker)
    with contextlib.suppress(Exception):  # whatever happens after the payload ran
        if case.member == "data":
            PPO.load(path)
        else:
            with zipfile.ZipFile(path) as archive:
                torch.load(io.BytesIO(archive.read(case.member)), weights_only=False)
    assert marker.exists()


def test_trust_decodes_code_by_value(
    checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    path = HOSTILE["code_by_value"].build(checkpoints["pendulum"][0], tmp_path / "h.zip", marker)
    with open_checkpoint(path) as archive:
        decoded = decode_entries(archive, trust=True)
    assert marker.exists()  # trust means: run what the file says
    assert "lr_schedule" in decoded


def test_custom_objects_replace_refused_entries(
    checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    path = checkpoints["pendulum"][0]
    hostile = rewrite_checkpoint(
        path, tmp_path / "h.zip", entries={"_last_obs": reduce_payload(touch_command(marker))}
    )
    replacement = np.zeros((1, 3), dtype=np.float32)
    loaded = safe_load(hostile, custom_objects={"_last_obs": replacement})
    assert loaded._last_obs is replacement
    assert not marker.exists()


# -- the unpickler --------------------------------------------------------------------------


def test_tensors_and_parameters_rebuild_with_weights_only() -> None:
    state = {
        "exp_avg": [torch.arange(4.0), torch.ones(2, 3, dtype=torch.float64)],
        "flags": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.full((3,), 2.5)),
    }
    payload = cloudpickle.dumps(state)
    report = scan_pickle(payload, entry="x")
    assert report.ok
    assert {
        "torch._utils._rebuild_parameter",
        "torch.BoolStorage",
        "torch.DoubleStorage",
    } <= report.globals_referenced
    decoded = SafeUnpickler(io.BytesIO(payload), entry="x").load()
    for a, b in zip(decoded["exp_avg"], state["exp_avg"], strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert torch.equal(decoded["flags"], state["flags"])
    assert isinstance(decoded["param"], torch.nn.Parameter)
    assert torch.equal(decoded["param"], state["param"])


def test_legacy_scaler_with_pickled_parameters_decodes_unlinked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Older scalers pickled their whole __dict__, parameter copies included.
    parameters = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    scaler = VarianceGradientScaler(parameters)
    monkeypatch.setattr(VarianceGradientScaler, "__getstate__", lambda self: dict(self.__dict__))
    payload = cloudpickle.dumps(scaler)
    monkeypatch.undo()
    report = scan_pickle(payload, entry="_variance_gradient_scaler")
    assert report.ok
    assert "torch._utils._rebuild_parameter" in report.globals_referenced
    decoded = SafeUnpickler(io.BytesIO(payload), entry="_variance_gradient_scaler").load()
    assert isinstance(decoded, VarianceGradientScaler)
    assert decoded.legacy_parameters_dropped


def test_nested_blob_is_refused_by_the_unpickler_itself(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    payload = reduce_payload(nested_blob(legacy_torch_stream(touch_command(marker))))
    with pytest.raises(UnsafePickleError, match="posix.system") as caught:
        SafeUnpickler(io.BytesIO(payload), entry="blob").load()
    # The static analysis of the same model follows the blob and names the global inside.
    assert caught.value.global_name == "posix.system"
    assert caught.value.nesting[0].startswith("tensor blob")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_tensor_backward_hooks_are_refused() -> None:
    storage = torch.arange(2.0).storage()
    hooked = Reduce(
        torch._utils._rebuild_tensor_v2,
        storage,
        0,
        (2,),
        (1,),
        False,
        collections.OrderedDict(hook=np.dtype),
    )
    payload = reduce_payload(hooked)
    # Every global is allowed; the hook is the problem, and the static scan sees it too.
    report = scan_pickle(payload)
    assert [f.global_name for f in report.refused] == [
        "<torch._utils._rebuild_tensor_v2 of a tensor with backward hooks>"
    ]
    with pytest.raises(UnsafePickleError, match="backward hooks"):
        SafeUnpickler(io.BytesIO(payload)).load()


def test_deep_blob_nesting_is_bounded(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    stream = legacy_torch_stream(touch_command(marker))
    for _ in range(3):
        stream = legacy_torch_stream(nested_blob(stream), protocol=4)
    payload = reduce_payload(nested_blob(stream))  # the payload sits four blobs deep
    deep = scan_pickle(payload, max_depth=4)
    assert ("posix.system", 4) in {
        (f.global_name, sum("blob" in p for p in f.path)) for f in deep.refused
    }
    shallow = scan_pickle(payload, max_depth=2)
    assert [f.verdict for f in shallow.refused] == [GlobalVerdict.DYNAMIC]
    assert "nested deeper than 2" in shallow.refused[0].global_name


def test_memo_and_protocol_0_globals_are_tracked() -> None:
    # protocol 0 uses GLOBAL with text operands; protocol 4+ reuses memoised strings.
    assert (
        "posix.system"
        in scan_pickle(pickle.dumps(touch_command(Path("x")), protocol=0)).globals_referenced
    )
    twice = pickle.dumps([touch_command(Path("a")), Reduce(os.getcwd)], protocol=4)
    assert {"posix.system", "posix.getcwd"} <= scan_pickle(twice).globals_referenced
    inst = b"(S'touch x'\nios\nsystem\n."  # INST opcode
    assert "os.system" in scan_pickle(inst).globals_referenced


# -- corrupt pickles ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "corrupt pickle"),
        (b"\x80\x05", "corrupt pickle"),
        (b"\x80\x05.", "stack underflow"),
        (b"\x80\x05h\x07.", "memo key 7 missing"),
        (b"\x80\x05\xff.", "corrupt pickle"),
        (b"\x80\x05e.", "no MARK"),
        (pickle.dumps({"a": [1, 2, 3]}, protocol=5)[:-3], "corrupt pickle"),
    ],
)
def test_corrupt_pickles_give_a_clear_error(payload: bytes, reason: str) -> None:
    with pytest.raises(PickleScanError, match=reason) as caught:
        scan_pickle(payload, entry="e")
    assert isinstance(caught.value, ArchiveError)
    assert "entry 'e'" in str(caught.value) and "\n" not in str(caught.value)


def test_corrupt_entry_in_a_checkpoint(
    checkpoints: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    path = rewrite_checkpoint(
        checkpoints["pendulum"][0], tmp_path / "c.zip", entries={"lr_schedule": b"\x80\x05garbage"}
    )
    with pytest.raises(PickleScanError, match="entry 'lr_schedule'"):
        safe_load(path)
    with (
        open_checkpoint(path) as archive,
        pytest.raises(PickleScanError, match="entry 'lr_schedule'"),
    ):
        decode_entries(archive)


def test_corrupt_nested_blob(tmp_path: Path) -> None:
    payload = reduce_payload(nested_blob(legacy_torch_stream(1)[:30]))
    with pytest.raises(PickleScanError, match=r"tensor blob \d+ > pickle 3 of 5"):
        scan_pickle(payload, entry="e")
    zipped = reduce_payload(nested_blob(b"PK\x03\x04" + b"\0" * 50))
    with pytest.raises(PickleScanError, match="nested torch archive"):
        scan_pickle(zipped, entry="e")


@settings(max_examples=60)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_scanner(payload: bytes) -> None:
    try:
        scan_pickle(payload)
    except ArchiveError as error:  # damaged (PickleScanError) or over a budget
        assert "\n" not in str(error)


VALID = cloudpickle.dumps(
    {"space": np.arange(3.0), "t": torch.ones(2), "d": collections.deque([1.0])}
)


@settings(max_examples=60)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4)
)
def test_mutated_pickles_give_clean_errors(flips: list[tuple[int, int]]) -> None:
    payload = bytearray(VALID)
    for position, mask in flips:
        payload[position] ^= mask
    try:
        scan_pickle(bytes(payload), entry="e")
    except ArchiveError as error:  # damaged (PickleScanError) or over a budget
        assert "\n" not in str(error)


def test_limits_apply_to_nested_torch_archives() -> None:
    blob = torch_zip(reduce_payload(collections.OrderedDict(), protocol=2))
    payload = reduce_payload(nested_blob(blob))
    assert scan_pickle(payload).ok
    with pytest.raises(PickleScanError, match="more than the limit of 2"):
        scan_pickle(payload, limits=Limits(max_members=2))


def test_protocol_2_blob_bytes_are_not_taken_on_trust(tmp_path: Path) -> None:
    # Protocol 2 spells bytes as a call to _codecs.encode: refused, and the blob it feeds to
    # _load_from_bytes cannot be read statically.
    payload = reduce_payload(nested_blob(legacy_torch_stream(1)), protocol=2)
    refused = {(f.global_name, f.verdict) for f in scan_pickle(payload).refused}
    assert ("_codecs.encode", GlobalVerdict.NOT_ALLOWED) in refused
    assert any(verdict is GlobalVerdict.DYNAMIC for _, verdict in refused)


# -- BUILD: allow-listed classes are safe to call, not to hand file state to ------------------


def _dtype_overflow_pickle() -> bytes:
    """An array whose crafted dtype puts an object field far past the buffer's end."""

    class _CraftedDtype:
        def __reduce__(self):
            state = (3, "|", None, ("f0",), {"f0": (np.dtype("O"), 4096)}, 8, 1, 27)
            return np.dtype, ("V8", False, True), state

    class _Array:
        def __reduce__(self):
            from numpy._core.multiarray import _reconstruct

            items = [(12345678,)] * 64
            return _reconstruct, (np.ndarray, (0,), b"b"), (1, (64,), _CraftedDtype(), False, items)

    return pickle.dumps(_Array(), protocol=4)


def _class_patch_pickle() -> bytes:
    # GLOBAL FloatSchedule; state (None, {"__call__": ConstantSchedule}); BUILD
    return (
        b"cstable_baselines3.common.utils\nFloatSchedule\n"
        b"N(S'__call__'\ncstable_baselines3.common.utils\nConstantSchedule\nd\x86b."
    )


def _tensor_hook_pickle() -> bytes:
    plain = pickle.dumps(torch.zeros(3), protocol=4)
    hooks = (
        b"ccollections\nOrderedDict\n)RK\x00cstable_baselines3.common.utils\nConstantSchedule\ns"
    )
    return plain[:-1] + b"\x88N" + hooks + b"\x87b."


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_dtype_overflow_pickle, "crafted numpy.dtype"),
        (_class_patch_pickle, "BUILD on stable_baselines3.common.utils.FloatSchedule"),
        (_tensor_hook_pickle, "BUILD on a tensor"),
    ],
    ids=["dtype-out-of-bounds", "class-patch", "tensor-hooks"],
)
def test_build_with_hostile_state_is_refused(payload, reason) -> None:
    from stable_baselines3.common.utils import FloatSchedule

    call_before = FloatSchedule.__dict__.get("__call__")
    with pytest.raises(UnsafePickleError, match=reason):
        SafeUnpickler(io.BytesIO(payload()), member="data", entry="_last_obs").load()
    assert FloatSchedule.__dict__.get("__call__") is call_before


def test_build_on_a_bare_global_is_flagged_statically() -> None:
    report = scan_pickle(_class_patch_pickle(), member="data", entry="clip_range")
    assert not report.ok
    assert any(
        "BUILD on stable_baselines3.common.utils.FloatSchedule" in f.global_name
        for f in report.refused
    )


def test_plain_dtypes_and_arrays_still_decode() -> None:
    values = [np.arange(6).astype(dtype).reshape(2, 3) for dtype in ("f4", "f8", "i8", "u1", "?")]
    decoded = SafeUnpickler(io.BytesIO(pickle.dumps(values, protocol=4))).load()
    for original, copy in zip(values, decoded, strict=True):
        assert copy.dtype == original.dtype and np.array_equal(copy, original)


def test_stored_tensorboard_log_does_not_survive_safe_load(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parent.parent / "fixtures" / "dppo_quantile_vgs.zip"
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    data = json.loads(members["data"])
    data["tensorboard_log"] = str(tmp_path / "chosen_by_the_file")
    members["data"] = json.dumps(data, indent=4).encode()
    path = tmp_path / "steered.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    model = safe_load(path)
    assert model.tensorboard_log is None
    assert safe_load(path, tensorboard_log=str(tmp_path / "mine")).tensorboard_log == str(
        tmp_path / "mine"
    )


def test_crafted_dtype_is_flagged_statically() -> None:
    report = scan_pickle(_dtype_overflow_pickle(), member="data", entry="_last_obs")
    assert any("crafted numpy.dtype" in finding.global_name for finding in report.refused)
    plain = pickle.dumps([np.zeros((2, 3), dtype="f4"), np.ones(4, dtype=bool)], protocol=4)
    assert scan_pickle(plain, member="data", entry="_last_obs").ok
