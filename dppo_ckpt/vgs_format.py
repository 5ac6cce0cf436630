"""The Variance Gradient Scaler's stored shape, without torch: one place for its keys,
orders, defaults and versions.

:class:`dppo_ckpt.vgs.VarianceGradientScaler` builds its state from these names, and the
code-free checkpoint tools (:mod:`dppo_ckpt.checkpoint`, migration above all) read and write
the same shape without importing torch. Keeping a single copy means a new attribute cannot
reach one side and not the other.

Two stored forms exist:

- the *pickled attributes* of the scaler object (checkpoint layout 1 kept the pickled object
  in the ``data`` entry :data:`SCALER_ENTRY`), in :data:`PICKLED_ORDER`;
- the *state dict* (:meth:`VarianceGradientScaler.state_dict`, keys :data:`STATE_KEYS`),
  which checkpoint layout 2 stores as a torch-saved parameter of the model, the member
  :data:`SCALER_MEMBER`, loaded with ``torch.load(weights_only=True)``.

The scaler's *state format* (:data:`STATE_FORMAT_VERSION`) is what its fields mean; the
checkpoint *layout* (:mod:`dppo_ckpt.checkpoint.metadata`) is where they are stored. They
change independently.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "CONFIG_KEYS",
    "CONFIG_KEYS_V1",
    "DEFAULT_LEVEL_BETA",
    "FORMAT_1_ONLY",
    "LEGACY_STATE_KEYS",
    "PICKLED_DEFAULTS",
    "PICKLED_ORDER",
    "SCALER_ENTRY",
    "SCALER_MEMBER",
    "SCALER_PARAMETER",
    "STATE_FORMAT_VERSION",
    "STATE_KEYS",
    "STATE_KEYS_V1",
    "pickled_to_state_dict",
    "state_dict_to_pickled",
]

#: The scaler state format the current code writes.
STATE_FORMAT_VERSION: Final = 2

#: The ``data`` entry of DistributionalPPO's pickled scaler (checkpoint layout 1).
SCALER_ENTRY: Final = "_variance_gradient_scaler"
#: The name of the scaler's state dict among the model's torch-saved parameters (layout 2),
#: and the zip member SB3 writes it to.
SCALER_PARAMETER: Final = "vgs"
SCALER_MEMBER: Final = f"{SCALER_PARAMETER}.pth"

#: The scaler's hyperparameters, in the order of its ``config``.
CONFIG_KEYS: Final = (
    "beta",
    "alpha",
    "eps",
    "warmup_steps",
    "quantile",
    "level_beta",
    "min_scale",
    "enabled",
)
#: The keys of :meth:`VarianceGradientScaler.state_dict`, in order.
STATE_KEYS: Final = (
    "format_version",
    "config",
    "step_count",
    "scaling_factor",
    "noise_ratio",
    "level",
    "post_warmup_steps",
    "at_min_steps",
    "at_one_steps",
    "scale_sum",
    "exp_avg",
    "exp_avg_sq",
)
#: The keys of a format-1 state dict, and its configuration keys (an absolute cap,
#: ``variance_cap``, in place of the running level's ``level_beta``).
STATE_KEYS_V1: Final = (
    "format_version",
    "config",
    "step_count",
    "scaling_factor",
    "noise_ratio",
    "exp_avg",
    "exp_avg_sq",
)
CONFIG_KEYS_V1: Final = tuple(key if key != "level_beta" else "variance_cap" for key in CONFIG_KEYS)
#: Format 1's pickled attributes that format 2 dropped.
FORMAT_1_ONLY: Final = ("variance_cap",)

DEFAULT_LEVEL_BETA: Final = 0.99

#: The pickled attributes of the current format, in the order the scaler creates them.
PICKLED_ORDER: Final = (
    "_state_version",
    *CONFIG_KEYS,
    "_step_count",
    "_scaling_factor",
    "_noise_ratio",
    "_level",
    "_post_warmup_steps",
    "_at_min_steps",
    "_at_one_steps",
    "_scale_sum",
    "_exp_avg",
    "_exp_avg_sq",
)
#: Values an older pickle lacks, as ``__setstate__`` fills them in. A pickle without
#: ``_state_version`` is format 1: it had an absolute cap and no running level, so the level
#: starts unset and the counters of the factor's distribution start at zero.
PICKLED_DEFAULTS: Final[dict[str, Any]] = {
    "_state_version": 1,
    "beta": 0.99,
    "alpha": 1.0,
    "eps": 1e-8,
    "warmup_steps": 100,
    "quantile": 0.9,
    "level_beta": DEFAULT_LEVEL_BETA,
    "min_scale": 0.1,
    "enabled": True,
    "_step_count": 0,
    "_scaling_factor": 1.0,
    "_noise_ratio": 0.0,
    "_level": None,
    "_post_warmup_steps": 0,
    "_at_min_steps": 0,
    "_at_one_steps": 0,
    "_scale_sum": 0.0,
    "_exp_avg": None,
    "_exp_avg_sq": None,
}

#: Attributes the scaler never pickles (live objects, a load-time flag); older checkpoints
#: that hold any of them are legacy.
LEGACY_STATE_KEYS: Final = ("_parameters", "_logger", "_legacy_parameters_dropped")


def pickled_to_state_dict(attributes: dict[str, Any]) -> dict[str, Any]:
    """The current-format state dict of a scaler whose pickled attributes are ``attributes``
    (any format), as unpickling and then :meth:`VarianceGradientScaler.state_dict` would give
    it; values are passed through untouched (tensors, or stand-ins of them).

    :raises KeyError: never for a known format: missing attributes take their defaults.
    """
    merged = {**PICKLED_DEFAULTS, **attributes}
    return {
        "format_version": STATE_FORMAT_VERSION,
        "config": {key: merged[key] for key in CONFIG_KEYS},
        "step_count": merged["_step_count"],
        "scaling_factor": merged["_scaling_factor"],
        "noise_ratio": merged["_noise_ratio"],
        "level": merged["_level"],
        "post_warmup_steps": merged["_post_warmup_steps"],
        "at_min_steps": merged["_at_min_steps"],
        "at_one_steps": merged["_at_one_steps"],
        "scale_sum": merged["_scale_sum"],
        "exp_avg": merged["_exp_avg"],
        "exp_avg_sq": merged["_exp_avg_sq"],
    }


def state_dict_to_pickled(state: dict[str, Any]) -> dict[str, Any]:
    """The pickled attributes of a scaler whose :meth:`VarianceGradientScaler.state_dict` is
    ``state`` (the inverse of :func:`pickled_to_state_dict`); keys it lacks are left out, and
    values pass through untouched, so that a hostile state can be described, not trusted."""
    attributes: dict[str, Any] = {}
    if "format_version" in state:
        attributes["_state_version"] = state["format_version"]
    config = state.get("config")
    if isinstance(config, dict):
        attributes.update((key, value) for key, value in config.items() if isinstance(key, str))
    for key in STATE_KEYS[2:]:
        if key in state:
            attributes[f"_{key}"] = state[key]
    return attributes
