"""Steps per second of training in portable numerics against the default (native) numerics.

    python -m benchmarks.numerics_cost [--steps 8192] [--reps 4]

Each measurement is a fresh process (the modes are fixed when torch loads), alternating
native, native-1thread, portable, then the reverse, so that machine noise hits all alike.
Every process trains DistributionalPPO (quantile critic, scaler on) on RL Zoo's tuned
Pendulum-v1 settings (4 envs, n_steps=1024, 10 epochs, gSDE), as ``dppo-ckpt train`` does,
and times ``learn()`` alone. Native numerics use the libraries' own choices (kernels for this
CPU, torch's default thread count); native-1thread the same on one thread, which isolates the
cost of portable's kernels from that of its thread count; portable ones are those of
:mod:`dppo_ckpt.numerics`. Prints the median steps/s of each and the ratios; portable is the
default of ``train`` and ``cycle`` when portable/native is at least 0.85.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = """
import sys, time
from dppo_ckpt import numerics
mode = sys.argv[1]
numerics.apply_numerics("native" if mode.startswith("native") else mode)
import torch
if mode == "native-1thread":
    torch.set_num_threads(1)
from benchmarks._pendulum import make_algorithm
steps = int(sys.argv[2])
model = make_algorithm("dppo", seed=0)
model.learn(2048)  # warm-up: allocator, kernels, first rollout
start = time.perf_counter()
model.learn(steps, reset_num_timesteps=False)
print(steps / (time.perf_counter() - start))
"""


def _steps_per_second(mode: str, steps: int) -> float:
    env = {key: value for key, value in os.environ.items() if key != "DPPO_CKPT_NUMERICS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(steps)],
        env=env,
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8192, help="timed steps per process")
    parser.add_argument("--reps", type=int, default=4, help="processes per mode")
    args = parser.parse_args()
    modes = ("native", "native-1thread", "portable")
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(args.reps):
        for mode in modes if rep % 2 == 0 else tuple(reversed(modes)):
            rates[mode].append(_steps_per_second(mode, args.steps))
            print(f"rep {rep} {mode:14s} {rates[mode][-1]:8.1f} steps/s", flush=True)
    medians = {mode: statistics.median(rates[mode]) for mode in modes}
    for mode in modes:
        print(f"{mode:14s} median {medians[mode]:8.1f} steps/s")
    print(
        f"ratio portable/native = {medians['portable'] / medians['native']:.3f} "
        "(portable is the default at >= 0.85)"
    )
    print(
        f"ratio portable/native-1thread = "
        f"{medians['portable'] / medians['native-1thread']:.3f} (the kernels alone)"
    )


if __name__ == "__main__":
    main()
