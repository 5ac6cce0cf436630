"""Steps per second of DistributionalPPO (quantile and categorical critic, scaler on) against
SB3's PPO.

    python -m benchmarks.throughput [--steps 8192] [--reps 3]
    python -m benchmarks.throughput --only dppo [--steps 16384]

All run RL Zoo's tuned Pendulum-v1 settings (4 envs, n_steps=1024, n_epochs=10, lr=1e-3,
gamma=0.9, gSDE) on one CPU thread, alternating in the same process, so that machine noise
hits them alike. Prints the median steps/s of each and the ratios DPPO/PPO (target >= 1.0).
``--only NAME`` trains one algorithm (``ppo``, ``dppo``, ``dppo-categorical``) once and
prints its rate: two such processes, run in turn by an outside timer, give the ratio of whole
processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._pendulum import make_algorithm

_NAMES = ("ppo", "dppo", "dppo-categorical")


def _steps_per_second(name: str, steps: int, seed: int) -> float:
    model = make_algorithm(name, seed)
    start = time.perf_counter()
    model.learn(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8192, help="timesteps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--only", choices=_NAMES, help="train this one algorithm once")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only is not None:
        print(f"{args.only} {_steps_per_second(args.only, args.steps, seed=0):.1f} steps/s")
        return
    rates: dict[str, list[float]] = {name: [] for name in _NAMES}
    _steps_per_second("dppo", 4096, 99)  # warm-up: imports, allocator, kernels
    for rep in range(args.reps):
        for name in _NAMES if rep % 2 == 0 else _NAMES[::-1]:
            rates[name].append(_steps_per_second(name, args.steps, seed=rep))
            print(f"rep {rep} {name:16s} {rates[name][-1]:8.1f} steps/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name in _NAMES:
        print(f"{name:16s} median {medians[name]:8.1f} steps/s")
    for name in _NAMES[1:]:
        # Per repetition, so that a slow stretch of the machine cancels in each ratio.
        paired = statistics.median(d / p for d, p in zip(rates[name], rates["ppo"], strict=True))
        print(f"ratio {name}/ppo = {medians[name] / medians['ppo']:.3f} of medians, "
              f"{paired:.3f} paired (target >= 1.0)")  # fmt: skip


if __name__ == "__main__":
    main()
