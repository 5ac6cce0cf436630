"""Shared settings of the algorithm benchmarks: RL Zoo's tuned PPO for Pendulum-v1."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from dppo_ckpt import DistributionalPPO

ZOO_PENDULUM: dict[str, Any] = dict(
    n_steps=1024,
    gae_lambda=0.95,
    gamma=0.9,
    n_epochs=10,
    ent_coef=0.0,
    learning_rate=1e-3,
    clip_range=0.2,
    use_sde=True,
    sde_sample_freq=4,
    device="cpu",
)
N_ENVS = 4


def make_env(seed: int) -> DummyVecEnv:
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1") for _ in range(N_ENVS)])
    env.seed(seed)
    return env


def make_algorithm(name: str, seed: int) -> PPO:
    """``"ppo"`` (SB3), ``"dppo"`` (quantile critic, scaler on) or ``"dppo-categorical"``
    (categorical critic, scaler on), same settings and seed."""
    if name == "ppo":
        return PPO("MlpPolicy", make_env(seed), seed=seed, **ZOO_PENDULUM)
    if name == "dppo":
        return DistributionalPPO("MlpPolicy", make_env(seed), seed=seed, **ZOO_PENDULUM)
    if name == "dppo-categorical":
        return DistributionalPPO(
            "MlpPolicy", make_env(seed), seed=seed, critic="categorical", **ZOO_PENDULUM
        )
    raise ValueError(f"unknown algorithm {name!r}")
