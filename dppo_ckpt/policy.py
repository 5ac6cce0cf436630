"""Actor-critic policy whose critic predicts a return distribution.

The actor is stable-baselines3's, unchanged (Box, Discrete, MultiDiscrete and MultiBinary
actions, gSDE). Features come from any SB3 feature extractor: ``FlattenExtractor`` for flat
observations, ``NatureCNN`` for images (:class:`DistributionalCnnPolicy`),
``CombinedExtractor`` for ``Dict`` observations (:class:`DistributionalMultiInputPolicy`),
shared by actor and critic or one each (``share_features_extractor``). The value head
outputs either ``n_quantiles`` quantile locations (QR, Dabney et al. 2018) or ``n_atoms`` logits
over a fixed support (C51, Bellemare et al. 2017). Everything SB3 itself calls -- ``forward``,
``predict_values``, ``evaluate_actions`` -- still sees a scalar value per state: the
distribution's mean, or its CVaR when ``cvar_alpha`` is set, in return units. The raw head
output, in (optionally normalised) return units, is exposed through
``predict_value_distribution`` and ``evaluate_actions_distributional`` for the distributional
loss.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from dppo_ckpt.distributional import (
    categorical_mean,
    categorical_support,
    cvar_from_categorical,
    cvar_from_quantiles,
    quantile_mean,
)

CRITICS = ("quantile", "categorical")

__all__ = [
    "CRITICS",
    "CustomActorCriticPolicy",
    "DistributionalCnnPolicy",
    "DistributionalMultiInputPolicy",
]


class CustomActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic policy with a distributional value head.

    :param observation_space: Observation space.
    :param action_space: Action space.
    :param lr_schedule: Learning rate schedule (``lr_schedule(1)`` is the initial rate).
    :param critic: ``"quantile"`` or ``"categorical"``.
    :param n_quantiles: Number of quantiles of the quantile critic.
    :param n_atoms: Number of atoms of the categorical critic.
    :param v_min: Lower end of the categorical support (normalised units when returns are
        normalised).
    :param v_max: Upper end of the categorical support.
    :param normalize_returns: Whether the head predicts returns normalised by the running
        statistics kept in the ``return_mean``/``return_var``/``return_count`` buffers.
    :param cvar_alpha: When set, the scalar value is the CVaR at this level instead of the mean.
    :param kwargs: Passed on to :class:`~stable_baselines3.common.policies.ActorCriticPolicy`.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *,
        critic: str = "quantile",
        n_quantiles: int = 32,
        n_atoms: int = 51,
        v_min: float = -10.0,
        v_max: float = 10.0,
        normalize_returns: bool = False,
        cvar_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
        if critic == "quantile" and n_quantiles < 1:
            raise ValueError(f"n_quantiles must be >= 1, got {n_quantiles}")
        if critic == "categorical" and (n_atoms < 2 or not v_min < v_max):
            raise ValueError(
                f"need n_atoms >= 2 and v_min < v_max, got {n_atoms}, {v_min}, {v_max}"
            )
        if cvar_alpha is not None and not 0.0 < cvar_alpha <= 1.0:
            raise ValueError(f"cvar_alpha must be in (0, 1], got {cvar_alpha}")
        self.critic = critic
        self.n_quantiles = n_quantiles
        self.n_atoms = n_atoms
        self.v_min = float(v_min)
        self.v_max = float(v_max)
        self.normalize_returns = normalize_returns
        self.cvar_alpha = cvar_alpha
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        # Running statistics live in buffers so they travel in ``policy.pth`` with the weights
        # and are restored bit-for-bit by ``load_state_dict``; float64 keeps the merge exact
        # enough over millions of returns.
        self.register_buffer("return_mean", th.zeros((), dtype=th.float64))
        self.register_buffer("return_var", th.ones((), dtype=th.float64))
        self.register_buffer("return_count", th.zeros((), dtype=th.float64))
        self.register_buffer(
            "support",
            categorical_support(self.v_min, self.v_max, self.n_atoms)
            if critic == "categorical"
            else th.zeros(0),
            persistent=False,
        )

    @property
    def n_value_outputs(self) -> int:
        """Width of the value head: quantiles or atoms."""
        return self.n_quantiles if self.critic == "quantile" else self.n_atoms

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            critic=self.critic,
            n_quantiles=self.n_quantiles,
            n_atoms=self.n_atoms,
            v_min=self.v_min,
            v_max=self.v_max,
            normalize_returns=self.normalize_returns,
            cvar_alpha=self.cvar_alpha,
        )
        return data

    def _build(self, lr_schedule: Schedule) -> None:
        """Build SB3's networks, widen the value head, then (re)create the optimizer.

        SB3 creates the optimizer at the end of ``_build``; the value head is replaced after
        that, so the optimizer is created again here over the final parameters. Otherwise it
        would hold the discarded scalar head -- the very stale-reference bug this package
        exists to rule out.
        """
        super()._build(lr_schedule)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, self.n_value_outputs)
        if self.ortho_init:
            self.value_net.apply(partial(self.init_weights, gain=1.0))
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    # -- value distribution -------------------------------------------------------------

    def _latents(self, obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        features = self.extract_features(obs)
        if self.share_features_extractor:
            return self.mlp_extractor(features)
        pi_features, vf_features = features
        return (
            self.mlp_extractor.forward_actor(pi_features),
            self.mlp_extractor.forward_critic(vf_features),
        )

    def predict_value_distribution(self, obs: PyTorchObs) -> th.Tensor:
        """Raw value-head output, shape ``(batch, n_value_outputs)``.

        Quantile locations for the quantile critic, logits over ``support`` for the
        categorical critic; in normalised return units when ``normalize_returns``.
        """
        features = super(ActorCriticPolicy, self).extract_features(obs, self.vf_features_extractor)
        return self.value_net(self.mlp_extractor.forward_critic(features))

    def distribution_mean(self, value_out: th.Tensor) -> th.Tensor:
        """Mean of the predicted distribution, shape ``(batch,)``, in head units."""
        if self.critic == "quantile":
            return quantile_mean(value_out)
        return categorical_mean(th.softmax(value_out, dim=-1), self.support)

    def distribution_cvar(self, value_out: th.Tensor, alpha: float) -> th.Tensor:
        """Lower-tail CVaR at level ``alpha`` of the predicted distribution, in head units."""
        if self.critic == "quantile":
            return cvar_from_quantiles(value_out, alpha)
        return cvar_from_categorical(th.softmax(value_out, dim=-1), self.support, alpha)

    def scalar_value(self, value_out: th.Tensor) -> th.Tensor:
        """The scalar value SB3 uses for GAE, shape ``(batch, 1)``, in return units."""
        if self.cvar_alpha is None:
            value = self.distribution_mean(value_out)
        else:
            value = self.distribution_cvar(value_out, self.cvar_alpha)
        return self.denormalize(value).unsqueeze(-1)

    # -- return normalisation -----------------------------------------------------------

    def normalize(self, returns: th.Tensor) -> th.Tensor:
        """Map returns to head units with the running statistics (identity when off)."""
        if not self.normalize_returns:
            return returns
        std = th.sqrt(self.return_var + 1e-8)
        return ((returns.double() - self.return_mean) / std).to(returns.dtype)

    def denormalize(self, value: th.Tensor) -> th.Tensor:
        """Map head units back to returns (identity when off)."""
        if not self.normalize_returns:
            return value
        std = th.sqrt(self.return_var + 1e-8)
        return (value.double() * std + self.return_mean).to(value.dtype)

    @th.no_grad()
    def update_return_statistics(self, returns: th.Tensor | np.ndarray) -> None:
        """Merge a batch of returns into the running mean/variance (Chan et al. parallel form)."""
        batch = th.as_tensor(np.asarray(returns), dtype=th.float64).flatten()
        if batch.numel() == 0:
            return
        batch_mean = batch.mean()
        batch_var = batch.var(unbiased=False)
        batch_count = th.tensor(float(batch.numel()), dtype=th.float64)
        total = self.return_count + batch_count
        delta = batch_mean - self.return_mean
        new_mean = self.return_mean + delta * batch_count / total
        m2 = (
            self.return_var * self.return_count
            + batch_var * batch_count
            + delta.square() * self.return_count * batch_count / total
        )
        self.return_mean.copy_(new_mean)
        self.return_var.copy_(m2 / total)
        self.return_count.copy_(total)

    # -- SB3 interface --------------------------------------------------------------------

    def forward(
        self, obs: th.Tensor, deterministic: bool = False
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions, scalar values ``(batch, 1)`` and log-probabilities, as SB3 expects."""
        latent_pi, latent_vf = self._latents(obs)
        values = self.scalar_value(self.value_net(latent_vf))
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        return actions, values, log_prob

    def evaluate_actions_distributional(
        self, obs: PyTorchObs, actions: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Raw value-head output, log-probability and entropy of ``actions``."""
        latent_pi, latent_vf = self._latents(obs)
        distribution = self._get_action_dist_from_latent(latent_pi)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def evaluate_actions(
        self, obs: PyTorchObs, actions: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """SB3's contract: scalar values ``(batch, 1)``, log-probability and entropy."""
        value_out, log_prob, entropy = self.evaluate_actions_distributional(obs, actions)
        return self.scalar_value(value_out), log_prob, entropy

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Scalar values ``(batch, 1)`` in return units, as SB3 expects."""
        return self.scalar_value(self.predict_value_distribution(obs))


class DistributionalCnnPolicy(CustomActorCriticPolicy):
    """:class:`CustomActorCriticPolicy` for image observations (``"CnnPolicy"``): NatureCNN
    features (Mnih et al. 2015) by default, as SB3's ``ActorCriticCnnPolicy``."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *,
        features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class DistributionalMultiInputPolicy(CustomActorCriticPolicy):
    """:class:`CustomActorCriticPolicy` for ``Dict`` observations (``"MultiInputPolicy"``):
    SB3's ``CombinedExtractor`` (a CNN per image key, flattening for the others) by default."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )
