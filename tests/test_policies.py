"""DistributionalPPO beyond flat observations: images, Dict observations, every action space.

Each case runs what a user runs: learn, save, ``dppo-ckpt verify`` (exit 0), the save-load
``cycle`` checks, and exact resume with both critics.
"""

from __future__ import annotations

import io
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.vec_env import DummyVecEnv
from typer.testing import CliRunner

from dppo_ckpt import DistributionalPPO
from dppo_ckpt.buffers import DistributionalDictRolloutBuffer
from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.cli import app
from dppo_ckpt.cycles import run_cycles
from dppo_ckpt.policy import DistributionalCnnPolicy, DistributionalMultiInputPolicy
from tests._models import optimizer_state_bytes, parameters_bytes, scaler_state_bytes

SETTINGS: dict[str, Any] = dict(
    n_steps=32, batch_size=16, n_epochs=2, seed=0, vgs_warmup_steps=2, device="cpu"
)
_SIDE = 36  # the smallest image NatureCNN takes


def _draw(space: spaces.Space, rng: np.random.Generator) -> Any:
    if isinstance(space, spaces.Dict):
        return {key: _draw(sub, rng) for key, sub in space.spaces.items()}
    if space.dtype == np.uint8:
        return rng.integers(0, 256, size=space.shape, dtype=np.uint8)
    return rng.uniform(-1.0, 1.0, size=space.shape).astype(space.dtype)


class _TinyEnv(gym.Env):
    """Observations from the env's own seeded generator (``reset(seed=...)`` fixes them, as
    exact resume needs); rewards depend on the action; episodes of 16 steps."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        return _draw(self.observation_space, self.np_random), {}

    def step(self, action):
        self._t += 1
        # Rewards depend on the action, so the policy has something to learn.
        reward = float(np.sum(np.asarray(action, dtype=np.float64)) % 3) - 1.0
        observation = _draw(self.observation_space, self.np_random)
        return observation, reward, self._t >= 16, False, {}


def _image(channel_last: bool) -> spaces.Box:
    shape = (_SIDE, _SIDE, 3) if channel_last else (3, _SIDE, _SIDE)
    return spaces.Box(0, 255, shape=shape, dtype=np.uint8)


def _vector() -> spaces.Box:
    return spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)


OBSERVATIONS = {
    "image-channel-first": (lambda: _image(False), "CnnPolicy"),
    "image-channel-last": (lambda: _image(True), "CnnPolicy"),
    "dict": (lambda: spaces.Dict({"image": _image(False), "state": _vector()}), "MultiInputPolicy"),
    "vector": (_vector, "MlpPolicy"),
}
ACTIONS = {
    "box": lambda: spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
    "discrete": lambda: spaces.Discrete(3),
    "multidiscrete": lambda: spaces.MultiDiscrete([3, 2]),
    "multibinary": lambda: spaces.MultiBinary(3),
}
CASES = [
    ("image-channel-first", "discrete", {}),
    ("image-channel-last", "box", {}),
    ("image-channel-first", "box", {"use_sde": True}),
    ("dict", "multibinary", {}),
    ("dict", "multidiscrete", {"policy_kwargs": {"share_features_extractor": False}}),
    ("vector", "multibinary", {}),
    ("vector", "multidiscrete", {}),
]
IDS = ["-".join([obs, act, *extra]) for obs, act, extra in CASES]


def _env_id(observation: str, action: str) -> str:
    env_id = f"DppoTest/Tiny-{observation}-{action}-v0"
    if env_id not in gym.registry:
        make_obs, _ = OBSERVATIONS[observation]
        gym.register(env_id, entry_point=lambda: _TinyEnv(make_obs(), ACTIONS[action]()))
    return env_id


def _model(observation: str, action: str, critic: str = "quantile", **extra: Any):
    env_id = _env_id(observation, action)
    env = DummyVecEnv([lambda: gym.make(env_id)])
    _, policy = OBSERVATIONS[observation]
    settings = {**SETTINGS, **extra, "critic": critic}
    return DistributionalPPO(policy, env, **settings), env_id


@pytest.mark.parametrize(("observation", "action", "extra"), CASES, ids=IDS)
def test_learn_save_verify_and_cycle(tmp_path, observation, action, extra):
    model, env_id = _model(observation, action, **extra)
    model.learn(64)
    path = tmp_path / "model.zip"
    model.save(path)

    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 0, result.output

    report = run_cycles(path, env_id=env_id, cycles=2, steps=32)
    failures = [(r.check_id, r.message) for r in report.results if r.verdict.value != "pass"]
    assert report.exit_code == 0, failures


@pytest.mark.parametrize("critic", ["quantile", "categorical"])
@pytest.mark.parametrize(("observation", "action", "extra"), CASES, ids=IDS)
def test_exact_resume(observation, action, extra, critic):
    uninterrupted, _ = _model(observation, action, critic, **extra)
    uninterrupted.learn(128)

    first, _ = _model(observation, action, critic, **extra)
    first.learn(64)
    buffer = io.BytesIO()
    first.save(buffer)
    buffer.seek(0)
    resumed = DistributionalPPO.load(buffer, env=first.get_env(), force_reset=False, device="cpu")
    resumed.learn(64, reset_num_timesteps=False)

    assert resumed.num_timesteps == uninterrupted.num_timesteps == 128
    assert parameters_bytes(resumed) == parameters_bytes(uninterrupted)
    assert optimizer_state_bytes(resumed) == optimizer_state_bytes(uninterrupted)
    assert scaler_state_bytes(resumed) == scaler_state_bytes(uninterrupted)
    live = {id(p) for p in resumed.policy.parameters()}
    assert {id(p) for p in resumed._variance_gradient_scaler.parameters} == live


def test_the_aliases_pick_the_extractor_and_the_buffer():
    cnn, _ = _model("image-channel-first", "discrete")
    assert isinstance(cnn.policy, DistributionalCnnPolicy)
    assert isinstance(cnn.policy.features_extractor, NatureCNN)
    multi, _ = _model("dict", "box")
    assert isinstance(multi.policy, DistributionalMultiInputPolicy)
    assert isinstance(multi.policy.features_extractor, CombinedExtractor)
    assert isinstance(multi.rollout_buffer, DistributionalDictRolloutBuffer)


def test_normalize_images_off_is_kept_through_a_load(tmp_path):
    model, _ = _model("image-channel-first", "discrete", policy_kwargs={"normalize_images": False})
    model.save(tmp_path / "model.zip")
    loaded = DistributionalPPO.load(tmp_path / "model.zip", device="cpu")
    assert loaded.policy.normalize_images is False
    assert run_checks(tmp_path / "model.zip").exit_code == 0


def test_a_buffer_for_the_wrong_observations_is_refused():
    from dppo_ckpt.buffers import DistributionalRolloutBuffer

    env = DummyVecEnv([lambda: gym.make(_env_id("dict", "box"))])
    with pytest.raises(TypeError, match="does not hold Dict observations"):
        DistributionalPPO(
            "MultiInputPolicy", env, rollout_buffer_class=DistributionalRolloutBuffer, **SETTINGS
        )
