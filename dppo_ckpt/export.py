"""A pickle-free export of a policy for deployment, and the predict-only loader.

``export_policy(MODEL.zip, OUT/)`` writes two files:

- ``policy.safetensors``: the policy's weights and buffers (the safetensors format holds
  tensors and a JSON header, nothing executable);
- ``policy.json``: the policy class, its constructor arguments and the spaces, as plain JSON.
  Classes (activation, feature extractor) are written by name and mapped back through a fixed
  table; floats are written with ``float.hex`` so that bounds survive bit for bit.

``load_policy(OUT)`` rebuilds the policy from those two files only: nothing is unpickled, no
module named by the files is imported. The checkpoint itself is read with the allow-list
loader (:func:`~dppo_ckpt.checkpoint.safe_pickle.safe_load`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

__all__ = ["EXPORT_FORMAT", "ExportError", "export_policy", "load_policy"]

EXPORT_FORMAT: Final = 1
_WEIGHTS: Final = "policy.safetensors"
_SPEC: Final = "policy.json"
# Constructor arguments that concern training only: the predict-only policy gets defaults.
_TRAINING_ONLY: Final = frozenset({"lr_schedule", "optimizer_class", "optimizer_kwargs"})


class ExportError(Exception):
    """The model cannot be exported, or an export cannot be loaded (exit code 2)."""


def _classes() -> dict[str, Any]:
    """Every class an export may name, by its qualified name."""
    import torch.nn as nn
    from stable_baselines3.common import policies, torch_layers

    from dppo_ckpt import policy

    found: list[Any] = [
        policy.CustomActorCriticPolicy,
        policy.DistributionalCnnPolicy,
        policy.DistributionalMultiInputPolicy,
        policies.ActorCriticPolicy,
        policies.ActorCriticCnnPolicy,
        policies.MultiInputActorCriticPolicy,
        torch_layers.FlattenExtractor,
        torch_layers.NatureCNN,
        torch_layers.CombinedExtractor,
        nn.Tanh,
        nn.ReLU,
        nn.ELU,
        nn.LeakyReLU,
        nn.GELU,
        nn.SiLU,
        nn.Sigmoid,
        nn.Identity,
    ]
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in found}


# -- spaces and values as JSON ----------------------------------------------------------------


def _float(value: float) -> str:
    return float(value).hex()


def _space_to_json(space: Any) -> dict[str, Any]:
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": [_float(v) for v in space.low.ravel()],
            "high": [_float(v) for v in space.high.ravel()],
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {
            "type": "MultiDiscrete",
            "nvec": space.nvec.tolist(),
            "start": space.start.tolist(),
            "dtype": str(space.dtype),
        }
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": space.n if isinstance(space.n, int) else list(space.n)}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: _space_to_json(v) for k, v in space.spaces.items()}}
    raise ExportError(f"cannot export a {type(space).__name__} space")


def _space_from_json(doc: Mapping[str, Any]) -> Any:
    import numpy as np
    from gymnasium import spaces

    kind = doc.get("type")
    if kind == "Box":
        shape = tuple(doc["shape"])
        low = np.array([float.fromhex(v) for v in doc["low"]]).reshape(shape)
        high = np.array([float.fromhex(v) for v in doc["high"]]).reshape(shape)
        return spaces.Box(low.astype(doc["dtype"]), high.astype(doc["dtype"]), shape, doc["dtype"])
    if kind == "Discrete":
        return spaces.Discrete(doc["n"], start=doc["start"])
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(doc["nvec"], dtype=doc["dtype"], start=doc["start"])
    if kind == "MultiBinary":
        return spaces.MultiBinary(doc["n"])
    if kind == "Dict":
        return spaces.Dict({k: _space_from_json(v) for k, v in doc["spaces"].items()})
    raise ExportError(f"unknown space type {kind!r}")


def _value_to_json(value: Any, names: Mapping[Any, str]) -> Any:
    if isinstance(value, type):
        if value not in names:
            raise ExportError(f"cannot export a policy built with {value.__qualname__}")
        return {"class": names[value]}
    if isinstance(value, float):
        return {"float": _float(value)}
    if isinstance(value, dict):
        return {"dict": {str(k): _value_to_json(v, names) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_value_to_json(v, names) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise ExportError(f"cannot export a constructor argument of type {type(value).__name__}")


def _value_from_json(doc: Any, classes: Mapping[str, Any]) -> Any:
    if isinstance(doc, dict):
        if "class" in doc:
            if doc["class"] not in classes:
                raise ExportError(
                    f"the export names a class this version cannot build: {doc['class']}"
                )
            return classes[doc["class"]]
        if "float" in doc:
            return float.fromhex(doc["float"])
        return {k: _value_from_json(v, classes) for k, v in doc["dict"].items()}
    if isinstance(doc, list):
        return [_value_from_json(v, classes) for v in doc]
    return doc


# -- export and load -------------------------------------------------------------------------


def export_policy(model_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the policy of a checkpoint as ``OUT/policy.safetensors`` and ``OUT/policy.json``.

    :param model_path: the checkpoint; loaded with the allow-list loader (no code runs).
    :param out: the folder to write (created if missing; existing export files are replaced
        atomically).
    :return: the folder.
    :raises ExportError: the policy uses something an export cannot describe.
    """
    from safetensors.torch import save

    from dppo_ckpt.atomic import write_atomically
    from dppo_ckpt.checkpoint.safe_pickle import safe_load

    model = safe_load(model_path, device="cpu")
    policy = model.policy
    names = {cls: name for name, cls in _classes().items()}
    policy_class = type(policy)
    if policy_class not in names:
        raise ExportError(f"cannot export a {policy_class.__qualname__} policy")
    params = policy._get_constructor_parameters()
    spec = {
        "format": EXPORT_FORMAT,
        "policy_class": names[policy_class],
        "observation_space": _space_to_json(params.pop("observation_space")),
        "action_space": _space_to_json(params.pop("action_space")),
        "kwargs": {
            key: _value_to_json(value, names)
            for key, value in params.items()
            if key not in _TRAINING_ONLY
        },
    }
    state = {k: v.detach().contiguous() for k, v in policy.state_dict().items()}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / _WEIGHTS, save(state, metadata={"format": str(EXPORT_FORMAT)}))
    write_atomically(folder / _SPEC, (json.dumps(spec, indent=2) + "\n").encode("utf-8"))
    return folder


def load_policy(folder: str | os.PathLike[str], device: str = "cpu") -> Any:
    """Rebuild an exported policy for prediction (``policy.predict(obs)``), from the JSON and
    the safetensors file only.

    :raises ExportError: the folder is not an export this version can read.
    """
    from safetensors.torch import load

    path = Path(folder)
    try:
        spec = json.loads((path / _SPEC).read_text(encoding="utf-8"))
        weights = load((path / _WEIGHTS).read_bytes())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable export: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"{path}: export format {spec.get('format')!r}, this version reads {EXPORT_FORMAT}"
        )
    classes = _classes()
    policy_class = classes.get(spec["policy_class"])
    if policy_class is None:
        raise ExportError(f"{path}: unknown policy class {spec['policy_class']!r}")
    kwargs = {k: _value_from_json(v, classes) for k, v in spec["kwargs"].items()}
    policy = policy_class(
        _space_from_json(spec["observation_space"]),
        _space_from_json(spec["action_space"]),
        lambda _progress: 0.0,
        **kwargs,
    )
    try:
        policy.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{path}: the weights do not fit the policy: {str(exc).splitlines()[0]}"
        ) from None
    policy.set_training_mode(False)
    return policy.to(device)
