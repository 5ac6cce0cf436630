"""The plan step of `train`: options in, a RunPlan out, without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dppo_ckpt import envs
from dppo_ckpt.run_plan import (
    MANIFEST_NAME,
    TUNED_SETTINGS,
    TrainingError,
    TrainOptions,
    checkpoint_name,
    plan_run,
)

ROOT = Path(__file__).resolve().parents[1]
_FIXTURE = ROOT / "fixtures" / "dppo_categorical_vgs.zip"


def _no_key() -> tuple[bytes | None, str | None]:
    return None, "no key in this test"


_PLAN_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from dppo_ckpt.run_plan import TrainOptions, plan_run
folder = Path(sys.argv[1])
plan = plan_run(
    TrainOptions(out=folder / "run", timesteps=100, config=folder / "c.toml", normalize=True),
    load_key=lambda: (b"k" * 32, None),
)
resumed = plan_run(
    TrainOptions(resume=Path(sys.argv[2]), env_id="Pendulum-v1", out=folder / "resumed"),
    load_key=lambda: (b"k" * 32, None),
)
print(json.dumps({
    "resumed": [resumed.point.timesteps, resumed.spec.env_id, resumed.manifest["resumed_from"]],
    "loaded": sorted(m for m in ("torch", "stable_baselines3", "gymnasium") if m in sys.modules),
    "spec": plan.spec.to_json(),
    "settings": plan.settings,
    "config": plan.config,
    "manifest_env": plan.manifest["env"],
    "timesteps": plan.timesteps,
}))
"""


def test_planning_a_run_or_a_resume_imports_no_torch(tmp_path):
    (tmp_path / "c.toml").write_text('n_steps = 64\n[normalize]\nclip_obs = 5.0\n')
    result = subprocess.run(
        [sys.executable, "-c", _PLAN_IN_A_FRESH_PROCESS, str(tmp_path), str(_FIXTURE)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["loaded"] == []
    assert seen["spec"]["env_id"] == "Pendulum-v1" and seen["spec"]["n_envs"] == 4
    assert seen["spec"]["normalize"] == {"clip_obs": 5.0}
    assert seen["manifest_env"] == seen["spec"]
    assert seen["settings"]["n_steps"] == 64  # the config over the tuned settings
    assert seen["settings"]["gamma"] == TUNED_SETTINGS["Pendulum-v1"]["gamma"]
    assert seen["config"] == {"n_steps": 64}  # left for the runner to check against the model
    assert seen["timesteps"] == 100
    # A resume reads its checkpoint through the archive reader: still no torch.
    assert seen["resumed"][1:] == ["Pendulum-v1", str(_FIXTURE)]
    assert seen["resumed"][0] > 0


def test_a_plan_holds_what_the_options_decide(tmp_path):
    plan = plan_run(
        TrainOptions(env_id="CartPole-v1", out=tmp_path / "r", seed=7, checkpoint_every=512),
        load_key=_no_key,
    )
    assert plan.spec == envs.EnvSpec("CartPole-v1", n_envs=1)
    assert plan.seed == plan.env_seed == plan.settings["seed"] == 7
    assert plan.every == 512 and plan.timesteps == 100_000
    assert plan.point is None and not plan.reused and plan.tb_log_name == "dppo"
    assert plan.run_info == {"timesteps": 100_000, "checkpoint_every": 512, "seed": 7}
    assert plan.notes == ["the run manifest is not signed: no key in this test"]
    assert plan.manifest["checkpoints"] == [] and plan.manifest["resumed_from"] is None
    assert not (tmp_path / "r").exists(), "planning creates nothing"


def test_a_folder_without_checkpoints_is_reused_and_one_with_them_refused(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text("{}")
    assert plan_run(TrainOptions(out=folder), load_key=_no_key).reused
    (folder / checkpoint_name(256)).write_bytes(b"")
    with pytest.raises(TrainingError, match="already holds a run: continue it with --resume"):
        plan_run(TrainOptions(out=folder), load_key=_no_key)


def test_refusals_come_before_the_key_is_loaded(tmp_path):
    def no_call() -> tuple[bytes | None, str | None]:
        raise AssertionError("the key was loaded for options that cannot be used")

    with pytest.raises(TrainingError, match="--branch needs --resume") as caught:
        plan_run(TrainOptions(branch="b", out=tmp_path / "r"), load_key=no_call)
    assert caught.value.exit_code == 2
    with pytest.raises(TrainingError, match="cannot resume from .*: no such file"):
        plan_run(TrainOptions(resume=tmp_path / "missing.zip"), load_key=no_call)
