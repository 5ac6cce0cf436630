"""Portable numerics, the fingerprint in every checkpoint, and what a resume says about it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dppo_ckpt import DistributionalPPO, numerics
from dppo_ckpt.checkpoint.archive import ArchiveError, open_checkpoint
from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.checkpoint.contents import inspect_checkpoint
from dppo_ckpt.checkpoint.metadata import METADATA_MEMBER, encode_metadata
from fixtures.make_fixtures import FIXTURES_DIR, rewrite_zip
from tests._models import make_model, optimizer_state_bytes, parameters_bytes, scaler_state_bytes

QUANTILE = FIXTURES_DIR / "dppo_quantile_vgs.zip"
PLAIN_SB3 = FIXTURES_DIR / "sb3_ppo.zip"

# -- the fingerprint ---------------------------------------------------------------------------


def test_every_saved_checkpoint_records_the_numerics_it_was_made_with(tmp_path):
    model = make_model()
    model.save(tmp_path / "model")  # SB3's path rules: ".zip" is added
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        document = json.loads(archive.read(METADATA_MEMBER))
    recorded = document["numerics"]
    assert document["format"] == 1
    assert recorded == numerics.fingerprint()
    # The suite runs portable (conftest): these are the settings the mode guarantees.
    assert recorded["numerics"] == "portable"
    assert (recorded["cpu_capability"], recorded["mkl_cbwr"]) == ("DEFAULT", "COMPATIBLE")
    assert (recorded["threads"], recorded["mkldnn"], recorded["numpy_simd"]) == (1, False, "none")
    for key in ("torch", "numpy", "python", "stable_baselines3", "gymnasium", "dppo_ckpt"):
        assert recorded[key], key
    assert recorded["vgs_state_version"] == model._variance_gradient_scaler.STATE_FORMAT_VERSION


def test_the_fingerprint_is_plain_json_that_loading_ignores(tmp_path):
    model = make_model()
    buffer = io.BytesIO()
    model.save(buffer)
    loaded = DistributionalPPO.load(io.BytesIO(buffer.getvalue()), device="cpu")
    assert parameters_bytes(loaded) == parameters_bytes(model)


def test_a_checkpoint_without_the_member_still_loads_and_verifies():
    with zipfile.ZipFile(PLAIN_SB3) as archive:
        assert METADATA_MEMBER not in archive.namelist()
    with open_checkpoint(PLAIN_SB3) as archive:
        assert archive.metadata is None
    report = run_checks(PLAIN_SB3, quick=True)
    dppo003 = next(r for r in report.results if r.check_id == "DPPO003")
    assert dppo003.verdict.value == "pass" and "no numerics recorded" in dppo003.message


def test_inspect_and_dppo003_show_the_fingerprint():
    info = inspect_checkpoint(QUANTILE)
    assert info["numerics"]["numerics"] == "portable"
    assert info["numerics"]["cpu"] == "fixture"  # the fixture script pins the machine
    report = run_checks(QUANTILE, static=True)
    dppo003 = next(r for r in report.results if r.check_id == "DPPO003")
    assert "portable numerics recorded" in dppo003.message
    assert dppo003.details["numerics"] == info["numerics"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[1, 2]", "must be a JSON object"),
        (b'{"format": 1, "numerics": {"a": 1, "a": 2}}', "appears twice"),
        (b'{"format": 1, "numerics": {"a": [1]}}', "must be a plain value"),
        (b'{"format": 9, "numerics": {}}', "newer than this dppo-ckpt reads"),
        (b'{"format": true, "numerics": {}}', "positive integer"),
        (b'{"format": 1, "numerics": {"a": "' + b"x" * 600 + b'"}}', "longer than"),
        (b'{"format": 1, "numerics": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bytes, more"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"format": 1, "numerics": {', "not valid JSON"),
    ],
    ids=[
        "array",
        "duplicate",
        "nested",
        "newer",
        "bool-format",
        "long-text",
        "oversized",
        "deep",
        "utf8",
        "truncated",
    ],
)
def test_a_malformed_member_makes_the_file_unusable_with_its_reason(tmp_path, payload, reason):
    bad = tmp_path / "bad.zip"
    rewrite_zip(QUANTILE, bad, replace={METADATA_MEMBER: payload})
    with open_checkpoint(bad) as archive, pytest.raises(ArchiveError, match=reason):
        archive.metadata  # noqa: B018
    for static in (True, False):
        report = run_checks(bad, static=static)
        assert report.exit_code == 2
        assert METADATA_MEMBER in report.results[0].message


# -- comparing fingerprints --------------------------------------------------------------------


def _fingerprint(**changes: object) -> dict[str, object]:
    return {**numerics.fingerprint(), **changes}


def test_equal_numerics_resume_bit_for_bit():
    assert numerics.resume_differences(_fingerprint(), _fingerprint()) == []
    assert numerics.resume_note(numerics.fingerprint()) is None


def test_portable_on_both_sides_ignores_the_cpu_only():
    recorded = _fingerprint(cpu="GenuineIntel avx512f", machine="x86_64")
    assert numerics.resume_differences(recorded, _fingerprint(cpu="AuthenticAMD avx2")) == []
    native = {**recorded, "numerics": "native"}
    differences = numerics.resume_differences(native, _fingerprint(cpu="AuthenticAMD avx2"))
    assert differences == [
        "numerics native -> portable",
        "cpu GenuineIntel avx512f -> AuthenticAMD avx2",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("torch", "2.0.0"),
        ("numpy", "1.26.0"),
        ("threads", 4),
        ("cpu_capability", "AVX512"),
        ("mkl_cbwr", "AUTO"),
        ("numpy_simd", "X86_V3"),
        ("deterministic_algorithms", True),
        ("vgs_state_version", 0),
    ],
)
def test_each_recorded_difference_is_named(key, value):
    note = numerics.resume_note(_fingerprint(**{key: value}))
    assert note is not None and note.startswith("not bit for bit")
    assert f"{key} {value} -> " in note


def test_a_checkpoint_without_numerics_says_so():
    note = numerics.resume_note(None)
    assert note is not None and "records no numerics" in note


def test_the_mode_cannot_change_once_torch_is_loaded():
    with pytest.raises(numerics.NumericsError, match="before torch and numpy are imported"):
        numerics.apply_numerics(numerics.NATIVE)
    numerics.apply_numerics(numerics.PORTABLE)  # the mode this process is in: a no-op
    with pytest.raises(ValueError, match="unknown numerics mode"):
        numerics.apply_numerics("fast")


def test_a_late_portable_request_from_the_environment_warns_instead_of_failing():
    code = (
        "import warnings, numpy, os\n"
        "os.environ['DPPO_CKPT_NUMERICS'] = 'portable'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import dppo_ckpt\n"
        "print([str(w.message) for w in caught])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=_machine({}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "must be chosen before numpy is imported" in result.stdout


# -- exact resume across machines --------------------------------------------------------------

# What varies from one machine to the next, and what portable mode must make irrelevant.
MACHINE_A = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
MACHINE_B = {
    "ATEN_CPU_CAPABILITY": "default",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3",
    "OMP_NUM_THREADS": "1",
}
_MACHINE_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "NPY_DISABLE_CPU_FEATURES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    numerics.NUMERICS_ENV,
)
SMALL_CONFIG = "n_steps = 128\nbatch_size = 64\nn_epochs = 2\nvgs_warmup_steps = 4\n"


def _machine(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MACHINE_VARIABLES}
    return {**env, "COLUMNS": "200", **settings}


def _train(machine: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A resumed run takes its settings from the checkpoint and its run folder.
    fresh = [] if "--resume" in args else ["--config", "small.toml", "--n-envs", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "train", *fresh,
         "--eval-episodes", "0", "--checkpoint-every", "256", *args],
        cwd=cwd,
        env=_machine(machine),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _state(path: Path) -> tuple[object, ...]:
    model = DistributionalPPO.load(path, device="cpu")
    return (
        model.num_timesteps,
        parameters_bytes(model),
        optimizer_state_bytes(model),
        scaler_state_bytes(model),
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("numerics")
    (folder / "small.toml").write_text(SMALL_CONFIG)
    return folder


@pytest.mark.slow
def test_portable_resume_on_another_machine_is_bit_for_bit(workspace):
    _train({}, workspace, "--timesteps", "512", "--out", "reference", "--portable")
    _train(MACHINE_A, workspace, "--timesteps", "256", "--out", "halves", "--portable")
    resumed = _train(
        MACHINE_B,
        workspace,
        "--resume", "halves/checkpoint_000000256.zip",
        "--timesteps", "512",
        "--portable",
    )  # fmt: skip
    assert "environments restored" in resumed.stdout
    assert "not bit for bit" not in resumed.stdout + resumed.stderr
    reference = _state(workspace / "reference" / "checkpoint_000000512.zip")
    assert _state(workspace / "halves" / "checkpoint_000000512.zip") == reference


@pytest.mark.slow
def test_native_resume_on_another_machine_says_it_is_not_bit_for_bit(workspace):
    _train(MACHINE_A, workspace, "--timesteps", "256", "--out", "native", "--no-portable")
    resumed = _train(
        MACHINE_B,
        workspace,
        "--resume", "native/checkpoint_000000256.zip",
        "--timesteps", "512",
        "--no-portable",
    )  # fmt: skip
    notes = [line for line in resumed.stdout.splitlines() if "not bit for bit" in line]
    assert len(notes) == 1, resumed.stdout
    assert "cpu_capability AVX2 -> DEFAULT" in notes[0]
    assert "mkl_cbwr AVX2 -> AUTO" in notes[0]
    assert "threads 2 -> 1" in notes[0]


@pytest.mark.slow
def test_cycle_names_the_numerics_a_checkpoint_was_made_with(workspace):
    cycle = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "cycle", str(QUANTILE),
         "--cycles", "1", "--steps", "64", "--no-portable"],
        cwd=workspace,
        env=_machine(MACHINE_A),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert cycle.returncode == 0, cycle.stdout + cycle.stderr
    notes = [line for line in cycle.stderr.splitlines() if "not bit for bit" in line]
    assert len(notes) == 1, cycle.stderr
    assert notes[0].startswith("note: not bit for bit: ")
    assert "numerics portable -> native" in notes[0] and "cpu fixture -> " in notes[0]


def test_encoded_metadata_is_stable():
    fingerprint = numerics.fingerprint()
    assert encode_metadata(fingerprint) == encode_metadata(dict(reversed(fingerprint.items())))
