"""Run folders never trap the user, and every unusable input is one line with exit code 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dppo_ckpt.training import _tensorboard_name
from tests._models import optimizer_state_bytes, parameters_bytes, scaler_state_bytes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SMALL = "n_steps = 64\nbatch_size = 64\nn_epochs = 1\nvgs_warmup_steps = 2\n"


def _environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def dppo_ckpt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *args],
        cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("folders")
    (folder / "small.toml").write_text(SMALL)
    return folder


@pytest.fixture(scope="module")
def run(workspace) -> Path:
    result = dppo_ckpt(
        "train", "--config", "small.toml", "--n-envs", "1", "--timesteps", "192",
        "--checkpoint-every", "64", "--out", "R", "--eval-episodes", "0",
        cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return workspace / "R"


def test_resuming_from_an_older_checkpoint_names_branch_and_touches_nothing(run, workspace):
    before = _digests(run)
    result = dppo_ckpt("train", "--resume", "R/checkpoint_000000064.zip", cwd=workspace)
    message = _one_line_error(result)
    assert "is not the newest checkpoint of R (checkpoint_000000192.zip)" in message
    assert "with --branch NAME" in message and str(Path("R/branches/NAME")) in message
    assert _digests(run) == before


def test_a_branch_continues_beside_the_run_and_overwrites_nothing(run, workspace):
    from dppo_ckpt import DistributionalPPO

    before = _digests(run)
    result = dppo_ckpt(
        "train", "--resume", "R/checkpoint_000000064.zip", "--branch", "retry",
        "--eval-episodes", "0",
        cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    branch = run / "branches" / "retry"
    assert f"into {branch.relative_to(workspace)}" in result.stdout
    assert sorted(p.name for p in branch.glob("checkpoint_*.zip")) == [
        "checkpoint_000000128.zip", "checkpoint_000000192.zip",
    ]  # fmt: skip
    assert _digests(run) == before
    manifest = json.loads((branch / "run.json").read_text())
    assert manifest["resumed_from"] == str(Path("R/checkpoint_000000064.zip"))
    # Resumed from the same point with the same snapshot: the branch repeats the run exactly.
    ours = DistributionalPPO.load(branch / "checkpoint_000000192.zip", device="cpu")
    theirs = DistributionalPPO.load(run / "checkpoint_000000192.zip", device="cpu")
    assert parameters_bytes(ours) == parameters_bytes(theirs)
    assert optimizer_state_bytes(ours) == optimizer_state_bytes(theirs)
    assert scaler_state_bytes(ours) == scaler_state_bytes(theirs)
    again = dppo_ckpt(
        "train", "--resume", "R/checkpoint_000000064.zip", "--branch", "retry", cwd=workspace
    )
    assert "already holds a run: continue it with --resume" in _one_line_error(again)


def test_a_folder_whose_run_wrote_no_checkpoint_is_reused(workspace):
    folder = workspace / "killed"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"format_version": 1, "checkpoints": []}))
    result = dppo_ckpt(
        "train", "--config", "small.toml", "--n-envs", "1", "--timesteps", "64",
        "--out", "killed", "--eval-episodes", "0",
        cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reusing killed: its run wrote no checkpoint" in result.stdout
    assert (folder / "checkpoint_000000064.zip").is_file()


def test_resumed_runs_get_their_own_tensorboard_directory(tmp_path):
    class Point:
        timesteps = 4096

    assert _tensorboard_name(str(tmp_path), None) == "dppo"
    assert _tensorboard_name(str(tmp_path), Point()) == "resumed-000004096"
    (tmp_path / "resumed-000004096_0").mkdir()
    assert _tensorboard_name(str(tmp_path), Point()) == "resumed-000004096-2"


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()  # root writes anyway: use a folder no one may write into
    if os.access("/sys", os.F_OK) and not _writable(Path("/sys")):
        return Path("/sys")
    pytest.skip("no read-only folder available")


def _writable(folder: Path) -> bool:
    try:
        (folder / ".dppo-probe").touch()
    except OSError:
        return False
    (folder / ".dppo-probe").unlink()
    return True


def test_a_read_only_out_folder_is_one_line(tmp_path):
    folder = _read_only_folder(tmp_path)
    result = dppo_ckpt(
        "train", "--timesteps", "64", "--n-envs", "1", "--out", str(folder), cwd=tmp_path
    )
    assert f"cannot write into {folder}: " in _one_line_error(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--config", "bad.toml"], "config bad.toml: n_steps = 'abc': must be an integer"),
        (["train", "--config", "flag.toml"], "flag.toml: use_sde = 1: must be true or false"),
        (["train", "--config", "norm.toml"], "config norm.toml: normalize.clip_obs must be a "
         "number, got 'x'"),
        (["train", "--resume", "R"], "cannot resume from R: is a folder, not a checkpoint: give "
         "one of its checkpoints, e.g. R/checkpoint_000000192.zip"),
        (["cycle", "R"], "cannot use R: is a folder, not a checkpoint"),
        (["cycle", "notzip.txt"], "error: cannot use notzip.txt: not a zip archive"),
        (["train", "--branch", "x"], "--branch needs --resume"),
        (["train", "--resume", "R/checkpoint_000000064.zip", "--branch", "../x"],
         "--branch '../x': use letters"),
    ],
    ids=["config-type", "config-bool", "config-normalize", "resume-folder", "cycle-folder",
         "cycle-not-a-zip", "branch-alone", "branch-name"],
)  # fmt: skip
def test_unusable_inputs_are_one_line(run, workspace, args, expected):
    (workspace / "bad.toml").write_text('n_steps = "abc"\n')
    (workspace / "flag.toml").write_text("use_sde = 1\n")
    (workspace / "norm.toml").write_text('[normalize]\nclip_obs = "x"\n')
    (workspace / "notzip.txt").write_text("just text\n")
    # A short --timesteps and a scratch --out: a test that failed to fail trains briefly.
    safety = ["--timesteps", "64"] if args[0] == "train" else []
    if args[0] == "train" and "--branch" not in args:  # --branch chooses its own folder
        safety += ["--out", "never"]
    result = dppo_ckpt(*args, *safety, cwd=workspace)
    assert expected in _one_line_error(result)
    assert "<memory>" not in result.stderr
