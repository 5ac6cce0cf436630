"""Variance Gradient Scaler on against off: final return over seeds, and the factor's spread.

Run from the repository root::

    python benchmarks/vgs_ablation.py [--seeds 0 1 2 3 4] [--timesteps 100000] [--episodes 10]
        [--envs Pendulum-v1 CartPole-v1] [--jobs 1] [--output results.json]

For each environment and seed, DistributionalPPO (quantile critic) trains twice with the same
settings and seed, once with the scaler on (its defaults) and once off. ``Pendulum-v1`` uses
RL Zoo's tuned PPO settings (benchmarks/_pendulum.py, as ``dppo-ckpt train``), ``CartPole-v1``
RL Zoo's PPO settings with constant schedules (8 envs, n_steps 32, minibatch 256, 20 epochs,
lr 1e-3, clip 0.2, gamma 0.98, GAE 0.8). Each final policy is evaluated on 10 deterministic
episodes of a fresh environment. The script prints, per environment, the mean +- std over seeds
of the final return for each arm, the target ``mean(on) >= mean(off) - 0.5 * pooled std``
(pooled std = sqrt((std_on^2 + std_off^2) / 2)), and the mean and quartiles of the factor over
all updates after warm-up of the scaler-on runs. ``--jobs`` runs that many trainings at once
(one thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

#: Settings per environment (with the number of parallel environments).
SETTINGS: dict[str, tuple[int, dict[str, Any]]] = {
    "Pendulum-v1": (
        4,
        dict(
            n_steps=1024,
            gae_lambda=0.95,
            gamma=0.9,
            n_epochs=10,
            ent_coef=0.0,
            learning_rate=1e-3,
            clip_range=0.2,
            use_sde=True,
            sde_sample_freq=4,
        ),
    ),
    "CartPole-v1": (
        8,
        dict(
            n_steps=32,
            batch_size=256,
            gae_lambda=0.8,
            gamma=0.98,
            n_epochs=20,
            ent_coef=0.0,
            learning_rate=1e-3,
            clip_range=0.2,
        ),
    ),
}


def _one_run(env_id: str, seed: int, scaler_on: bool, timesteps: int, episodes: int) -> dict:
    """Train and evaluate one model; the final return and the factors after warm-up."""
    import gymnasium as gym
    import torch
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dppo_ckpt import DistributionalPPO

    torch.set_num_threads(1)
    n_envs, settings = SETTINGS[env_id]
    env = DummyVecEnv([lambda: gym.make(env_id) for _ in range(n_envs)])
    env.seed(seed)
    model = DistributionalPPO(
        "MlpPolicy",
        env,
        seed=seed,
        device="cpu",
        variance_gradient_scaling=scaler_on,
        **settings,
    )
    factors: list[float] = []
    scaler = model._variance_gradient_scaler
    if scaler is not None:
        compute = scaler.compute_scale

        def recording() -> float:
            factor = compute()
            if scaler.step_count > scaler.warmup_steps:
                factors.append(factor)
            return factor

        scaler.compute_scale = recording  # type: ignore[method-assign]
    started = time.perf_counter()
    model.learn(timesteps)
    eval_env = DummyVecEnv([lambda: Monitor(gym.make(env_id))])
    eval_env.seed(10_000 + seed)
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=True)
    return {
        "env": env_id,
        "seed": seed,
        "vgs": scaler_on,
        "final_return": float(mean),
        "factors": factors,
        "seconds": time.perf_counter() - started,
    }


def _quartiles(values: list[float]) -> list[float]:
    return list(statistics.quantiles(values, n=4, method="inclusive"))


def summarise(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per environment: mean and std of the final return per arm, the target, the factor."""
    out: dict[str, dict[str, Any]] = {}
    for env_id in dict.fromkeys(run["env"] for run in runs):
        arms = {}
        for on in (True, False):
            returns = [r["final_return"] for r in runs if r["env"] == env_id and r["vgs"] is on]
            std = statistics.stdev(returns) if len(returns) > 1 else 0.0
            arms["on" if on else "off"] = (statistics.fmean(returns), std, len(returns))
        pooled = math.sqrt((arms["on"][1] ** 2 + arms["off"][1] ** 2) / 2)
        factors = [f for r in runs if r["env"] == env_id and r["vgs"] for f in r["factors"]]
        out[env_id] = {
            "on": arms["on"],
            "off": arms["off"],
            "pooled_std": pooled,
            "target": arms["off"][0] - 0.5 * pooled,
            "target_met": arms["on"][0] >= arms["off"][0] - 0.5 * pooled,
            "factor_mean": statistics.fmean(factors) if factors else None,
            "factor_quartiles": _quartiles(factors) if len(factors) > 1 else None,
            "factor_updates": len(factors),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--envs", nargs="+", default=list(SETTINGS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="write every run as JSON")
    args = parser.parse_args()
    unknown = [env for env in args.envs if env not in SETTINGS]
    if unknown:
        print(f"unknown environment(s) {unknown}; known: {list(SETTINGS)}", file=sys.stderr)
        return 2
    if args.timesteps < 1 or args.episodes < 1 or args.jobs < 1:
        print("--timesteps, --episodes and --jobs must be >= 1", file=sys.stderr)
        return 2
    # Seed by seed, both arms next to each other, so that drift in machine load hits both.
    plan = [
        (env_id, seed, on, args.timesteps, args.episodes)
        for env_id in args.envs
        for seed in args.seeds
        for on in (True, False)
    ]
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(_one_run, *zip(*plan, strict=True)):
            runs.append(run)
            factors = run["factors"]
            factor = f", factor mean {statistics.fmean(factors):.3f}" if factors else ""
            print(
                f"{run['env']:12s} seed {run['seed']} vgs {'on ' if run['vgs'] else 'off'} "
                f"final return {run['final_return']:8.1f} ({run['seconds']:.0f} s{factor})",
                flush=True,
            )
    summary = summarise(runs)
    for env_id, row in summary.items():
        (on_mean, on_std, n), (off_mean, off_std, _) = row["on"], row["off"]
        print(f"{env_id}: {n} seeds, {args.timesteps} steps, {args.episodes} episodes each")
        print(f"  VGS on  {on_mean:8.1f} +- {on_std:6.1f}")
        print(f"  VGS off {off_mean:8.1f} +- {off_std:6.1f}")
        verdict = "met" if row["target_met"] else "NOT met"
        print(f"  target mean(on) >= {row['target']:.1f} (off - 0.5 x pooled std): {verdict}")
        if row["factor_quartiles"] is not None:
            q1, q2, q3 = row["factor_quartiles"]
            print(
                f"  factor over {row['factor_updates']} updates after warm-up: mean "
                f"{row['factor_mean']:.3f}, quartiles {q1:.3f} {q2:.3f} {q3:.3f}"
            )
    if args.output is not None:
        slim = [{k: v for k, v in run.items() if k != "factors"} for run in runs]
        args.output.write_text(json.dumps({"runs": slim, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
