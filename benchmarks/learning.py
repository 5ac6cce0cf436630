"""Final return after 100k steps on Pendulum-v1: DistributionalPPO against SB3's PPO.

    python benchmarks/learning.py [--timesteps 100000] [--seeds 0 1 2] [--episodes 10]

RL Zoo's tuned settings for both (see benchmarks/_pendulum.py); DPPO uses the quantile critic
with the scaler on. Runs alternate between the two algorithms seed by seed. Each final policy
is evaluated deterministically on fresh environments; the script prints the mean and std over
seeds of the mean evaluation return (published tuned PPO: about -172 at 100k steps).
"""

from __future__ import annotations

import argparse
import statistics

import gymnasium as gym
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from benchmarks._pendulum import make_algorithm


def _final_return(name: str, seed: int, timesteps: int, episodes: int) -> float:
    model = make_algorithm(name, seed)
    model.learn(timesteps)
    eval_env = DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))])
    eval_env.seed(10_000 + seed)
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=True)
    return float(mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[float]] = {"ppo": [], "dppo": []}
    for seed in args.seeds:
        for name in ("ppo", "dppo"):
            results[name].append(_final_return(name, seed, args.timesteps, args.episodes))
            print(f"seed {seed} {name:4s} final return {results[name][-1]:8.1f}", flush=True)
    for name, label in (("ppo", "PPO "), ("dppo", "DPPO")):
        values = results[name]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"{label} mean {statistics.mean(values):8.1f}  std {std:6.1f}  over {len(values)} seeds"
        )


if __name__ == "__main__":
    main()
