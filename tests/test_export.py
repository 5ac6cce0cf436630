"""The pickle-free export: the same actions bit for bit, and no pickle anywhere in it."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dppo_ckpt import DistributionalPPO, load_policy
from dppo_ckpt.cli import app
from fixtures.make_fixtures import FIXTURES_DIR

CASES = ["dppo_quantile_vgs.zip", "dppo_categorical_vgs.zip", "sb3_ppo.zip"]


@pytest.mark.parametrize("name", CASES)
def test_exported_policy_predicts_exactly_as_the_model(name: str, tmp_path: Path) -> None:
    source = FIXTURES_DIR / name
    result = CliRunner().invoke(app, ["export", str(source), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    from dppo_ckpt.checkpoint.safe_pickle import safe_load

    model = safe_load(source)
    policy = load_policy(tmp_path / "out")
    space = model.observation_space
    space.seed(0)
    observations = np.stack([space.sample() for _ in range(100)])
    expected, _ = model.predict(observations, deterministic=True)
    actual, _ = policy.predict(observations, deterministic=True)
    assert expected.dtype == actual.dtype
    assert expected.tobytes() == actual.tobytes()


def test_the_export_holds_no_pickle(tmp_path: Path) -> None:
    from dppo_ckpt.export import export_policy

    folder = export_policy(FIXTURES_DIR / "dppo_quantile_vgs.zip", tmp_path / "out")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["policy.json", "policy.safetensors"]
    json.loads((folder / "policy.json").read_text())  # plain JSON, whole
    # safetensors: an 8-byte header length, a JSON header, then raw tensor bytes, exactly.
    data = (folder / "policy.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max(v["data_offsets"][1] for v in tensors.values())
    assert len(data) == 8 + size + end


def test_a_hostile_checkpoint_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["export", str(FIXTURES_DIR / "hostile_data_entry.zip"), str(tmp_path / "out")]
    )
    assert result.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_a_policy_with_dict_observations_exports_too(tmp_path: Path) -> None:
    from stable_baselines3.common.env_util import make_vec_env

    from dppo_ckpt.export import export_policy

    class _DictEnv(gym.Env):
        observation_space = gym.spaces.Dict(
            {"a": gym.spaces.Box(-1.0, 1.0, (2,), np.float32), "b": gym.spaces.Discrete(3)}
        )
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    model = DistributionalPPO(
        "MultiInputPolicy", make_vec_env(_DictEnv, 1), n_steps=8, batch_size=8, seed=0
    )
    model.save(tmp_path / "m.zip")
    policy = load_policy(export_policy(tmp_path / "m.zip", tmp_path / "out"))
    obs = {"a": np.zeros((4, 2), np.float32), "b": np.array([0, 1, 2, 1])}
    with torch.no_grad():
        assert np.array_equal(
            model.predict(obs, deterministic=True)[0], policy.predict(obs, deterministic=True)[0]
        )
