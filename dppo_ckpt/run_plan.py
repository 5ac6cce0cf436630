"""What a ``dppo-ckpt train`` run will do, decided before anything heavy is imported.

Its defaults are shown in ``--help``; the model's own are those of
:class:`~dppo_ckpt.ppo.DistributionalPPO` (a test holds them equal).
"""

from __future__ import annotations

from dppo_ckpt import envs

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CRITIC",
    "DEFAULT_ENV_ID",
    "DEFAULT_EVAL_EPISODES",
    "DEFAULT_TIMESTEPS",
    "DEFAULT_VGS_ALPHA",
    "DEFAULT_VGS_WARMUP_STEPS",
]

DEFAULT_ENV_ID = envs.DEFAULT_ENV_ID
DEFAULT_TIMESTEPS = 100_000
DEFAULT_CHECKPOINT_EVERY = 10_000
DEFAULT_EVAL_EPISODES = 5
# DistributionalPPO's defaults, for --help (importing it would load torch).
DEFAULT_CRITIC = "quantile"
DEFAULT_VGS_ALPHA = 1.0
DEFAULT_VGS_WARMUP_STEPS = 100
