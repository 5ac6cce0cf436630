"""How the Variance Gradient Scaler's factor is distributed on the default Pendulum-v1 run.

Run from the repository root::

    python benchmarks/vgs_factor.py [--timesteps 40960] [--seed 0] [--alpha A] [--compare-off]

The settings of ``dppo-ckpt train`` for ``Pendulum-v1`` (RL Zoo's tuned PPO, 4 environments,
n_steps 1024, 10 epochs, minibatch 64, lr 1e-3, gSDE; see benchmarks/_pendulum.py), quantile
critic, scaler on with its defaults. Every minibatch update's factor is recorded; over the
updates after warm-up the script prints the most frequent value and its share (target: no
single value, a bound included, on more than 80% of the updates), the shares at ``min_scale``
and at 1, the mean and the quartiles, and the parameter distance ``||theta_end - theta_0||``.
With ``--compare-off`` the same seed also runs with the scaler off, for that distance.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from typing import Any

import torch

from benchmarks._pendulum import ZOO_PENDULUM, make_env
from dppo_ckpt import DistributionalPPO

#: The target: no single factor value on more than this share of the updates after warm-up.
MAX_SHARE = 0.8


def _distance(start: list[torch.Tensor], model: DistributionalPPO) -> float:
    end = [p.detach() for p in model.policy.parameters()]
    return float(
        torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(end, start, strict=True)))
    )


def run(timesteps: int, seed: int, scaler_on: bool, **vgs: Any) -> dict[str, Any]:
    """Train one model; the factors of its updates after warm-up and its parameter distance."""
    model = DistributionalPPO(
        "MlpPolicy",
        make_env(seed),
        seed=seed,
        variance_gradient_scaling=scaler_on,
        **vgs,
        **ZOO_PENDULUM,
    )
    start = [p.detach().clone() for p in model.policy.parameters()]
    factors: list[float] = []
    scaler = model._variance_gradient_scaler
    if scaler is not None:
        compute = scaler.compute_scale

        def recording() -> float:
            factor = compute()
            if scaler.step_count > scaler.warmup_steps:
                factors.append(factor)
            return factor

        # An instance attribute: the model's own scaler records, nothing else changes.
        scaler.compute_scale = recording  # type: ignore[method-assign]
    model.learn(timesteps)
    return {
        "factors": factors,
        "distance": _distance(start, model),
        "min_scale": None if scaler is None else scaler.min_scale,
        "updates": None if scaler is None else scaler.step_count,
    }


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=40_960)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--alpha", type=float, default=None, help="vgs_alpha (default: the model's)"
    )
    parser.add_argument("--compare-off", action="store_true", help="also run with the scaler off")
    args = parser.parse_args()
    if args.timesteps < 1:
        print(f"--timesteps must be >= 1, got {args.timesteps}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    vgs = {} if args.alpha is None else {"vgs_alpha": args.alpha}
    on = run(args.timesteps, args.seed, True, **vgs)
    factors = on["factors"]
    if not factors:
        print("no update after warm-up: train for more timesteps", file=sys.stderr)
        return 2
    value, count = collections.Counter(factors).most_common(1)[0]
    share = count / len(factors)
    at_min = sum(f == on["min_scale"] for f in factors) / len(factors)
    at_one = sum(f == 1.0 for f in factors) / len(factors)
    q1, q2, q3 = _quartiles(factors)
    print(f"updates {on['updates']}, after warm-up {len(factors)}")
    print(f"most frequent factor {value:.6g} on {share:.1%} of them (target <= {MAX_SHARE:.0%})")
    print(f"at min_scale {at_min:.1%}, at 1 {at_one:.1%}")
    print(f"factor mean {statistics.fmean(factors):.3f}, quartiles {q1:.3f} {q2:.3f} {q3:.3f}")
    print(f"||theta_end - theta_0|| scaler on:  {on['distance']:.2f}")
    if args.compare_off:
        off = run(args.timesteps, args.seed, False)
        print(f"||theta_end - theta_0|| scaler off: {off['distance']:.2f}")
    return 0 if share <= MAX_SHARE else 1


if __name__ == "__main__":
    sys.exit(main())
