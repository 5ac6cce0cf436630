"""Steps per second of DistributionalPPO (quantile and categorical critic, scaler on) against
SB3's PPO.

    python -m benchmarks.throughput [--steps 8192] [--reps 3]
    python -m benchmarks.throughput --only dppo [--steps 16384]

All run RL Zoo's tuned Pendulum-v1 settings (4 envs, n_steps=1024, n_epochs=10, lr=1e-3,
gamma=0.9, gSDE) on one CPU thread, alternating in the same process, so that machine noise
hits them alike. Prints the median steps/s of each, per second of wall time and of the
process's CPU time, and the ratios DPPO/PPO paired by repetition (target >= 1.0).
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


def _steps_per_second(name: str, steps: int, seed: int) -> tuple[float, float]:
    """Steps per second of wall time and per second of this process's CPU time (which other
    processes on a shared machine disturb far less)."""
    model = make_algorithm(name, seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    model.learn(steps)
    return steps / (time.perf_counter() - start), steps / (time.process_time() - start_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8192, help="timesteps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--only", choices=_NAMES, help="train this one algorithm once")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only is not None:
        wall, cpu = _steps_per_second(args.only, args.steps, seed=0)
        print(f"{args.only} {wall:.1f} steps/s, {cpu:.1f} steps per CPU second")
        return
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in _NAMES}
    _steps_per_second("dppo", 4096, 99)  # warm-up: imports, allocator, kernels
    for rep in range(args.reps):
        for name in _NAMES if rep % 2 == 0 else _NAMES[::-1]:
            rates[name].append(_steps_per_second(name, args.steps, seed=rep))
            wall, cpu = rates[name][-1]
            print(f"rep {rep} {name:16s} {wall:8.1f} steps/s {cpu:8.1f} per CPU s", flush=True)
    for name in _NAMES:
        wall = statistics.median(r[0] for r in rates[name])
        cpu = statistics.median(r[1] for r in rates[name])
        print(f"{name:16s} median {wall:8.1f} steps/s {cpu:8.1f} per CPU s")
    for name in _NAMES[1:]:
        # Per repetition, so that a slow stretch of the machine cancels in each ratio.
        pairs = list(zip(rates[name], rates["ppo"], strict=True))
        wall = statistics.median(d[0] / p[0] for d, p in pairs)
        cpu = statistics.median(d[1] / p[1] for d, p in pairs)
        print(f"ratio {name}/ppo = {wall:.3f} wall, {cpu:.3f} CPU, paired medians "
              "(target >= 1.0)")


if __name__ == "__main__":
    main()
