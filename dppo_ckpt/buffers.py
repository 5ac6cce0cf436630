"""Rollout buffers that also hand out the value distribution predicted at rollout time.

``clip_range_vf`` clips the new distribution against the one the critic predicted when the
rollout was collected. The parameters do not change between the end of ``collect_rollouts``
and the start of ``train``, so that prediction is recomputed in one batched pass when training
starts instead of being stored step by step. :class:`DistributionalRolloutBuffer` holds
array observations, :class:`DistributionalDictRolloutBuffer` ``Dict`` ones.
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


class DistributionalBufferMixin:
    """What both buffers add to SB3's: the rollout-time value-head output, by sample."""

    value_distributions: th.Tensor | None
    observations: Any
    generator_ready: bool

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.value_distributions = None

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

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: Any = None
    ) -> DistributionalRolloutBufferSamples:
        samples = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        old = None
        if self.value_distributions is not None:
            index = th.as_tensor(batch_inds, device=self.device)  # type: ignore[attr-defined]
            old = self.value_distributions[index]
        return DistributionalRolloutBufferSamples(*samples, old_value_distributions=old)


class DistributionalRolloutBuffer(DistributionalBufferMixin, RolloutBuffer):
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
