"""Rollout buffers that also hand out the value distribution predicted at rollout time.

``clip_range_vf`` clips the new distribution against the one the critic predicted when the
rollout was collected. The parameters do not change between the end of ``collect_rollouts``
and the start of ``train``, so that prediction is recomputed in one batched pass when training
starts instead of being stored step by step. The critic's targets (returns in head units, or
their two-hot encoding) depend on nothing that changes during ``train`` either, so they are
computed once per rollout too; both are row-wise maps, so every row is the very value a
per-minibatch computation gives. :class:`DistributionalRolloutBuffer` holds array
observations, :class:`DistributionalDictRolloutBuffer` ``Dict`` ones.

On CPU, :class:`DistributionalRolloutBuffer` wraps its flattened arrays as tensors once (no
copy) and gathers each minibatch's rows from them, where SB3 gathers rows with numpy and then
copies every field into a new tensor: the same values, one copy instead of two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import PyTorchObs


class DistributionalRolloutBufferSamples(NamedTuple):
    """SB3's ``RolloutBufferSamples`` plus the rollout-time value-head output."""

    observations: PyTorchObs
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_value_distributions: th.Tensor | None
    value_targets: th.Tensor | None = None


class DistributionalBufferMixin:
    """What both buffers add to SB3's: the rollout-time value-head output, by sample."""

    value_distributions: th.Tensor | None
    value_targets: th.Tensor | None
    observations: Any
    returns: np.ndarray
    generator_ready: bool

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.value_distributions = None
        self.value_targets = None

    def _flat_observations(self) -> Any:
        """The observations in the flattened order ``get()`` samples from (not stored)."""
        raise NotImplementedError  # each buffer below knows its observation layout

    def _observation_chunk(self, flat: Any, start: int, stop: int) -> PyTorchObs:
        """Rows ``start:stop`` of :meth:`_flat_observations`, as tensors."""
        raise NotImplementedError

    @th.no_grad()
    def compute_value_distributions(
        self, predict: Callable[[PyTorchObs], th.Tensor], chunk_size: int = 4096
    ) -> None:
        """Store ``predict(observations)`` in the flattened order ``get()`` samples from."""
        flat = self._flat_observations()
        total = len(next(iter(flat.values())) if isinstance(flat, dict) else flat)
        outputs = [
            predict(self._observation_chunk(flat, start, start + chunk_size))
            for start in range(0, total, chunk_size)
        ]
        self.value_distributions = th.cat(outputs).detach()

    @th.no_grad()
    def compute_value_targets(self, transform: Callable[[th.Tensor], th.Tensor]) -> None:
        """Store ``transform(returns)`` (a row-wise map) in the order ``get()`` samples from."""
        returns = self.returns if self.generator_ready else self.swap_and_flatten(self.returns)
        flat = self.to_torch(returns.flatten())  # type: ignore[attr-defined]
        self.value_targets = transform(flat).detach()

    def _base_samples(self, batch_inds: np.ndarray, env: Any) -> tuple[th.Tensor, ...]:
        """SB3's samples of ``batch_inds``: observations, actions, values, log-probabilities,
        advantages, returns."""
        return tuple(super()._get_samples(batch_inds, env))  # type: ignore[misc]

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: Any = None
    ) -> DistributionalRolloutBufferSamples:
        samples = self._base_samples(batch_inds, env)
        old = targets = None
        if self.value_distributions is not None or self.value_targets is not None:
            index = th.as_tensor(batch_inds, device=self.device)  # type: ignore[attr-defined]
            if self.value_distributions is not None:
                old = self.value_distributions[index]
            if self.value_targets is not None:
                targets = self.value_targets[index]
        return DistributionalRolloutBufferSamples(
            *samples, old_value_distributions=old, value_targets=targets
        )


# The flattened fields SB3's RolloutBuffer samples, in the order of RolloutBufferSamples.
_SAMPLED_FIELDS = ("observations", "actions", "values", "log_probs", "advantages", "returns")


class _CpuFieldTensors:
    """Minibatches of an array buffer on CPU gathered from tensors that share its memory.

    A mixin of its own, so that the buffer class's attributes (which SB3 describes in every
    checkpoint's ``data``) stay as they were.
    """

    _wrapped: tuple[tuple[np.ndarray, ...], tuple[th.Tensor, ...]] | None = None
    device: th.device
    generator_ready: bool

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self._wrapped = None

    def _field_tensors(self) -> tuple[th.Tensor, ...]:
        """The flattened fields as tensors sharing the arrays' memory, as SB3 samples them
        (actions as float32, the scalar fields as one row each); wrapped again whenever a
        field is a new array."""
        arrays = tuple(getattr(self, name) for name in _SAMPLED_FIELDS)
        if self._wrapped is None or any(
            new is not old for new, old in zip(arrays, self._wrapped[0], strict=True)
        ):
            observations, actions, *scalars = arrays
            tensors = (
                th.from_numpy(observations),
                # SB3 casts actions to float32 (a copy only for integer actions).
                th.from_numpy(actions.astype(np.float32, copy=False)),
                *(th.from_numpy(array.reshape(-1)) for array in scalars),
            )
            self._wrapped = (arrays, tensors)
        return self._wrapped[1]

    def _base_samples(self, batch_inds: np.ndarray, env: Any) -> tuple[th.Tensor, ...]:
        if not self.generator_ready or self.device.type != "cpu":
            return super()._base_samples(batch_inds, env)  # type: ignore[misc]
        index = th.from_numpy(np.ascontiguousarray(batch_inds, dtype=np.int64))
        return tuple(tensor.index_select(0, index) for tensor in self._field_tensors())


class DistributionalRolloutBuffer(_CpuFieldTensors, DistributionalBufferMixin, RolloutBuffer):
    """:class:`~stable_baselines3.common.buffers.RolloutBuffer` with rollout-time distributions."""

    def _flat_observations(self) -> np.ndarray:
        if self.generator_ready:
            return self.observations
        return self.swap_and_flatten(self.observations)

    def _observation_chunk(self, flat: np.ndarray, start: int, stop: int) -> th.Tensor:
        return self.to_torch(flat[start:stop])


class DistributionalDictRolloutBuffer(DistributionalBufferMixin, DictRolloutBuffer):
    """:class:`~stable_baselines3.common.buffers.DictRolloutBuffer` with rollout-time
    distributions, for ``Dict`` observation spaces (``MultiInputPolicy``)."""

    def _flat_observations(self) -> dict[str, np.ndarray]:
        if self.generator_ready:
            return dict(self.observations)
        return {key: self.swap_and_flatten(obs) for key, obs in self.observations.items()}

    def _observation_chunk(
        self, flat: dict[str, np.ndarray], start: int, stop: int
    ) -> dict[str, th.Tensor]:
        return {key: self.to_torch(obs[start:stop]) for key, obs in flat.items()}
