"""What the progress line of ``train`` costs an update: ``DistributionalPPO.train()`` with and
without its per-minibatch hook feeding a live progress line.

Run from the repository root::

    python benchmarks/progress_hook.py [--reps 10]

The default run's settings (RL Zoo's Pendulum-v1: 4 environments x 1,024 steps, 10 epochs of
64 minibatches of 64). One rollout is collected once; then ``train()`` runs repeatedly on it,
with the hook on and off in alternation (so drift in machine load hits both alike), on CPU
with one thread. The hook draws the line at most ten times a second to a terminal console
writing into memory. It prints the median time of an update each way, with quartiles, and
the ratio with / without, pair by pair (target: 1.00 within noise).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
from rich.console import Console

from benchmarks._pendulum import make_algorithm
from dppo_ckpt.ppo import DistributionalPPO
from dppo_ckpt.train_progress import RunProgress


class _NoInterrupt:
    count = 0


def _time_update(model: DistributionalPPO) -> float:
    started = time.perf_counter()
    model.train()
    return time.perf_counter() - started


def _quartiles(times: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(times, n=4)
    return f"median {median * 1e3:8.2f} ms  (quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="timed updates per variant")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = make_algorithm("dppo", seed=0)
    assert isinstance(model, DistributionalPPO)
    rollout = model.n_steps * model.n_envs
    model.learn(rollout)  # fills the rollout buffer that every timed update trains on
    batches = -(-rollout // model.batch_size)
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    progress = RunProgress(console, rollout, rollout, _NoInterrupt(), "1.000")
    off: list[float] = []
    on: list[float] = []
    with progress:
        progress.begin_update(rollout, model.n_epochs, batches)
        _time_update(model)  # warm-up
        for _ in range(args.reps):
            model.update_progress = None
            off.append(_time_update(model))
            model.update_progress = progress.minibatch
            on.append(_time_update(model))
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    print(f"update without the hook: {_quartiles(off)}")
    print(f"update with the hook:    {_quartiles(on)}")
    print(f"ratio with / without (pair by pair): median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
