"""dppo-ckpt: distributional PPO with a Variance Gradient Scaler, and checkpoints you can trust.

Heavy imports (torch, stable-baselines3) happen lazily so that the static checkpoint tools
(`dppo-ckpt verify --static`, `inspect`) start fast and never import torch.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

__all__ = [
    "CustomActorCriticPolicy",
    "DistributionalPPO",
    "VarianceGradientScaler",
    "__version__",
    "export_policy",
    "load_policy",
]

_LAZY = {
    "VarianceGradientScaler": "dppo_ckpt.vgs",
    "DistributionalPPO": "dppo_ckpt.ppo",
    "CustomActorCriticPolicy": "dppo_ckpt.policy",
    "export_policy": "dppo_ckpt.export",
    "load_policy": "dppo_ckpt.export",
}

if TYPE_CHECKING:
    from dppo_ckpt.export import export_policy, load_policy
    from dppo_ckpt.policy import CustomActorCriticPolicy
    from dppo_ckpt.ppo import DistributionalPPO
    from dppo_ckpt.vgs import VarianceGradientScaler


def _apply_numerics_from_environment() -> None:
    # Portable numerics only take effect before torch and numpy load, and this package is
    # often imported first; so the variable is honoured here, once.
    from dppo_ckpt import numerics

    if os.environ.get(numerics.NUMERICS_ENV, "").strip().lower() != numerics.PORTABLE:
        return
    try:
        numerics.use_portable_numerics()
    except numerics.NumericsError as exc:
        warnings.warn(str(exc), RuntimeWarning, stacklevel=3)


_apply_numerics_from_environment()


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dppo_ckpt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
