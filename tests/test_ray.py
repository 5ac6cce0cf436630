"""Ray: ``verify --ray`` against local ``verify``, dead workers, and a sweep whose trial loses
its worker and still ends bit for bit where an uninterrupted one does.

One local Ray cluster of 2 CPUs serves the whole module (its start-up is the costly part).
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from dppo_ckpt.checkpoint import fleet  # noqa: E402
from dppo_ckpt.cli import app  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    started_here = not ray.is_initialized()
    fleet.connect(num_cpus=2)
    yield
    if started_here:
        ray.shutdown()


def _without_timing(text: str) -> dict:
    document = json.loads(text)
    for entry in document["files"]:
        for result in entry["results"]:
            result.pop("duration_s")
    return document


def test_verify_ray_gives_the_local_json_report_and_exit_code():
    paths = [str(p) for p in sorted(FIXTURES.glob("*.zip"))]
    runner = CliRunner()
    local = runner.invoke(app, ["verify", "--jobs", "2", "--format", "json", *paths])
    fanned = runner.invoke(app, ["verify", "--ray", "--format", "json", *paths])
    assert fanned.exit_code == local.exit_code == 3
    assert "Traceback" not in fanned.output
    # stdout holds the report only; the throughput line goes to stderr.
    assert _without_timing(fanned.stdout) == _without_timing(local.stdout)
    assert [f["path"] for f in json.loads(fanned.stdout)["files"]] == paths
    assert "files/s" in fanned.stderr and "Ray node" in fanned.stderr


def test_verify_ray_static_matches_local_static():
    paths = [str(FIXTURES / "dppo_quantile_vgs.zip"), str(FIXTURES / "hostile_data_entry.zip")]
    runner = CliRunner()
    local = runner.invoke(app, ["verify", "--static", "--format", "json", *paths])
    fanned = runner.invoke(app, ["verify", "--static", "--ray", "--format", "json", *paths])
    assert fanned.exit_code == local.exit_code == 3
    assert _without_timing(fanned.stdout) == _without_timing(local.stdout)


def _check_or_die(path: str) -> object:
    from dppo_ckpt.checkpoint.checks import run_checks

    if os.path.basename(path).startswith("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    return run_checks(path, static=True)


def test_a_worker_that_dies_is_that_files_result_and_is_not_retried(tmp_path):
    good = str(FIXTURES / "dppo_quantile_vgs.zip")
    dying = tmp_path / "die.zip"
    dying.write_bytes((FIXTURES / "dppo_quantile_vgs.zip").read_bytes())
    calls = []
    remote = ray.remote(max_retries=0, num_cpus=1)(_check_or_die)

    def submit(path: str):
        calls.append(path)
        return remote.remote(path)

    notes: list[str] = []
    reports, died = fleet._gather(ray, [good, str(dying), good], submit, notes)
    assert [r.path for r in reports] == [good, str(dying), good]
    assert [r.exit_code for r in reports] == [0, 3, 0]
    assert died == {1}
    assert reports[1].results[0].check_id == "DPPO007"
    assert "died" in reports[1].results[0].message
    assert calls.count(str(dying)) == 1  # never retried
    assert notes == []


# ---------------------------------------------------------------------------------------------
# A sweep that survives the loss of a worker


# Three checkpoints after the first: the worker is killed with most of the run still to go.
_SWEEP = """
[sweep]
name = "kill"
storage = "sweeps"
metric = "eval_return"
seeds = [0, 1]
max_failures = 2

[train]
env = "CartPole-v1"
timesteps = 1024
n_envs = 1
checkpoint_every = 256
eval_episodes = 1

[model]
n_steps = 128
batch_size = 64
n_epochs = 2
vgs_warmup_steps = 4

[space]
learning_rate = { choice = [0.0005] }
"""


def _killer(folder: Path, seed: int, stop: threading.Event, killed: list) -> None:
    """SIGKILL the worker of the trial with ``seed`` once its run folder lists a checkpoint."""
    while not stop.is_set() and not killed:
        for trial in folder.glob("runs/*"):
            try:
                manifest = json.loads((trial / "run" / "run.json").read_text())
                worker = json.loads((trial / "worker.json").read_text())
            except (OSError, ValueError):
                continue
            if manifest.get("seed") == seed and manifest.get("checkpoints"):
                os.kill(worker["pid"], signal.SIGKILL)
                killed.append((trial, len(manifest["checkpoints"])))
                return
        time.sleep(0.01)


def _parameters(checkpoint: Path) -> dict[str, bytes]:
    """The raw bytes of the policy's and optimizer's tensors."""
    import torch

    out = {}
    with zipfile.ZipFile(checkpoint) as archive:
        for member in ("policy.pth", "policy.optimizer.pth"):
            state = torch.load(io.BytesIO(archive.read(member)), weights_only=True)
            flat = state if member == "policy.pth" else state["state"]
            for name, value in _tensors(flat, member):
                out[name] = value.numpy().tobytes()
    return out


def _tensors(value, prefix):
    import torch

    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}")


@pytest.mark.slow
def test_a_trial_whose_worker_is_killed_ends_with_the_uninterrupted_parameters(tmp_path):
    from rich.console import Console

    from dppo_ckpt import sweep, training

    path = tmp_path / "sweep.toml"
    path.write_text(_SWEEP)
    config = sweep.load_sweep_config(path)
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_killer, args=(config.folder, 1, stop, killed))
    watcher.start()
    try:
        result = sweep.run_sweep(config, Console(file=io.StringIO()))
    finally:
        stop.set()
        watcher.join()

    assert killed, "the trial's worker was never killed"
    assert [row.status for row in result.rows] == ["DONE", "DONE"], result.rows
    row = next(r for r in result.rows if r.config["seed"] == 1)
    assert row.restarts == 1
    trial_dir = Path(row.run_dir).parent
    log = (trial_dir / "trial.log").read_text()
    assert "restart: resuming from checkpoint_" in log
    final = Path(row.last_checkpoint)
    assert final.name == training.checkpoint_name(1024)
    assert isinstance(row.metrics["eval_return"], float)
    assert row.metrics["timesteps"] == 1024.0

    # The same trial, never interrupted, run in this process.
    reference = training.train(
        sweep.trial_options(config, row.config, tmp_path / "reference"),
        Console(file=io.StringIO()),
    )
    assert reference.last_checkpoint.name == final.name
    resumed, uninterrupted = _parameters(final), _parameters(reference.last_checkpoint)
    assert resumed.keys() == uninterrupted.keys() and resumed
    assert resumed == uninterrupted
