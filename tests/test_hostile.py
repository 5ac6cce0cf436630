"""Hostile checkpoints from :mod:`tests._hostile`: every one gets its documented verdict.

Each file is checked by the real command line, in one run per mode, and every run must end
with the documented exit code, no traceback, no signal death and no marker file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._hostile import CASES, MARKER, build_all


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, build_all(folder / "files")


def _verdicts(run: subprocess.CompletedProcess[str]) -> dict[str, tuple[int, str]]:
    assert run.returncode >= 0, f"killed by signal {-run.returncode}"
    assert "Traceback" not in run.stdout + run.stderr
    report = json.loads(run.stdout)
    return {
        Path(item["path"]).stem: (
            item["exit_code"],
            " ".join(str(r.get("message", "")) for r in item["results"]),
        )
        for item in report["files"]
    }


def test_static_refuses_as_unsafe_exactly_the_cases_the_full_verify_refuses() -> None:
    # The runs below check the verdicts; this keeps the declared ones consistent with the
    # promise that --static exits 3 exactly where the full verify does.
    assert {n for n, c in CASES.items() if c.full == 3} == {
        n for n, c in CASES.items() if c.static == 3
    }


@pytest.mark.parametrize("mode", ["full", "static"])
def test_every_hostile_file_gets_its_verdict(hostile, mode: str) -> None:
    folder, files = hostile
    flags = ["--static"] if mode == "static" else []
    run = _run("verify", *flags, "-f", "json", *map(str, files.values()), cwd=folder)
    verdicts = _verdicts(run)
    assert not (folder / MARKER).exists()
    wrong = {}
    for name, case in CASES.items():
        expected = case.full if mode == "full" else case.static
        code, text = verdicts[name]
        if code != expected or (expected and case.reason not in text):
            wrong[name] = (expected, code, text[-300:])
    assert not wrong, wrong


@pytest.mark.parametrize("command", ["verify", "inspect", "migrate"])
def test_a_fifo_is_refused_without_hanging(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "model.zip"
    os.mkfifo(fifo)
    args = {
        "verify": ["verify", "--static", str(fifo)],
        "inspect": ["inspect", str(fifo)],
        "migrate": ["migrate", "--dry-run", str(fifo), str(tmp_path / "new.zip")],
    }[command]
    run = _run(*args, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "not a regular file" in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
