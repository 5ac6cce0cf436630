"""`verify --static` as the pre-commit hook runs it: no torch, no pydantic, Typer's verdicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dppo_ckpt.cli import _loads_in_children, _static_verify_paths
from tests._verdicts import EXPECTED, fixture

#: Modules whose import the static path must not pay for: the training stack, and the
#: validation library that Typer imports when it parses a non-boolean parameter.
_HEAVY = ("torch", "numpy", "stable_baselines3", "gymnasium", "pydantic", "pydantic_core")

_NAMES = ["dppo_quantile_vgs.zip", "dppo_legacy.zip", "hostile_nested_blob.zip",
          "broken_bitflip.zip"]  # fmt: skip


def _run(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "dppo_ckpt.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=600,
    )  # fmt: skip


def _imported(stderr: str) -> set[str]:
    """Top-level package names in ``-X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def test_static_verify_imports_neither_torch_nor_pydantic(tmp_path: Path) -> None:
    paths = [str(fixture(name)) for name in _NAMES]
    run = _run("verify", "--static", *paths, cwd=tmp_path, importtime=True)
    imported = _imported(run.stderr)
    assert "dppo_ckpt" in imported and "typer" in imported, run.stderr[-2000:]
    assert imported.isdisjoint(_HEAVY), sorted(imported & set(_HEAVY))
    assert run.returncode == max(EXPECTED[name][0] for name in _NAMES)
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("name", _NAMES)
def test_fast_path_prints_what_typer_prints(tmp_path: Path, name: str) -> None:
    # `--format table` is the default spelled out, which leaves the parsing to Typer.
    fast = _run("verify", "--static", str(fixture(name)), cwd=tmp_path)
    typer = _run("verify", "--static", "--format", "table", str(fixture(name)), cwd=tmp_path)
    assert fast.returncode == typer.returncode == EXPECTED[name][0]
    assert fast.stdout == typer.stdout and fast.stderr == typer.stderr
    assert "Traceback" not in fast.stderr


def test_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run = _run("verify", "--static", "no-such.zip", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("argv", "paths"),
    [
        (["verify", "--static", "a.zip", "b.zip"], ["a.zip", "b.zip"]),
        (["verify", "a.zip", "--static"], ["a.zip"]),
        (["verify", "--static"], None),
        (["verify", "a.zip"], None),
        (["verify", "--static", "--help"], None),
        (["verify", "--static", "-f", "json", "a.zip"], None),
        (["verify", "--static", "--", "a.zip"], None),
        (["inspect", "--static", "a.zip"], None),
        ([], None),
    ],
)
def test_only_the_hooks_command_line_skips_typer(
    argv: list[str], paths: list[str] | None
) -> None:
    assert _static_verify_paths(argv) == paths


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["verify", "a.zip"], True),
        (["verify", "--quick", "-j", "2", "a.zip", "b.zip"], True),
        (["verify", "--static", "a.zip"], False),
        (["verify", "--no-isolate", "a.zip"], False),
        (["verify", "--ray", "a.zip"], False),
        (["verify", "--help"], False),
        (["inspect", "a.zip"], False),
        (["migrate", "a.zip", "b.zip"], False),
        ([], False),
    ],
)
def test_only_a_verify_that_loads_in_children_starts_the_fork_server_early(
    argv: list[str], expected: bool
) -> None:
    assert _loads_in_children(argv) is expected
