"""The pre-commit hook, run as pre-commit runs it, gives verify --static's verdicts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.make_fixtures import FIXTURES_DIR

ROOT = Path(__file__).resolve().parents[1]
PRE_COMMIT = shutil.which("pre-commit", path=str(Path(sys.executable).parent))


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(PRE_COMMIT is None, reason="pre-commit is part of the test extra")
@pytest.mark.parametrize(
    ("fixture", "passes"),
    [
        ("dppo_quantile_vgs.zip", True),
        ("dppo_legacy.zip", False),
        ("hostile_data_entry.zip", False),
    ],
)
def test_the_hook_agrees_with_verify_static(tmp_path: Path, fixture: str, passes: bool) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("the hook is tried from a git checkout of this repository")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    shutil.copy(FIXTURES_DIR / fixture, repo / fixture)
    _git("add", fixture, cwd=repo)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
    }
    run = subprocess.run(
        [PRE_COMMIT, "try-repo", str(ROOT), "dppo-ckpt-verify", "--files", fixture],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    static = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "verify", "--static", fixture],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert (run.returncode == 0) is passes is (static.returncode == 0), run.stdout + run.stderr
    assert ("Passed" in run.stdout) is passes
