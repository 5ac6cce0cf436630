"""Steps per second of DistributionalPPO (quantile critic, scaler on) against SB3's PPO.

    python benchmarks/throughput.py [--steps 8192] [--reps 3]

Both run RL Zoo's tuned Pendulum-v1 settings (4 envs, n_steps=1024, n_epochs=10, lr=1e-3,
gamma=0.9, gSDE) on one CPU thread, alternating in the same process, so that machine noise
hits both alike. Prints the median steps/s of each and the ratio DPPO/PPO (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._pendulum import make_algorithm


def _steps_per_second(name: str, steps: int, seed: int) -> float:
    model = make_algorithm(name, seed)
    start = time.perf_counter()
    model.learn(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8192, help="timesteps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"ppo": [], "dppo": []}
    _steps_per_second("dppo", 4096, 99)  # warm-up: imports, allocator, kernels
    for rep in range(args.reps):
        for name in ("ppo", "dppo") if rep % 2 == 0 else ("dppo", "ppo"):
            rates[name].append(_steps_per_second(name, args.steps, seed=rep))
            print(f"rep {rep} {name:4s} {rates[name][-1]:8.1f} steps/s", flush=True)
    ppo, dppo = statistics.median(rates["ppo"]), statistics.median(rates["dppo"])
    print(f"PPO  median {ppo:8.1f} steps/s")
    print(f"DPPO median {dppo:8.1f} steps/s")
    print(f"ratio DPPO/PPO = {dppo / ppo:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
