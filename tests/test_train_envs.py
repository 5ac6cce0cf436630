"""`train` and `cycle` on real environment stacks, end to end through the command line.

A custom environment named as ``module:EnvId`` (``tests/ux_envs.py``), VecNormalize in
``SubprocVecEnv`` workers, frame stacking on images: each is trained, resumed bit for bit
against the uninterrupted run, and cycled from its checkpoint with the same stack rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from dppo_ckpt import DistributionalPPO
from tests._models import optimizer_state_bytes, parameters_bytes, scaler_state_bytes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VECTOR = "tests.ux_envs:UxVector-v0"
IMAGE = "tests.ux_envs:UxImage-v0"

VECTOR_CONFIG = """\
n_steps = 64
batch_size = 64
n_epochs = 2
vgs_warmup_steps = 2

[normalize]
clip_obs = 5.0

[env_kwargs]
scale = 2.0
"""

IMAGE_CONFIG = """\
n_steps = 32
batch_size = 32
n_epochs = 1
vgs_warmup_steps = 1

[policy_kwargs]
features_extractor_kwargs = { features_dim = 32 }
"""


def _environment() -> dict[str, str]:
    # The children (and their SubprocVecEnv workers) import this checkout and tests.ux_envs.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "COLUMNS": "200",
    }


def dppo_ckpt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *args],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def _assert_same_model(a: Path, b: Path) -> None:
    first, second = DistributionalPPO.load(a, device="cpu"), DistributionalPPO.load(b, device="cpu")
    assert first.num_timesteps == second.num_timesteps
    assert parameters_bytes(first) == parameters_bytes(second)
    assert optimizer_state_bytes(first) == optimizer_state_bytes(second)
    assert scaler_state_bytes(first) == scaler_state_bytes(second)


def _recorded_env(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("dppo_ckpt.json"))["env"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("envs")
    (folder / "vector.toml").write_text(VECTOR_CONFIG)
    (folder / "image.toml").write_text(IMAGE_CONFIG)
    return folder


@pytest.fixture(scope="module")
def vector_run(workspace) -> Path:
    """VecNormalize in two SubprocVecEnv workers on a module:EnvId environment."""
    result = dppo_ckpt(
        "train", "--env", VECTOR, "--vec-env", "subproc", "--n-envs", "2", "--normalize",
        "--config", "vector.toml", "--timesteps", "384", "--checkpoint-every", "128",
        "--out", "vector", "--eval-episodes", "1",
        cwd=workspace,
    )  # fmt: skip
    _ok(result)
    assert (
        'environment: tests.ux_envs:UxVector-v0 x2 (subproc), env_kwargs {"scale": 2.0}, '
        "VecNormalize(clip_obs=5.0)"
    ) in result.stdout
    return workspace / "vector"


@pytest.fixture(scope="module")
def image_run(workspace) -> Path:
    """Four stacked image frames (CnnPolicy) in one process."""
    result = dppo_ckpt(
        "train", "--env", IMAGE, "--frame-stack", "4", "--config", "image.toml",
        "--timesteps", "96", "--checkpoint-every", "32", "--n-envs", "1",
        "--out", "image", "--eval-episodes", "0",
        cwd=workspace,
    )  # fmt: skip
    _ok(result)
    return workspace / "image"


def test_the_spec_and_statistics_are_recorded(vector_run):
    checkpoint = vector_run / "checkpoint_000000128.zip"
    assert _recorded_env(checkpoint) == {
        "atari": False, "env_id": VECTOR, "env_kwargs": {"scale": 2.0}, "frame_stack": 0,
        "n_envs": 2, "normalize": {"clip_obs": 5.0}, "vec_env": "subproc",
    }  # fmt: skip
    manifest = json.loads((vector_run / "run.json").read_text())
    assert manifest["env"] == _recorded_env(checkpoint)
    entry = manifest["checkpoints"][0]
    statistics = vector_run / entry["normalization"]["file"]
    assert statistics.name == "checkpoint_000000128.vecnorm.npz"
    import hashlib

    assert hashlib.sha256(statistics.read_bytes()).hexdigest() == entry["normalization"]["sha256"]
    with zipfile.ZipFile(statistics) as npz:  # an .npz: arrays only, no pickle inside
        assert sorted(npz.namelist())[0] == "obs_rms/count.npy"


def test_normalize_in_subproc_resumes_bit_for_bit(vector_run, workspace):
    result = _ok(
        dppo_ckpt(
            "train",
            "--resume",
            "vector/checkpoint_000000128.zip",
            "--out",
            "vector-resumed",
            "--eval-episodes",
            "0",
            cwd=workspace,
        )  # fmt: skip
    )
    assert "at step 128 of 384" in result.stdout
    assert "environments restored from checkpoint_000000128.envs.pkl" in result.stdout
    assert "VecNormalize statistics from checkpoint_000000128.vecnorm.npz" in result.stdout
    assert "(from run.json (signed with your key))" in result.stdout
    resumed, uninterrupted = workspace / "vector-resumed", vector_run
    for name in ("checkpoint_000000256", "checkpoint_000000384"):
        _assert_same_model(resumed / f"{name}.zip", uninterrupted / f"{name}.zip")
        npz = f"{name}.vecnorm.npz"
        assert (resumed / npz).read_bytes() == (uninterrupted / npz).read_bytes()


def test_frame_stack_resumes_bit_for_bit(image_run, workspace):
    assert _recorded_env(image_run / "checkpoint_000000032.zip")["frame_stack"] == 4
    result = _ok(
        dppo_ckpt(
            "train",
            "--resume",
            "image/checkpoint_000000032.zip",
            "--out",
            "image-resumed",
            "--eval-episodes",
            "0",
            cwd=workspace,
        )  # fmt: skip
    )
    assert "environments restored from checkpoint_000000032.envs.pkl" in result.stdout
    assert "4 stacked frames" in result.stdout
    _assert_same_model(
        workspace / "image-resumed" / "checkpoint_000000096.zip",
        image_run / "checkpoint_000000096.zip",
    )


@pytest.mark.parametrize("run", ["vector_run", "image_run"])
def test_cycle_rebuilds_the_recorded_stack(run, request, workspace):
    folder = request.getfixturevalue(run)
    checkpoint = sorted(folder.glob("checkpoint_*.zip"))[0]
    # No --env: run.json beside the checkpoint is signed with this user's key, so the
    # recorded module:EnvId is theirs to import.
    result = _ok(
        dppo_ckpt("cycle", str(checkpoint), "--cycles", "2", "--steps", "32", cwd=workspace)
    )
    assert "12 passed, 0 failed" in result.stdout
    if run == "vector_run":
        assert "VecNormalize(clip_obs=5.0) (recorded in" in result.stderr
        assert "VecNormalize statistics from checkpoint_000000128.vecnorm.npz" in result.stderr
    else:
        assert "4 stacked frames (recorded in" in result.stderr


def test_a_copied_checkpoint_names_the_env_to_pass(vector_run, workspace):
    lone = workspace / "copied"
    lone.mkdir()
    shutil.copy(vector_run / "checkpoint_000000128.zip", lone / "start.zip")
    refused = dppo_ckpt("train", "--resume", "copied/start.zip", cwd=workspace)
    assert f"pass --env {VECTOR} to import it" in _one_line_error(refused)
    refused = dppo_ckpt("cycle", "copied/start.zip", cwd=workspace)
    assert f"pass --env {VECTOR} to import it" in refused.stderr and refused.returncode == 2
    assert not list(lone.glob("checkpoint_*"))
    # With --env: the recorded stack (normalised, in workers) and the recorded target.
    result = _ok(
        dppo_ckpt(
            "train",
            "--resume",
            "copied/start.zip",
            "--env",
            VECTOR,
            "--eval-episodes",
            "0",
            cwd=workspace,
        )  # fmt: skip
    )
    assert "at step 128 of 384" in result.stdout
    assert "environments restart fresh (no run.json beside the checkpoint)" in result.stdout
    assert "VecNormalize statistics start fresh (start.vecnorm.npz is missing)" in result.stdout
    assert _recorded_env(lone / "checkpoint_000000384.zip")["vec_env"] == "subproc"


def test_a_checkpoint_recording_no_env_is_not_trained_on_a_default(tmp_path):
    shutil.copy(ROOT / "fixtures" / "dppo_quantile_vgs.zip", tmp_path / "old.zip")
    result = dppo_ckpt("train", "--resume", "old.zip", cwd=tmp_path)
    assert "records none" in _one_line_error(result) and "pass --env ID" in result.stderr


def test_environments_that_cannot_be_pickled_restart_fresh_and_say_why(workspace):
    result = _ok(
        dppo_ckpt(
            "train",
            "--env",
            "tests.ux_envs:UxUnpicklable-v0",
            "--vec-env",
            "subproc",
            "--n-envs",
            "2",
            "--normalize",
            "--config",
            "vector.toml",
            "--timesteps",
            "128",
            "--checkpoint-every",
            "128",
            "--out",
            "unpicklable",
            "--eval-episodes",
            "0",
            cwd=workspace,
        )  # fmt: skip
    )
    assert "note: the environments cannot be pickled (TypeError: cannot pickle" in result.stdout
    assert "--resume will say: environments restart fresh" in result.stdout
    result = _ok(
        dppo_ckpt(
            "train",
            "--resume",
            "unpicklable/checkpoint_000000128.zip",
            "--out",
            "unp-resumed",
            # Nothing to train: what the resume says of the folder comes before training.
            "--timesteps",
            "128",
            "--eval-episodes",
            "0",
            cwd=workspace,
        )  # fmt: skip
    )
    assert (
        "environments restart fresh (no environment snapshot was written with this checkpoint)"
    ) in result.stdout
    # The statistics are numbers, not a pickle: they come back even so.
    assert "VecNormalize statistics from checkpoint_000000128.vecnorm.npz" in result.stdout


def test_ctrl_c_to_the_process_group_stops_a_subproc_run_cleanly(workspace):
    # A terminal's Ctrl-C signals every process of the foreground group, workers included.
    folder = workspace / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "dppo_ckpt.cli", "train", "--env", VECTOR, "--vec-env",
         "subproc", "--n-envs", "2", "--normalize", "--config", "vector.toml",
         "--timesteps", "1000000", "--checkpoint-every", "128", "--out", "interrupted"],
        cwd=workspace, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(folder.glob("checkpoint_*.zip")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "stopped by Ctrl-C" in stdout
    last = sorted(folder.glob("checkpoint_*.zip"))[-1]
    assert last.with_name(last.name.replace(".zip", ".envs.pkl")).is_file()


_NO_ALE = importlib.util.find_spec("ale_py") is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["train", "--env", "CartPole-v1", "--atari"],
            "--atari needs ale-py",
            marks=pytest.mark.skipif(not _NO_ALE, reason="ale-py is installed"),
        ),
        pytest.param(
            ["train", "--env", "ALE/Pong-v5"],
            "--env ALE/Pong-v5 needs ale-py",
            marks=pytest.mark.skipif(not _NO_ALE, reason="ale-py is installed"),
        ),
        (
            ["train", "--env", "Blackjack-v1"],
            "error: Blackjack-v1 is not supported: its observation space is Tuple",
        ),
        (["train", "--env", "no_such_module_here:Env-v0"], "cannot import module"),
        (["train", "--env-kwargs", "[1, 2]"], "--env-kwargs must be a JSON object"),
        (["train", "--vec-env", "threads"], "--vec-env must be 'dummy' or 'subproc'"),
        (["cycle", "--env", "Blackjack-v1"], "Blackjack-v1 is not supported"),
    ],
    ids=[
        "atari",
        "ale-id",
        "tuple-space",
        "bad-module",
        "env-kwargs",
        "vec-env",
        "cycle-tuple-space",
    ],  # fmt: skip
)
def test_unusable_environments_exit_2_with_one_line(tmp_path, args, expected):
    result = (
        dppo_ckpt(*args, "--out", "never", cwd=tmp_path)
        if args[0] == "train"
        else (dppo_ckpt(*args, cwd=tmp_path))
    )
    assert expected in _one_line_error(result)
    assert not (tmp_path / "never").exists()
