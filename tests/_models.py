"""Small models and loggers shared by the algorithm tests."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch as th
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv

from dppo_ckpt import DistributionalPPO

# Small but real: every learn() call collects rollouts and runs several minibatch updates.
SMALL = dict(n_steps=64, batch_size=32, n_epochs=2, learning_rate=1e-3, gamma=0.9)


def make_env(env_id: str = "Pendulum-v1", n_envs: int = 1) -> DummyVecEnv:
    """A fresh vectorised environment (classic control, ships with gymnasium)."""
    return DummyVecEnv([lambda: gym.make(env_id) for _ in range(n_envs)])


def make_model(env: Any = None, **overrides: Any) -> DistributionalPPO:
    """A seeded DistributionalPPO with a short warm-up so scaling is active in tests."""
    settings: dict[str, Any] = dict(SMALL, seed=0, vgs_warmup_steps=3, device="cpu")
    settings.update(overrides)
    return DistributionalPPO("MlpPolicy", env if env is not None else make_env(), **settings)


def parameters_bytes(model: DistributionalPPO) -> list[bytes]:
    """The policy's parameters as raw bytes, for bit-for-bit comparisons."""
    return [p.detach().cpu().numpy().tobytes() for p in model.policy.parameters()]


def scaler_state_bytes(model: DistributionalPPO) -> dict[str, Any]:
    """The scaler's statistics with tensors as raw bytes (bit-for-bit comparable)."""
    state = model._variance_gradient_scaler.state_dict()
    return {
        key: [t.cpu().numpy().tobytes() for t in value] if isinstance(value, list) else value
        for key, value in state.items()
    }


def optimizer_state_bytes(model: DistributionalPPO) -> list[tuple[str, bytes]]:
    """Adam's per-parameter state as raw bytes."""
    out = []
    for index, state in sorted(model.policy.optimizer.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            data = value.cpu().numpy().tobytes() if isinstance(value, th.Tensor) else repr(value)
            out.append((f"{index}/{key}", data))
    return out


class RecordingFormat(KVWriter):
    """An SB3 logger output that keeps every dumped key/value in memory."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: Any, step: int = 0) -> None:
        self.records.append(dict(key_values))

    def keys(self) -> set[str]:
        return {key for record in self.records for key in record}


def recording_logger() -> tuple[Logger, RecordingFormat]:
    """An SB3 logger whose dumps can be inspected."""
    recorder = RecordingFormat()
    return Logger(folder=None, output_formats=[recorder]), recorder
