"""The fixture script writes the committed fixtures, byte for byte, on any x86-64 CPU.

It runs in subprocesses, as a user would run it: its portable numerics must be chosen before
torch loads. The two runs differ in every dispatch setting a machine can differ in (MKL's
code path, ATen's CPU capability, numpy's SIMD targets, the thread count), so equal bytes
show that the fixtures do not depend on them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fixtures.make_fixtures import FIXTURES, FIXTURES_DIR, rewrite_zip
from tests._bytes import assert_same_bytes, describe_difference

MAX_FIXTURE_BYTES = 200_000
SCRIPT = FIXTURES_DIR / "make_fixtures.py"

#: Two machines that differ in everything portable numerics must make irrelevant.
DISPATCH_SETTINGS: dict[str, dict[str, str]] = {
    "avx2-2threads": {
        "MKL_CBWR": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    },
    "avx512-1thread": {
        "MKL_CBWR": "AVX512",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4",
        "OMP_NUM_THREADS": "1",
    },
}
_CLEARED = (
    "MKL_CBWR",
    "ATEN_CPU_CAPABILITY",
    "NPY_DISABLE_CPU_FEATURES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "DPPO_CKPT_NUMERICS",
)


def _environment(setting: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _CLEARED}
    return {**env, **setting}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for name, setting in DISPATCH_SETTINGS.items():
        folder = tmp_path_factory.mktemp(name)
        subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(folder)],
            env=_environment(setting),
            cwd=FIXTURES_DIR.parent,
            check=True,
            capture_output=True,
            timeout=600,
        )
        folders[name] = folder
    return folders


def test_two_dispatch_settings_give_identical_bytes(regenerated):
    first, second = (regenerated[name] for name in DISPATCH_SETTINGS)
    for name in FIXTURES:
        assert_same_bytes((first / name).read_bytes(), (second / name).read_bytes(), name)


def _recorded_versions() -> str:
    # Every fixture is written in one run; the plain quantile one is a readable zip even where
    # others are deliberately broken, so its system info stands for all of them.
    with zipfile.ZipFile(FIXTURES_DIR / "dppo_quantile_vgs.zip") as archive:
        return archive.read("system_info.txt").decode()


def _current_versions() -> dict[str, str]:
    return {
        "Python": platform.python_version(),
        "Stable-Baselines3": importlib.metadata.version("stable-baselines3"),
        "PyTorch": importlib.metadata.version("torch"),
        "Numpy": importlib.metadata.version("numpy"),
        "Cloudpickle": importlib.metadata.version("cloudpickle"),
        "Gymnasium": importlib.metadata.version("gymnasium"),
    }


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_committed_fixture_is_regenerated_byte_for_byte(regenerated, name):
    committed = FIXTURES_DIR / name
    assert committed.exists(), f"{name} missing: run python fixtures/make_fixtures.py"
    assert committed.stat().st_size < MAX_FIXTURE_BYTES
    recorded = _recorded_versions()
    stale = [
        f"{lib} {v}" for lib, v in _current_versions().items() if f"{lib}: {v}" not in recorded
    ]
    if stale:
        pytest.skip(f"fixtures were written with other library versions than {', '.join(stale)}")
    for setting, folder in regenerated.items():
        assert_same_bytes(
            committed.read_bytes(),
            (folder / name).read_bytes(),
            f"{name} regenerated under {setting} differs from the committed file "
            "(rerun python fixtures/make_fixtures.py if the change is intended)",
        )


def test_the_comparison_names_member_and_offset(tmp_path):
    source = FIXTURES_DIR / "dppo_quantile_vgs.zip"
    with zipfile.ZipFile(source) as archive:
        policy = bytearray(archive.read("policy.pth"))
    policy[1000] ^= 0xFF
    changed = tmp_path / "changed.zip"
    rewrite_zip(source, changed, replace={"policy.pth": bytes(policy)})
    message = describe_difference(source.read_bytes(), changed.read_bytes())
    assert message is not None
    assert message.startswith("member 'policy.pth' offset 1000 "), message
    assert "file offset " in message
    assert describe_difference(source.read_bytes(), source.read_bytes()) is None
