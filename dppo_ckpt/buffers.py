"""Rollout buffer that also hands out the value distribution predicted at rollout time.

``clip_range_vf`` clips the new distribution against the one the critic predicted when the
rollout was collected. The parameters do not change between the end of ``collect_rollouts``
and the start of ``train``, so that prediction is recomputed in one batched pass when training
starts instead of being stored step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer


class DistributionalRolloutBufferSamples(NamedTuple):
    """SB3's ``RolloutBufferSamples`` plus the rollout-time value-head output."""

    observations: th.Tensor
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_value_distributions: th.Tensor | None


class DistributionalRolloutBuffer(RolloutBuffer):
    """:class:`~stable_baselines3.common.buffers.RolloutBuffer` with rollout-time distributions."""

    value_distributions: th.Tensor | None

    def reset(self) -> None:
        super().reset()
        self.value_distributions = None

    @th.no_grad()
    def compute_value_distributions(
        self, predict: Callable[[th.Tensor], th.Tensor], chunk_size: int = 4096
    ) -> None:
        """Store ``predict(observations)`` in the flattened order ``get()`` samples from."""
        observations = (
            self.swap_and_flatten(self.observations)
            if not self.generator_ready
            else (self.observations)
        )
        outputs = [
            predict(self.to_torch(observations[start : start + chunk_size]))
            for start in range(0, len(observations), chunk_size)
        ]
        self.value_distributions = th.cat(outputs).detach()

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env=None
    ) -> DistributionalRolloutBufferSamples:
        samples = super()._get_samples(batch_inds, env)
        old = None
        if self.value_distributions is not None:
            old = self.value_distributions[th.as_tensor(batch_inds, device=self.device)]
        return DistributionalRolloutBufferSamples(*samples, old_value_distributions=old)
