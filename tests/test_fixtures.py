"""The fixture script is deterministic and the committed fixtures are what it writes."""

from __future__ import annotations

import importlib.metadata
import platform
import zipfile
from pathlib import Path

import pytest

from fixtures.make_fixtures import FIXTURES, FIXTURES_DIR, main

MAX_FIXTURE_BYTES = 200_000


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> tuple[Path, Path]:
    first = tmp_path_factory.mktemp("first")
    second = tmp_path_factory.mktemp("second")
    assert main(["--out", str(first)]) == 0
    assert main(["--out", str(second)]) == 0
    return first, second


def test_running_twice_gives_identical_bytes(regenerated):
    first, second = regenerated
    for name in FIXTURES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


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
    assert committed.read_bytes() == (regenerated[0] / name).read_bytes()
