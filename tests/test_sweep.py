"""The sweep config, the choice of a trial's resume point, and the commands without Ray.

Nothing here needs Ray: what a restarted trial resumes from is decided from its run folder,
and the no-Ray tests run the command in a process where ``import ray`` fails.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from dppo_ckpt import sweep, training

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

_BASE = """
[sweep]
name = "unit"
seeds = [3, 4]

[train]
env = "CartPole-v1"
timesteps = 512
n_envs = 1
checkpoint_every = 128
eval_episodes = 0

[model]
n_steps = 128
batch_size = 64
n_epochs = 1

[space]
learning_rate = { loguniform = [1e-4, 1e-3] }
n_epochs = { grid = [1, 2] }
critic = { choice = ["quantile", "categorical"] }
vgs_alpha = { uniform = [0.1, 1.0] }
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_the_config_gives_train_options_model_keywords_and_a_space(tmp_path):
    config = sweep.load_sweep_config(_write(tmp_path, _BASE))
    assert config.storage == (tmp_path / "sweeps").resolve()
    assert config.folder == config.storage / "unit"
    assert config.seeds == [3, 4]
    assert config.train == {"env_id": "CartPole-v1", "timesteps": 512, "n_envs": 1,
                            "checkpoint_every": 128, "eval_episodes": 0}  # fmt: skip
    assert config.space["learning_rate"] == sweep.Dimension("loguniform", (1e-4, 1e-3))
    assert config.space["n_epochs"].kind == "grid"
    options = sweep.trial_options(
        config, {"seed": 4, "learning_rate": 2e-4, "n_epochs": 2}, tmp_path / "trial"
    )
    assert options.seed == 4 and options.out == tmp_path / "trial" / "run"
    # The trial's model keywords are read back exactly as `train --config` reads them.
    assert training.load_config(options.config) == {
        "n_steps": 128, "batch_size": 64, "n_epochs": 2, "learning_rate": 2e-4,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("[space]", "[space]\nbogus_keyword = { choice = [1] }"), "unknown key 'bogus_keyword'"),
        (("n_steps = 128", "n_steps = \"many\""), "n_steps"),
        (("{ loguniform = [1e-4, 1e-3] }", "{ loguniform = [0, 1e-3] }"), "low must be > 0"),
        (("{ uniform = [0.1, 1.0] }", "{ uniform = [1.0, 0.1] }"), "low < high"),
        (("{ grid = [1, 2] }", "{ sometimes = [1, 2] }"), "unknown kind 'sometimes'"),
        (("seeds = [3, 4]", "seeds = []"), "sweep.seeds"),
        (("seeds = [3, 4]", "seeds = [3]\nmode = \"most\""), "sweep.mode"),
        (("env = ", "envy = "), "unknown key train.envy"),
        (("[model]", "[model]\nseed = 1"), "sweep.seeds"),
        (("[sweep]", "[sweeps]"), "unknown table [sweeps]"),
    ],
)
def test_a_bad_config_is_refused_with_a_one_line_reason(tmp_path, change, expected):
    old, new = change
    assert old in _BASE
    with pytest.raises(sweep.SweepError) as caught:
        sweep.load_sweep_config(_write(tmp_path, _BASE.replace(old, new, 1)))
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_config_that_is_not_toml_is_refused(tmp_path):
    with pytest.raises(sweep.SweepError, match="not valid TOML"):
        sweep.load_sweep_config(_write(tmp_path, "[sweep\n"))
    with pytest.raises(sweep.SweepError, match="cannot read"):
        sweep.load_sweep_config(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------------------------
# Where a restarted trial resumes


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A real run folder of four checkpoints (128, 256, 384, 512 steps), signed."""
    tmp_path = tmp_path_factory.mktemp("trial")
    config = sweep.load_sweep_config(_write(tmp_path, _BASE))
    options = sweep.trial_options(config, {"seed": 3}, tmp_path / "trial")
    training.train(options, Console(file=io.StringIO()))
    return options.out


def _copy(run_folder: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_folder, target)
    return target


@pytest.mark.slow
def test_the_newest_checkpoint_that_verifies_is_chosen(run_folder, tmp_path):
    run = _copy(run_folder, tmp_path)
    lines: list[str] = []
    chosen = sweep.resume_point(run, training.checkpoint_name(384), lines.append)
    assert chosen == run / training.checkpoint_name(512)
    assert lines == []
    assert not (run / sweep.QUARANTINE).exists()


@pytest.mark.slow
def test_newer_files_that_fail_are_quarantined_and_named(run_folder, tmp_path):
    run = _copy(run_folder, tmp_path)
    newest = run / training.checkpoint_name(512)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    lines: list[str] = []
    chosen = sweep.resume_point(run, training.checkpoint_name(384), lines.append)
    assert chosen == run / training.checkpoint_name(384)
    assert len(lines) == 1 and newest.name in lines[0] and "sha256" in lines[0]
    quarantined = sorted(p.name for p in (run / sweep.QUARANTINE).iterdir())
    assert quarantined == [f"{newest.stem}.envs.pkl", newest.name]
    assert not newest.exists()
    # The survivor resumes through `train --resume`, exactly where the folder now ends.
    assert max(run.glob("checkpoint_*.zip")).name == training.checkpoint_name(384)


@pytest.mark.slow
def test_a_reported_checkpoint_that_fails_fails_the_trial(run_folder, tmp_path):
    run = _copy(run_folder, tmp_path)
    reported = run / training.checkpoint_name(256)
    snapshot = run / f"{reported.stem}.envs.pkl"
    snapshot.write_bytes(snapshot.read_bytes() + b"x")
    for newer in (384, 512):  # gone, as if the worker died before writing them
        for member in run.glob(f"{Path(training.checkpoint_name(newer)).stem}.*"):
            member.unlink()
    with pytest.raises(sweep.TrialCheckpointError) as caught:
        sweep.resume_point(run, reported.name, lambda line: None)
    message = str(caught.value)
    assert reported.name in message and "environment snapshot" in message
    assert reported.exists()  # a reported file is never quarantined, only refused


@pytest.mark.slow
def test_a_reported_checkpoint_that_is_missing_is_refused_not_replaced_by_an_older_one(
    run_folder, tmp_path
):
    run = _copy(run_folder, tmp_path)
    reported = run / training.checkpoint_name(384)
    for step in (384, 512):  # gone: the folder is not the one Tune saw
        for member in run.glob(f"{Path(training.checkpoint_name(step)).stem}.*"):
            member.unlink()
    lines: list[str] = []
    with pytest.raises(sweep.TrialCheckpointError) as caught:
        sweep.resume_point(run, reported.name, lines.append)
    assert str(caught.value) == (
        f"checkpoint {reported}, the one last reported to Tune, is missing: the trial is not "
        "resumed from an older one"
    )
    assert caught.value.exit_code == 2
    assert lines == [] and not (run / sweep.QUARANTINE).exists()
    assert (run / training.checkpoint_name(256)).exists()  # there, verified, and not taken


def _release(fifo: Path) -> None:
    """Open the FIFO for writing and close it: a reader blocked in open() then reads nothing."""
    import contextlib

    with contextlib.suppress(OSError):  # no reader waits (or it was moved): nothing to release
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.slow
def test_a_fifo_in_the_run_folder_is_refused_in_one_line_without_hanging(run_folder, tmp_path):
    import threading

    run = _copy(run_folder, tmp_path)
    newest = run / training.checkpoint_name(512)
    newest.unlink()
    os.mkfifo(newest)
    snapshot = run / f"{Path(training.checkpoint_name(384)).stem}.envs.pkl"
    # Were a FIFO opened as a file, its read would wait for a writer forever: one comes after
    # a while, so that such a wait fails the test (with a sha256 mismatch) instead of hanging.
    releases = [threading.Timer(20.0, _release, args=(path,)) for path in (newest, snapshot)]
    for release in releases:
        release.start()
    try:
        lines: list[str] = []
        chosen = sweep.resume_point(run, training.checkpoint_name(384), lines.append)
        assert chosen == run / training.checkpoint_name(384)
        assert len(lines) == 1 and "\n" not in lines[0]
        refused = "cannot read it: not a regular file (a FIFO)"
        assert f"quarantined {newest.name} ({refused})" in lines[0]
        assert (run / sweep.QUARANTINE / newest.name).is_fifo()

        snapshot.unlink()
        os.mkfifo(snapshot)
        with pytest.raises(sweep.TrialCheckpointError) as caught:
            sweep.resume_point(run, training.checkpoint_name(384), lines.append)
        assert str(caught.value).endswith(
            f"fails verification: its environment snapshot {snapshot.name} cannot be read: "
            "not a regular file (a FIFO)"
        )
    finally:
        for release in releases:
            release.cancel()


@pytest.mark.slow
def test_a_manifest_edited_after_signing_verifies_nothing(run_folder, tmp_path):
    run = _copy(run_folder, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    manifest["timesteps"] = 10**9
    (run / "run.json").write_text(json.dumps(manifest))
    lines: list[str] = []
    with pytest.raises(sweep.TrialCheckpointError) as caught:
        sweep.resume_point(run, training.checkpoint_name(384), lines.append)
    assert "run.json was changed after it was signed" in str(caught.value)
    assert len(lines) == 1 and training.checkpoint_name(512) in lines[0]


@pytest.mark.slow
def test_what_tune_keeps_rebuilds_the_run_folder_on_a_node_that_lacks_it(run_folder, tmp_path):
    newest = run_folder / training.checkpoint_name(512)
    with sweep._staged(newest) as kept:
        assert sorted(p.name for p in kept.iterdir()) == sorted(
            [newest.name, f"{newest.stem}.envs.pkl", "run.json"]
        )
        fresh = tmp_path / "elsewhere" / "run"
        assert sweep._seed_run_folder(kept, fresh) == newest.name
    assert (fresh / newest.name).read_bytes() == newest.read_bytes()
    assert sweep.resume_point(fresh, newest.name, lambda line: None) == fresh / newest.name


def test_the_package_imports_neither_ray_nor_torch_for_the_cli():
    code = (
        "import sys, dppo_ckpt.cli, dppo_ckpt.sweep, dppo_ckpt.checkpoint.fleet\n"
        "print(sorted({'ray', 'torch'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)  # fmt: skip
    assert done.stdout.strip() == "[]", done.stderr


# ---------------------------------------------------------------------------------------------
# Without Ray


def _without_ray(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    # Every `import ray` in this process fails, as it does where the extra is not installed.
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip


def test_without_ray_sweep_exits_2_naming_the_extra(tmp_path):
    done = _without_ray(tmp_path, "sweep", str(_write(tmp_path, _BASE)))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: sweep needs Ray, which is not installed: pip install 'dppo-ckpt[ray]'"
    ]
    assert "Traceback" not in done.stdout + done.stderr


def test_without_ray_verify_ray_exits_2_and_local_verify_still_works(tmp_path):
    good = str(FIXTURES / "dppo_quantile_vgs.zip")
    done = _without_ray(tmp_path, "verify", "--ray", "--static", good)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: this needs Ray, which is not installed: pip install 'dppo-ckpt[ray]'"
    ]
    local = _without_ray(tmp_path, "verify", "--static", "--format", "json", good)
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["exit_code"] == 0


def test_address_needs_ray(tmp_path):
    done = _without_ray(tmp_path, "verify", "--address", "x:1", str(FIXTURES / "sb3_ppo.zip"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --address needs --ray"


def test_sweep_with_a_bad_config_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from dppo_ckpt.cli import app

    bad = _write(tmp_path, _BASE.replace("n_steps = 128", "n_stepz = 128"))
    done = CliRunner().invoke(app, ["sweep", str(bad)])
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines() == [
        f"error: config {bad} [model]/[space]: unknown key 'n_stepz' "
        "(not a DistributionalPPO keyword)"
    ]


def test_a_failed_trial_is_shown_with_the_checks_message():
    # What Tune hands back for a trial whose trainable raised: the cause's class and message
    # after the worker's traceback.
    error = RuntimeError(
        "ray::_run_trial() (pid=1, ip=10.0.0.1)\n  File \"sweep.py\", line 1, in _run_trial\n"
        "dppo_ckpt.sweep.TrialCheckpointError: checkpoint run/checkpoint_000000256.zip, the one "
        "last reported to Tune, fails verification: DPPO001 archive: truncated\n"
    )
    assert sweep._error_line(error) == (
        "checkpoint run/checkpoint_000000256.zip, the one last reported to Tune, fails "
        "verification: DPPO001 archive: truncated"
    )


def test_an_address_where_no_cluster_answers_exits_2_at_once(tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "verify", "--ray", "--static", "--address",
         f"127.0.0.1:{port}", str(FIXTURES / "sb3_ppo.zip")],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"
    ]


_OPTUNA = _BASE.replace("seeds = [3, 4]", 'seeds = [3, 4]\nsearch = "optuna"')


def _without(module: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shim = tmp_path / f"no-{module}"
    shim.mkdir(exist_ok=True)
    # Every `import MODULE` in this process fails, as it does where it is not installed.
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip


def test_without_optuna_an_optuna_sweep_exits_2_naming_the_extra(tmp_path):
    pytest.importorskip("ray")  # without Ray, the sweep stops on that first
    config = _write(tmp_path, _OPTUNA.replace("n_epochs = { grid = [1, 2] }\n", ""))
    done = _without("optuna", tmp_path, "sweep", str(config))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: sweep.search = 'optuna' needs optuna, which is not installed: "
        "pip install 'dppo-ckpt[optuna]'"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "sweeps").exists()  # refused before any trial


def test_an_optuna_space_has_no_grid(tmp_path):
    pytest.importorskip("optuna")
    with pytest.raises(sweep.SweepError) as caught:
        sweep.load_sweep_config(_write(tmp_path, _OPTUNA))
    assert str(caught.value) == (
        "sweep.search = 'optuna' draws every dimension itself: make space.n_epochs a choice "
        "instead of a grid"
    )


def test_an_optuna_sweep_needs_a_space(tmp_path):
    pytest.importorskip("optuna")
    text = _OPTUNA[: _OPTUNA.index("[space]")]
    with pytest.raises(sweep.SweepError) as caught:
        sweep.load_sweep_config(_write(tmp_path, text))
    assert str(caught.value) == "sweep.search = 'optuna' needs a [space] to draw from"


def test_only_checkpoint_names_train_writes_are_read_as_steps(tmp_path):
    """Unicode digits pass ``str.isdigit`` but not ``int``: such a name is not a checkpoint
    of the run, never a traceback."""
    for name in [training.checkpoint_name(512), "checkpoint_²²²²²²²²².zip",
                 "checkpoint_000000x12.zip", "checkpoint_٠٠٠٠٠٠٠١٢.zip"]:  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert sweep._checkpoints_newest_first(tmp_path) == [
        (512, tmp_path / training.checkpoint_name(512))
    ]
