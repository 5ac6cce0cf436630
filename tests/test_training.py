"""`dppo-ckpt train` end to end, through the real command line.

Runs whose outcome depends on the process (bit-for-bit resumes against a subprocess run,
signals, exit codes of the interpreter) go through a subprocess; checks of what `train` decides
about a resume folder call the same command line in this process, which spares each one the
seconds a fresh interpreter spends importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dppo_ckpt import DistributionalPPO
from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.cli import app
from fixtures.make_fixtures import FIXTURES_DIR, marker_payload
from tests._models import optimizer_state_bytes, parameters_bytes, scaler_state_bytes

pytestmark = pytest.mark.slow

# Small rollouts so that a run of a few hundred steps writes several checkpoints.
SMALL_CONFIG = """\
n_steps = 128
batch_size = 64
n_epochs = 2
learning_rate = 1e-3
vgs_warmup_steps = 4
"""


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per run: the machine is shared, and both sides of a comparison match.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dppo_ckpt.cli", *args]


def dppo_ckpt(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args),
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class _InProcess:
    """What a command line run left: its exit code and its two streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def in_process(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> _InProcess:
    """``dppo-ckpt ARGS`` in ``cwd``, called in this process through the Typer app."""
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, list(args))
    # An exception other than the command's own exit would have been a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exc_info
    )
    return _InProcess(result.exit_code, result.stdout, result.stderr)


def _load(path: Path) -> DistributionalPPO:
    return DistributionalPPO.load(path, device="cpu")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    (folder / "small.toml").write_text(SMALL_CONFIG)
    return folder


@pytest.fixture(scope="module")
def run_a(workspace) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """An uninterrupted run of 512 steps with a checkpoint every 256."""
    result = dppo_ckpt(
        "train",
        "--timesteps", "512",
        "--checkpoint-every", "256",
        "--config", "small.toml",
        "--n-envs", "1",
        "--out", "A",
        "--eval-episodes", "1",
        cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return workspace / "A", result


def test_train_writes_checkpoints_that_pass_verify(run_a):
    run_dir, result = run_a
    first, last = run_dir / "checkpoint_000000256.zip", run_dir / "checkpoint_000000512.zip"
    assert first.is_file() and last.is_file()
    assert (run_dir / "checkpoint_000000256.envs.pkl").is_file()
    assert not list(run_dir.glob(".*")), "temporary files left behind"
    for path in (first, last):
        report = run_checks(path)
        assert report.exit_code == 0, [(r.check_id, r.message) for r in report.results]
    assert f"last checkpoint: {Path('A') / last.name}" in result.stdout
    for row in ("steps", "wall time", "fps", "final evaluation return", "VGS scale"):
        assert row in result.stdout
    assert "VGS level of the noise ratio" in result.stdout
    assert re.search(r"VGS factor after warm-up\s*│\s*mean \d\.\d{3}; at min_scale", result.stdout)
    assert re.search(r"checkpoints written\s*│\s*2\s", result.stdout), result.stdout
    manifest = json.loads((run_dir / "run.json").read_text())
    assert [c["timesteps"] for c in manifest["checkpoints"]] == [256, 512]
    assert _load(last).num_timesteps == 512


def test_resume_continues_and_equals_the_uninterrupted_run(run_a, workspace):
    run_dir, _ = run_a
    result = dppo_ckpt(
        "train", "--resume", str(run_dir / "checkpoint_000000256.zip"), "--out", "B",
        "--eval-episodes", "0",
        cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "at step 256 of 512" in result.stdout
    assert "environments restored from checkpoint_000000256.envs.pkl" in result.stdout
    resumed = _load(workspace / "B" / "checkpoint_000000512.zip")
    uninterrupted = _load(run_dir / "checkpoint_000000512.zip")
    assert resumed.num_timesteps == uninterrupted.num_timesteps == 512
    assert parameters_bytes(resumed) == parameters_bytes(uninterrupted)
    assert optimizer_state_bytes(resumed) == optimizer_state_bytes(uninterrupted)
    assert scaler_state_bytes(resumed) == scaler_state_bytes(uninterrupted)


def test_resume_without_snapshot_restarts_environments_fresh(run_a, workspace, monkeypatch):
    run_dir, _ = run_a
    lone = workspace / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "checkpoint_000000256.zip", lone / "start.zip")
    result = in_process(
        "train", "--resume", "lone/start.zip", "--timesteps", "384", "--eval-episodes", "0",
        cwd=workspace, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "environments restart fresh" in result.stdout
    assert _load(lone / "checkpoint_000000384.zip").num_timesteps == 384


def test_a_changed_snapshot_is_not_loaded(run_a, workspace, monkeypatch):
    run_dir, _ = run_a
    copy = workspace / "tampered"
    shutil.copytree(run_dir, copy)
    snapshot = copy / "checkpoint_000000256.envs.pkl"
    snapshot.write_bytes(snapshot.read_bytes() + b"\0")
    result = in_process(
        "train", "--resume", "tampered/checkpoint_000000256.zip", "--timesteps", "256",
        "--eval-episodes", "0",
        cwd=workspace, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "environments restart fresh" in result.stdout
    assert "changed since written" in result.stdout
    assert "nothing to train" in result.stdout


def test_sigint_writes_a_final_checkpoint_that_verifies(workspace):
    run_dir = workspace / "interrupted"
    process = subprocess.Popen(
        _command(
            "train",
            "--timesteps",
            "1000000",
            "--checkpoint-every",
            "128",
            "--config",
            "small.toml",
            "--n-envs",
            "1",
            "--out",
            "interrupted",
        ),  # fmt: skip
        cwd=workspace,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("checkpoint_*.zip")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "stopped by Ctrl-C" in stdout
    checkpoints = sorted(run_dir.glob("checkpoint_*.zip"))
    last = checkpoints[-1]
    assert f"last checkpoint: {Path('interrupted') / last.name}" in stdout
    assert run_checks(last).exit_code == 0
    assert not list(run_dir.glob(".*")), "temporary files left behind"
    listed = [c["file"] for c in json.loads((run_dir / "run.json").read_text())["checkpoints"]]
    assert listed == [path.name for path in checkpoints]
    assert _load(last).num_timesteps < 1_000_000


def _bad_config(folder: Path) -> str:
    (folder / "typo.toml").write_text("learning_rat = 0.001\n")
    return "typo.toml"


def _not_a_zip(folder: Path) -> str:
    (folder / "notes.zip").write_text("not a checkpoint")
    return "notes.zip"


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (lambda folder: ["--env", "NoSuchEnv-v0"], "unknown environment id 'NoSuchEnv-v0'"),
        (lambda folder: ["--config", _bad_config(folder)], "unknown key 'learning_rat'"),
        (lambda folder: ["--resume", "missing.zip"], "cannot resume from missing.zip"),
        (lambda folder: ["--resume", _not_a_zip(folder)], "not a readable checkpoint"),
        (lambda folder: ["--timesteps", "0"], "--timesteps must be > 0"),
        (lambda folder: ["--critic", "gaussian"], "--critic must be"),
    ],
    ids=["env", "config-key", "resume-missing", "resume-not-a-zip", "timesteps", "critic"],
)
def test_bad_options_exit_2_with_one_line(tmp_path, make_args, expected):
    result = dppo_ckpt("train", "--out", "never", *make_args(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "never").exists()


def test_existing_run_folder_is_not_overwritten(run_a, workspace, monkeypatch):
    result = in_process(
        "train", "--out", "A", "--timesteps", "128", cwd=workspace, monkeypatch=monkeypatch
    )
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and result.stderr.count("\n") == 1


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    # sys.modules[name] = None makes the package look absent to importlib.
    script = (
        "import sys; sys.modules['tensorboard'] = None; "
        "from dppo_ckpt.cli import main; "
        "sys.argv = ['dppo-ckpt', 'train', '--tensorboard', '--out', 'never']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    expected = "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"
    assert result.stderr == expected


def test_a_checkpoint_failing_its_checks_stops_the_run(workspace):
    # A planted regression: the scaler pickles its parameters again (the original bug).
    script = (
        "import sys\n"
        "from dppo_ckpt.vgs import VarianceGradientScaler\n"
        "def leaky(self):\n"
        "    state = self.__dict__.copy()\n"
        "    state.pop('_logger', None)\n"
        "    return state\n"
        "VarianceGradientScaler.__getstate__ = leaky\n"
        # Layout 2 keeps the scaler out of `data`; put it back, as layout 1 pickled it.
        "from dppo_ckpt.ppo import DistributionalPPO\n"
        "excluded = DistributionalPPO._excluded_save_params\n"
        "DistributionalPPO._excluded_save_params = lambda self: [\n"
        "    n for n in excluded(self) if n != '_variance_gradient_scaler']\n"
        "from dppo_ckpt.cli import main\n"
        "sys.argv = ['dppo-ckpt', 'train', '--timesteps', '512', '--checkpoint-every', '128',\n"
        "            '--config', 'small.toml', '--n-envs', '1', '--out', 'leaky']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workspace,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "checkpoint_000000128.zip failed its checks: DPPO005" in result.stderr
    assert not (workspace / "leaky" / "checkpoint_000000256.zip").exists()


# -- nothing from a resume folder runs unless it is authenticated or --trust is given ---------

HOSTILE = sorted(p.name for p in FIXTURES_DIR.glob("hostile_*.zip"))


def _forge_run_folder(folder: Path, checkpoint: Path, snapshot: bytes) -> Path:
    """A folder as an attacker would hand it over: a checkpoint, a snapshot and a run.json
    that lists both with their true sha256 (anyone can compute them)."""
    folder.mkdir()
    target = folder / "checkpoint_000000064.zip"
    shutil.copy(checkpoint, target)
    (folder / "checkpoint_000000064.envs.pkl").write_bytes(snapshot)
    manifest = {
        "format_version": 1,
        "env_id": "Pendulum-v1",
        "n_envs": 1,
        "seed": 0,
        "timesteps": 128,
        "checkpoint_every": 64,
        "model_settings": {"device": "cpu"},
        "resumed_from": None,
        "checkpoints": [
            {
                "file": target.name,
                "timesteps": 64,
                "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                "envs": {
                    "file": "checkpoint_000000064.envs.pkl",
                    "sha256": hashlib.sha256(snapshot).hexdigest(),
                },
            }
        ],
    }
    (folder / "run.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("name", HOSTILE)
def test_resume_refuses_every_hostile_checkpoint_even_with_a_forged_manifest(
    tmp_path, name, monkeypatch
):
    target = _forge_run_folder(
        tmp_path / "forged", FIXTURES_DIR / name, marker_payload("snapshot_" + name)
    )
    result = in_process(
        "train", "--resume", str(target), "--eval-episodes", "0",
        cwd=tmp_path, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "refused as unsafe" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.rglob("MARKER_pwned*"))


def test_a_forged_snapshot_beside_a_sound_checkpoint_is_never_unpickled(tmp_path, monkeypatch):
    target = _forge_run_folder(
        tmp_path / "forged", FIXTURES_DIR / "dppo_quantile_vgs.zip", marker_payload("snapshot")
    )
    result = in_process(
        "train", "--resume", str(target), "--eval-episodes", "0",
        cwd=tmp_path, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "environments restart fresh" in result.stdout
    assert "run.json is not signed" in result.stdout
    assert not list(tmp_path.rglob("MARKER_pwned*"))


def _copy_up_to_256(run_dir: Path, copy: Path) -> None:
    """A copy of the run as it was at step 256, so that resuming there overwrites nothing."""
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint_000000512.*"))


def _edited_copy(run_dir: Path, copy: Path) -> None:
    _copy_up_to_256(run_dir, copy)
    manifest = json.loads((copy / "run.json").read_text())
    manifest["seed"] = 1
    (copy / "run.json").write_text(json.dumps(manifest))


def test_an_edited_manifest_does_not_vouch_for_its_snapshot(run_a, workspace, monkeypatch):
    run_dir, _ = run_a
    _edited_copy(run_dir, workspace / "edited")
    result = in_process(
        "train", "--resume", "edited/checkpoint_000000256.zip", "--eval-episodes", "0",
        cwd=workspace, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "environments restart fresh" in result.stdout
    assert "run.json was changed after it was signed" in result.stdout
    # The forged entries are not carried on and re-signed: the folder gets a new manifest.
    manifest = json.loads((workspace / "edited" / "run.json").read_text())
    assert [entry["file"] for entry in manifest["checkpoints"]] == ["checkpoint_000000512.zip"]


def test_a_folder_signed_with_another_key_is_not_trusted(run_a, workspace, monkeypatch):
    run_dir, _ = run_a
    _copy_up_to_256(run_dir, workspace / "foreign")
    monkeypatch.setenv("DPPO_CKPT_KEY", "another user's key, long enough to be one")
    # --timesteps 256: the folder's verdict is given before training, which adds nothing here.
    result = in_process(
        "train", "--resume", "foreign/checkpoint_000000256.zip", "--timesteps", "256",
        "--eval-episodes", "0",
        cwd=workspace, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "environments restart fresh" in result.stdout
    assert "run.json was signed with another key than yours" in result.stdout


def test_a_signed_manifest_replayed_beside_another_checkpoint_vouches_for_nothing(
    run_a, workspace, monkeypatch
):
    # The user's own signed run.json and snapshot, with a hostile file under the listed name.
    run_dir, _ = run_a
    copy = workspace / "replayed"
    _copy_up_to_256(run_dir, copy)
    shutil.copy(FIXTURES_DIR / HOSTILE[0], copy / "checkpoint_000000256.zip")
    result = in_process(
        "train", "--resume", "replayed/checkpoint_000000256.zip", "--eval-episodes", "0",
        "--out", "replayed_out",
        cwd=workspace, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert "refused as unsafe" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(workspace.rglob("MARKER_pwned*"))


def test_trust_loads_the_snapshot_of_an_unauthenticated_folder(run_a, workspace, monkeypatch):
    run_dir, _ = run_a
    _edited_copy(run_dir, workspace / "trusted")
    # --timesteps 256: the snapshot is restored before training, which adds nothing here.
    result = in_process(
        "train", "--resume", "trusted/checkpoint_000000256.zip", "--timesteps", "256",
        "--eval-episodes", "0", "--trust",
        cwd=workspace, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "environments restored from checkpoint_000000256.envs.pkl" in result.stdout


def test_the_key_is_created_once_with_mode_0600(run_a):
    from dppo_ckpt import signing

    path = signing.key_path()
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    manifest = json.loads((run_a[0] / "run.json").read_text())
    assert signing.verify(manifest, signing.load_key()) is None
