"""Ray: ``verify --ray`` against local ``verify``, dead workers, a sweep whose trial loses
its worker and still ends bit for bit where an uninterrupted one does, and a sweep on Ray's
Optuna search.

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
from typing import Any

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


def _check_after(path: str, pause: float) -> object:
    from dppo_ckpt.checkpoint.checks import run_checks

    time.sleep(pause)
    return run_checks(path, static=True)


#: The first line of what Ray's memory monitor raises from ``ray.get`` for a task it killed.
_RAY_OOM = (
    "Task was killed due to the node running low on memory.\n"
    "Memory on the node (IP: 10.0.0.1, ID: 1a2b) where the task (task ID: 3c4d, name=_check, "
    "pid=123, memory used=7.1GB) was running was 7.5GB / 7.8GB (0.96), which exceeds the "
    "memory usage threshold of 0.95. Ray killed this worker (ID: 5e6f) because it was the "
    "most recently scheduled task."
)


class _RayKillingFor:
    """Ray itself, except that ``get`` of the chosen tasks raises what Ray's memory monitor
    raises (a node cannot be run out of memory on a machine others share)."""

    def __init__(self, killed: set) -> None:
        self.killed = killed

    def get(self, ref):
        if ref in self.killed:
            raise ray.exceptions.OutOfMemoryError(_RAY_OOM)
        return ray.get(ref)


def test_a_worker_killed_for_memory_is_unsafe_and_any_other_ray_error_is_that_files_error(
    tmp_path,
):
    good = str(FIXTURES / "dppo_quantile_vgs.zip")
    hungry, cancelled = str(tmp_path / "hungry.zip"), str(tmp_path / "cancelled.zip")
    for path in (hungry, cancelled):
        Path(path).write_bytes(Path(good).read_bytes())
    remote = ray.remote(max_retries=0, num_cpus=1)(_check_after)
    killed: set = set()

    def submit(path: str):
        ref = remote.remote(path, 60.0 if path == cancelled else 0.0)
        if path == hungry:
            killed.add(ref)
        if path == cancelled:
            ray.cancel(ref)  # a RayError that is neither a dead worker nor a lost node
        return ref

    notes: list[str] = []
    paths = [good, hungry, cancelled, good]
    reports, died = fleet._gather(_RayKillingFor(killed), paths, submit, notes)
    assert [r.path for r in reports] == paths
    assert [r.exit_code for r in reports] == [0, 3, 1, 0]
    assert died == {1}
    assert notes == []
    (memory,) = reports[1].results
    assert memory.check_id == "DPPO007" and memory.verdict.value == "fail"
    assert "killed the worker checking the file for memory" in memory.message
    assert "the node running low on memory" in memory.message and "\n" not in memory.message
    (error,) = reports[2].results
    assert error.check_id == "DPPO001" and error.verdict.value == "error"
    assert "TaskCancelledError" in error.message and "\n" not in error.message
    # The other files of the batch got their checks, whole.
    from dppo_ckpt.checkpoint.checks import CHECKS

    for report in (reports[0], reports[3]):
        assert [r.check_id for r in report.results] == list(CHECKS)


def test_a_file_refused_by_its_static_checks_is_never_handed_to_a_loader():
    from dppo_ckpt.checkpoint.checks import run_checks

    good = str(FIXTURES / "dppo_quantile_vgs.zip")
    hostile = [str(FIXTURES / "hostile_data_entry.zip"), str(FIXTURES / "hostile_nested_blob.zip")]
    static_remote = ray.remote(max_retries=0, num_cpus=1)(fleet._static_task)
    load_remote = ray.remote(max_retries=0, num_cpus=1)(fleet._load_task)
    budgets = fleet.Budgets()
    loaded: list[str] = []

    def submit_load(path: str):
        loaded.append(path)
        return load_remote.remote(path, False, True, budgets, None)

    paths = [hostile[0], good, hostile[1]]
    reports, notes = fleet._fan_out(
        ray, paths, lambda path: static_remote.remote(path, False, budgets, None), submit_load
    )
    assert loaded == [good]
    assert notes == []
    assert [r.exit_code for r in reports] == [3, 0, 3]
    for path, report in zip(hostile, (reports[0], reports[2]), strict=True):
        local = run_checks(path)  # what local verify reports: nothing of it was loaded
        assert [(r.check_id, r.verdict, r.message) for r in report.results] == [
            (r.check_id, r.verdict, r.message) for r in local.results
        ]
        assert "refused as unsafe" in report.results[-1].message
    assert next(r for r in reports[1].results if r.check_id == "DPPO007").verdict.value == "pass"


# ---------------------------------------------------------------------------------------------
# A sweep that survives the loss of a worker


_SWEEP = """
[sweep]
name = "kill"
storage = "sweeps"
metric = "eval_return"
seeds = [0, 1]
max_failures = 2

[train]
env = "CartPole-v1"
timesteps = 2048
n_envs = 1
checkpoint_every = 512
eval_episodes = 1

[model]
n_steps = 128
batch_size = 64
n_epochs = 2
vgs_warmup_steps = 4

[space]
learning_rate = { choice = [0.0005] }
"""


def _sweep_while(tmp_path: Path, text: str, watch: Any) -> tuple[Any, Any]:
    """Run the sweep of config ``text`` while ``watch(folder, stop)`` runs in a thread;
    the config and the sweep's result."""
    from rich.console import Console

    from dppo_ckpt import sweep

    path = tmp_path / "sweep.toml"
    path.write_text(text)
    config = sweep.load_sweep_config(path)
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(config.folder, stop))
    watcher.start()
    try:
        result = sweep.run_sweep(config, Console(file=io.StringIO()))
    finally:
        stop.set()
        watcher.join()
    return config, result


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


def _state(checkpoint: Path) -> dict[str, dict]:
    """What a resumed run must match bit for bit: the raw bytes of the policy's and the
    optimizer's tensors, the scaler's state (``vgs.pth``: its statistics as raw bytes, its
    counters and level, and the member's bytes) and the generators' state stored with the
    model."""
    import torch

    out: dict[str, dict] = {"policy": {}, "optimizer": {}, "scaler": {}}
    with zipfile.ZipFile(checkpoint) as archive:
        for member, group in (("policy.pth", "policy"), ("policy.optimizer.pth", "optimizer"),
                              ("vgs.pth", "scaler")):  # fmt: skip
            state = torch.load(io.BytesIO(archive.read(member)), weights_only=True)
            flat = state["state"] if group == "optimizer" else state
            out[group] = dict(_values(flat, member))
        out["rng"] = json.loads(archive.read("data"))["_rng_state"]
        out["vgs.pth"] = {"bytes": archive.read("vgs.pth")}
    return out


def _values(value, prefix):
    """Every leaf of a state, tensors as raw bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        yield prefix, (str(value.dtype), tuple(value.shape), value.numpy().tobytes())
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _values(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _values(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


@pytest.mark.slow
def test_a_trial_whose_worker_is_killed_ends_with_the_uninterrupted_parameters(tmp_path):
    from rich.console import Console

    from dppo_ckpt import sweep, training

    killed: list = []
    config, result = _sweep_while(
        tmp_path, _SWEEP, lambda folder, stop: _killer(folder, 1, stop, killed)
    )
    assert killed, "the trial's worker was never killed"
    assert [row.status for row in result.rows] == ["DONE", "DONE"], result.rows
    row = next(r for r in result.rows if r.config["seed"] == 1)
    assert row.restarts == 1
    trial_dir = Path(row.run_dir).parent
    log = (trial_dir / "trial.log").read_text()
    assert "restart: resuming from checkpoint_" in log
    final = Path(row.last_checkpoint)
    assert final.name == training.checkpoint_name(2048)
    assert isinstance(row.metrics["eval_return"], float)
    assert row.metrics["timesteps"] == 2048.0

    # The same trial, never interrupted, run in this process.
    reference = training.train(
        sweep.trial_options(config, row.config, tmp_path / "reference"),
        Console(file=io.StringIO()),
    )
    assert reference.last_checkpoint.name == final.name
    resumed, uninterrupted = _state(final), _state(reference.last_checkpoint)
    for group in ("policy", "optimizer", "scaler"):
        assert resumed[group].keys() == uninterrupted[group].keys() and resumed[group], group
        assert resumed[group] == uninterrupted[group], group
    assert any("exp_avg_sq" in key for key in resumed["scaler"])  # the statistics, not only
    assert resumed["scaler"]["vgs.pth.step_count"] > 0  # the settings
    assert resumed["rng"] == uninterrupted["rng"] and resumed["rng"]["torch"]
    assert resumed["vgs.pth"] == uninterrupted["vgs.pth"]  # the member itself, byte for byte


_SPOILED_SWEEP = """
[sweep]
name = "spoiled"
storage = "sweeps"
metric = "return"
seeds = [0]
max_failures = 2

[train]
env = "CartPole-v1"
timesteps = 2048
n_envs = 1
checkpoint_every = 256
eval_episodes = 0

[model]
n_steps = 128
batch_size = 64
n_epochs = 1
"""


def _spoil_then_kill(folder: Path, stop: threading.Event, spoiled: list) -> None:
    """Once Tune holds two checkpoints of the trial: freeze its worker, damage every
    checkpoint of its run folder (the one Tune last received included), then kill it."""
    while not stop.is_set() and not spoiled:
        kept = list(folder.glob("*/checkpoint_000001"))
        workers = list(folder.glob("runs/*/worker.json"))
        if kept and workers:
            try:
                pid = json.loads(workers[0].read_text())["pid"]
            except (OSError, ValueError):
                continue
            os.kill(pid, signal.SIGSTOP)  # it writes and reports nothing more
            time.sleep(1.0)  # the driver takes in what the worker reported before
            checkpoints = sorted(workers[0].parent.glob("run/checkpoint_*.zip"))
            for checkpoint in checkpoints:
                data = bytearray(checkpoint.read_bytes())
                data[len(data) // 2] ^= 0xFF
                checkpoint.write_bytes(bytes(data))
            os.kill(pid, signal.SIGKILL)
            spoiled.append([c.name for c in checkpoints])
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_a_trial_whose_checkpoint_fails_verification_ends_at_once_not_retried(tmp_path):
    spoiled: list = []
    config, result = _sweep_while(
        tmp_path, _SPOILED_SWEEP, lambda folder, stop: _spoil_then_kill(folder, stop, spoiled)
    )
    assert spoiled, "the trial's worker was never killed"
    (row,) = result.rows
    assert row.status == "ERROR" and result.failed == 1
    # The lost worker was restarted once (an infrastructure failure); the restart found the
    # checkpoint Tune last received damaged, and the trial ended there: no second restart,
    # although max_failures allows two.
    assert row.restarts == 1
    assert "the one last reported to Tune, fails verification" in row.error
    assert "sha256" in row.error and "\n" not in row.error
    assert row.exit_code == 2
    assert any(name in row.error for name in spoiled[0])
    log = (Path(row.run_dir).parent / "trial.log").read_text()
    assert log.count("the trial ends: a restart would fail the same way") == 1
    assert "done:" not in log


# ---------------------------------------------------------------------------------------------
# The Optuna search


_OPTUNA_SWEEP = """
[sweep]
name = "optuna"
storage = "sweeps"
metric = "eval_return"
seeds = [0, 1]
samples = 2
search = "optuna"

[train]
env = "CartPole-v1"
timesteps = 256
n_envs = 1
checkpoint_every = 128
eval_episodes = 1

[model]
n_steps = 128
batch_size = 64
n_epochs = 1

[space]
learning_rate = { loguniform = [1e-4, 1e-3] }
critic = { choice = ["quantile", "categorical"] }
"""


@pytest.mark.slow
def test_an_optuna_sweep_runs_each_draw_once_per_seed_as_verified_train_runs(tmp_path):
    pytest.importorskip("optuna")
    from dppo_ckpt import sweep, training

    path = tmp_path / "sweep.toml"
    path.write_text(_OPTUNA_SWEEP)
    exported = tmp_path / "results.json"
    done = CliRunner().invoke(app, ["sweep", str(path), "--output", str(exported)])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output

    document = json.loads(exported.read_text())
    trials = document["trials"]
    assert len(trials) == 2 * 2 and {t["status"] for t in trials} == {"DONE"}
    draws: dict[tuple, list[int]] = {}
    for trial in trials:
        config = trial["config"]
        assert set(config) == {"learning_rate", "critic", "seed"}
        assert 1e-4 <= config["learning_rate"] <= 1e-3
        assert config["critic"] in ("quantile", "categorical")
        draws.setdefault((config["learning_rate"], config["critic"]), []).append(config["seed"])
    assert sorted(sorted(seeds) for seeds in draws.values()) == [[0, 1], [0, 1]]

    for trial in trials:
        run_dir = Path(trial["run_dir"])
        final = Path(trial["last_checkpoint"])
        assert final == run_dir / training.checkpoint_name(256)
        manifest = json.loads((run_dir / training.MANIFEST_NAME).read_text())
        assert manifest["seed"] == trial["config"]["seed"]
        # The signed manifest lists it with its sha256 and the checks pass (in a child): it is
        # the checkpoint a restart of this trial would resume from.
        assert sweep.resume_point(run_dir, final.name, lambda line: None) == final
        assert trial["metrics"]["timesteps"] == 256.0
        assert isinstance(trial["metrics"]["eval_return"], float)

    best = max(trials, key=lambda t: t["metrics"]["eval_return"])
    assert document["best"] == best["trial_id"]
    assert "sweep results (eval_return, max)" in done.stdout
    assert f"{best['trial_id']} *" in done.stdout
    assert "4 done, 0 failed" in done.stdout
    assert all(t["trial_id"] in done.stdout for t in trials)


def test_optuna_is_told_the_mean_over_the_seeds_of_each_draw(tmp_path):
    pytest.importorskip("optuna")
    import optuna

    from dppo_ckpt import sweep

    path = tmp_path / "sweep.toml"
    path.write_text(_OPTUNA_SWEEP.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    searcher = sweep._optuna_search(sweep.load_sweep_config(path))
    suggested = {f"t{i}": searcher.suggest(f"t{i}") for i in range(6)}
    assert [c["seed"] for c in suggested.values()] == [0, 1, 2, 0, 1, 2]
    first, second = list(suggested.values())[:3], list(suggested.values())[3:]
    assert all({**c, "seed": 0} == {**first[0], "seed": 0} for c in first)
    assert all({**c, "seed": 0} == {**second[0], "seed": 0} for c in second)

    study = searcher.inner._ot_study
    for trial_id, value in (("t0", 10.0), ("t1", 20.0)):
        searcher.on_trial_complete(trial_id, {"eval_return": value})
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING] * 2
    searcher.on_trial_complete("t2", {"eval_return": 60.0})
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[0].value == 30.0
    assert study.trials[0].params == {k: v for k, v in first[0].items() if k != "seed"}

    # One seed's trial failed: the draw as a whole failed, whatever the others scored.
    searcher.on_trial_complete("t3", {"eval_return": 10.0})
    searcher.on_trial_complete("t4", None, error=True)
    searcher.on_trial_complete("t5", {"eval_return": 30.0})
    assert study.trials[1].state == optuna.trial.TrialState.FAIL

    # A trial that ended itself on a failure (its checkpoint failed verification) failed too,
    # whatever figure its last report holds.
    for i in range(6, 9):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t6", {"eval_return": 10.0})
    searcher.on_trial_complete("t7", {"eval_return": 20.0, sweep.FAILED_KEY: "fails"})
    searcher.on_trial_complete("t8", {"eval_return": 30.0})
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
