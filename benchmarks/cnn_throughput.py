"""Steps per second of DistributionalPPO ``CnnPolicy`` against SB3 PPO ``CnnPolicy``.

    python -m benchmarks.cnn_throughput [--steps 2048] [--reps 3]

Both learn on the same small image environment (36x36 RGB frames, uint8, channel-last; SB3
transposes them for NatureCNN), with the same settings, alternating in one process on one
CPU thread, so that machine noise hits both alike. Prints the median steps/s of each and the
ratio DPPO/PPO.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

_SETTINGS: dict[str, Any] = dict(n_steps=256, batch_size=64, n_epochs=4, seed=0, device="cpu")


class _Frames(gym.Env):
    """A random walk of a bright square on a dark 36x36 RGB frame; reward for the centre."""

    observation_space = spaces.Box(0, 255, (36, 36, 3), np.uint8)
    action_space = spaces.Discrete(4)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.integers(0, 30, size=2)
        self._t = 0
        return self._frame(), {}

    def _frame(self) -> np.ndarray:
        frame = np.zeros((36, 36, 3), np.uint8)
        y, x = self._pos
        frame[y : y + 6, x : x + 6] = 255
        return frame

    def step(self, action: int):
        move = [(0, 1), (0, -1), (1, 0), (-1, 0)][int(action)]
        self._pos = np.clip(self._pos + move, 0, 30)
        self._t += 1
        reward = -float(np.abs(self._pos - 15).sum()) / 30.0
        return self._frame(), reward, False, self._t >= 64, {}


def _steps_per_second(name: str, steps: int, seed: int) -> float:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from dppo_ckpt import DistributionalPPO

    algo = DistributionalPPO if name == "dppo" else PPO
    model = algo("CnnPolicy", make_vec_env(_Frames, 2, seed=seed), **{**_SETTINGS, "seed": seed})
    start = time.perf_counter()
    model.learn(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2048, help="timesteps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"ppo": [], "dppo": []}
    _steps_per_second("dppo", 512, 99)  # warm-up: imports, allocator, kernels
    for rep in range(args.reps):
        for name in ("ppo", "dppo") if rep % 2 == 0 else ("dppo", "ppo"):
            rates[name].append(_steps_per_second(name, args.steps, seed=rep))
            print(f"rep {rep} {name:4s} {rates[name][-1]:8.1f} steps/s", flush=True)
    ppo, dppo = statistics.median(rates["ppo"]), statistics.median(rates["dppo"])
    print(f"PPO  CnnPolicy median {ppo:8.1f} steps/s")
    print(f"DPPO CnnPolicy median {dppo:8.1f} steps/s")
    print(f"ratio DPPO/PPO = {dppo / ppo:.3f}")


if __name__ == "__main__":
    main()
