"""Distributional PPO with a Variance Gradient Scaler, on stable-baselines3's PPO.

The critic predicts a return distribution (quantile or categorical, see
:mod:`dppo_ckpt.policy` and :mod:`dppo_ckpt.distributional`); the actor update is PPO's clipped
surrogate, unchanged. Every minibatch runs

    backward -> scale = VarianceGradientScaler.compute_scale() -> clip_grad_norm_
             -> VarianceGradientScaler.step(optimizer, scale)

so the scaler's statistics see the raw gradients, and its factor scales this one step's
learning rate, where neither the clipping nor Adam's normalisation can cancel it.

The save/load lifecycle is the point of this module. The scaler is pickled without parameter
references; on construction and on every load it is (re)created *after* the policy and its
optimizer exist, its saved statistics are restored bit-for-bit and it is linked to the live
parameter objects. No setup-complete flag exists, so nothing saved can block that. The
checkpoint also records every random generator's state, so that ``learn(N)``, ``save``,
``load(env=same_env, force_reset=False)``, ``learn(N, reset_num_timesteps=False)`` gives the
parameters of ``learn(2N)`` bit-for-bit on CPU.
"""

from __future__ import annotations

import io
import math
import pathlib
import warnings
import zipfile
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file, open_path, recursive_getattr
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.utils import explained_variance

from dppo_ckpt import numerics
from dppo_ckpt._flat_adam import flat_adam
from dppo_ckpt._foreach import clip_grad_norm, foreach_kernels
from dppo_ckpt.buffers import (
    DistributionalBufferMixin,
    DistributionalDictRolloutBuffer,
    DistributionalRolloutBuffer,
)
from dppo_ckpt.checkpoint.metadata import (
    MAX_METADATA_BYTES,
    METADATA_MEMBER,
    LayoutError,
    MetadataError,
    encode_metadata,
    parse_metadata,
)
from dppo_ckpt.distributional import (
    categorical_cross_entropy,
    clip_quantiles,
    quantile_huber_loss,
    quantile_midpoints,
    shift_and_reproject,
    two_hot,
)
from dppo_ckpt.policy import (
    CRITICS,
    CustomActorCriticPolicy,
    DistributionalCnnPolicy,
    DistributionalMultiInputPolicy,
)
from dppo_ckpt.rng import capture_rng_state, restore_rng_state
from dppo_ckpt.vgs import VarianceGradientScaler
from dppo_ckpt.vgs_format import CONFIG_KEYS, SCALER_ENTRY, SCALER_PARAMETER

numerics.configure_torch()

SelfDistributionalPPO = TypeVar("SelfDistributionalPPO", bound="DistributionalPPO")

MIGRATE_HINT = "run `dppo-ckpt migrate OLD.zip NEW.zip` to rewrite it"

# SB3's torch-saved state dicts of an on-policy algorithm; the scaler's is added to them.
_SB3_STATE_DICTS = ("policy", "policy.optimizer")
# Set while a load restores a layout-1 scaler (pickled in `data`): its file has no `vgs.pth`.
_RESTORED_FROM_DATA = "_vgs_restored_from_data"

# DistributionalPPO keywords that configure the scaler, and its config key for each.
_SCALER_KEYWORDS = {"vgs_beta": "beta", "vgs_alpha": "alpha", "vgs_warmup_steps": "warmup_steps"}


def _floats(values: list[th.Tensor]) -> list[float]:
    """0-dim tensors as Python floats, in one transfer (what ``.item()`` on each gives)."""
    return th.stack(values).tolist() if values else []


def _float32s(values: list[th.Tensor]) -> np.ndarray:
    """0-dim tensors as one numpy array of their dtype (what SB3 logs the KL estimate from)."""
    return th.stack(values).cpu().numpy() if values else np.array([], dtype=np.float32)


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint's scaler still carried pickled parameter copies (fixed on load)."""


class StaleOptimizerError(RuntimeError):
    """The optimizer does not update the policy's own parameter objects."""


class DistributionalPPO(PPO):
    """PPO with a distributional critic and a Variance Gradient Scaler.

    :param policy: ``"MlpPolicy"`` or a subclass of :class:`CustomActorCriticPolicy`.
    :param env: The environment to learn from.
    :param critic: ``"quantile"`` (QR, quantile Huber loss) or ``"categorical"`` (C51-style
        projection and cross-entropy).
    :param n_quantiles: Number of quantiles (midpoint taus) of the quantile critic.
    :param huber_kappa: Threshold of the quantile Huber loss.
    :param n_atoms: Number of atoms of the categorical critic.
    :param v_min: Lower end of the categorical support.
    :param v_max: Upper end of the categorical support.
    :param normalize_returns: Keep a running mean/std of returns (saved with the policy) and
        fit the critic to normalised returns.
    :param cvar_alpha: When set, the value used for advantages is the CVaR at this level of the
        predicted distribution instead of its mean; ``train/cvar`` is logged.
    :param variance_gradient_scaling: Scale gradients with a
        :class:`~dppo_ckpt.vgs.VarianceGradientScaler`.
    :param vgs_beta: EMA decay of the scaler's gradient statistics.
    :param vgs_alpha: Strength of the scaling, ``scale = clamp((level / R) ** alpha,
        min_scale, 1)`` (see :class:`~dppo_ckpt.vgs.VarianceGradientScaler`).
    :param vgs_warmup_steps: Optimizer steps before the scaler starts scaling.
    :param vgs_kwargs: Further keyword arguments of the scaler (``quantile``,
        ``level_beta``, ``min_scale``, ``eps``).
    :param kwargs: Everything :class:`stable_baselines3.PPO` accepts (``clip_range_vf`` clips
        the distribution against the rollout-time prediction: per quantile, or for the
        categorical critic by clipping the mean and shifting and reprojecting).
    """

    #: Called after each minibatch step of :meth:`train` with the epoch (from 0), so that a
    #: progress display can follow an update; ``None`` calls nothing. Never saved.
    update_progress: Callable[[int], None] | None = None

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": CustomActorCriticPolicy,
        "CnnPolicy": DistributionalCnnPolicy,
        "MultiInputPolicy": DistributionalMultiInputPolicy,
    }
    policy: CustomActorCriticPolicy
    rollout_buffer: DistributionalRolloutBuffer

    def __init__(
        self,
        policy: str | type[CustomActorCriticPolicy],
        env: GymEnv | str,
        *,
        critic: str = "quantile",
        n_quantiles: int = 32,
        huber_kappa: float = 1.0,
        n_atoms: int = 51,
        v_min: float = -10.0,
        v_max: float = 10.0,
        normalize_returns: bool = False,
        cvar_alpha: float | None = None,
        variance_gradient_scaling: bool = True,
        vgs_beta: float = 0.99,
        vgs_alpha: float = 1.0,
        vgs_warmup_steps: int = 100,
        vgs_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
        if not (math.isfinite(huber_kappa) and huber_kappa > 0):
            raise ValueError(f"huber_kappa must be a finite number > 0, got {huber_kappa}")
        # Set before PPO.__init__, which calls _setup_model() and needs them.
        self.critic = critic
        self.n_quantiles = n_quantiles
        self.huber_kappa = huber_kappa
        self.n_atoms = n_atoms
        self.v_min = v_min
        self.v_max = v_max
        self.normalize_returns = normalize_returns
        self.cvar_alpha = cvar_alpha
        self.variance_gradient_scaling = variance_gradient_scaling
        self.vgs_beta = vgs_beta
        self.vgs_alpha = vgs_alpha
        self.vgs_warmup_steps = vgs_warmup_steps
        self.vgs_kwargs = dict(vgs_kwargs or {})
        self._variance_gradient_scaler: VarianceGradientScaler | None = None
        super().__init__(policy, env, **kwargs)

    # -- setup ----------------------------------------------------------------------------

    def _critic_policy_kwargs(self) -> dict[str, Any]:
        return {
            "critic": self.critic,
            "n_quantiles": self.n_quantiles,
            "n_atoms": self.n_atoms,
            "v_min": self.v_min,
            "v_max": self.v_max,
            "normalize_returns": self.normalize_returns,
            "cvar_alpha": self.cvar_alpha,
        }

    def _setup_model(self) -> None:
        """Build buffer, policy and optimizer (SB3), then the scaler over their parameters."""
        if not (
            isinstance(self.policy_class, type)
            and issubclass(self.policy_class, CustomActorCriticPolicy)
        ):
            raise TypeError(
                "DistributionalPPO needs a CustomActorCriticPolicy (or 'MlpPolicy', 'CnnPolicy', "
                f"'MultiInputPolicy'), got {self.policy_class!r}"
            )
        dict_observations = isinstance(self.observation_space, spaces.Dict)
        buffer_for_space = (
            DistributionalDictRolloutBuffer if dict_observations else DistributionalRolloutBuffer
        )
        if self.rollout_buffer_class is None:
            self.rollout_buffer_class = buffer_for_space
        if not issubclass(self.rollout_buffer_class, DistributionalBufferMixin):
            raise TypeError(
                "rollout_buffer_class must be a DistributionalRolloutBuffer or "
                "DistributionalDictRolloutBuffer (or a subclass)"
            )
        holds_dicts = issubclass(self.rollout_buffer_class, DistributionalDictRolloutBuffer)
        if dict_observations != holds_dicts:
            raise TypeError(
                f"{self.rollout_buffer_class.__name__} does not hold "
                f"{'Dict' if dict_observations else 'array'} observations"
            )
        self.policy_kwargs = {**self.policy_kwargs, **self._critic_policy_kwargs()}
        super()._setup_model()
        self._setup_variance_gradient_scaler()

    def _setup_variance_gradient_scaler(self) -> None:
        """Create the scaler over the live parameters, restoring any saved statistics.

        Called after the policy and its optimizer exist. On load, ``self.__dict__`` already
        holds the scaler unpickled from the checkpoint (without parameter references); a fresh
        scaler is built from its configuration and statistics, so nothing else it may have
        carried survives.
        """
        saved = self.__dict__.get("_variance_gradient_scaler")
        if not self.variance_gradient_scaling:
            self._variance_gradient_scaler = None
            return
        parameters = list(self.policy.parameters())
        if saved is None:
            # Layout 2 loads build the scaler from `data`'s settings before set_parameters()
            # restores its state, so a bad setting must read as one here too.
            unknown = sorted(set(self.vgs_kwargs) - set(CONFIG_KEYS))
            if unknown:
                raise ValueError(f"vgs_kwargs: unknown scaler setting(s) {unknown}")
            scaler = VarianceGradientScaler(
                parameters,
                beta=self.vgs_beta,
                alpha=self.vgs_alpha,
                warmup_steps=self.vgs_warmup_steps,
                **self.vgs_kwargs,
            )
        else:
            if not isinstance(saved, VarianceGradientScaler):
                raise TypeError(
                    f"_variance_gradient_scaler must be a VarianceGradientScaler, got {type(saved)}"
                )
            if saved.legacy_parameters_dropped:
                warnings.warn(
                    "This checkpoint's VarianceGradientScaler pickled stale parameter copies; "
                    "they were dropped and the scaler now tracks the live parameters. "
                    f"To fix the file, {MIGRATE_HINT}.",
                    LegacyCheckpointWarning,
                    stacklevel=4,
                )
            # A layout-1 file: the statistics came with the pickle, and no `vgs.pth` follows.
            self.__dict__[_RESTORED_FROM_DATA] = True
            state = saved.state_dict()
            scaler = VarianceGradientScaler(parameters, **state["config"])
            scaler.load_state_dict(state)
        scaler.logger = self.__dict__.get("_logger")
        self._variance_gradient_scaler = scaler

    def _apply_scaler_overrides(self, custom_objects: dict[str, Any]) -> None:
        """Make ``vgs_*`` values given to ``load(custom_objects=...)`` reach the live scaler.

        The scaler is rebuilt from its saved configuration, so a changed attribute alone would
        be silently ignored. Its statistics are kept; only the configuration changes.

        :raises ValueError: a ``vgs_*`` value for a model whose scaler is off, an unknown key,
            or a value the scaler refuses
        """
        given = {key: value for key, value in custom_objects.items() if key.startswith("vgs_")}
        if not given:
            return
        scaler = self._variance_gradient_scaler
        if scaler is None:
            raise ValueError(
                f"custom_objects sets {', '.join(sorted(given))}, but this model's scaler is off "
                "(variance_gradient_scaling=False)"
            )
        state = scaler.state_dict()
        config = dict(state["config"])
        for key, value in given.items():
            if key == "vgs_kwargs":
                if not isinstance(value, dict):
                    raise ValueError(f"custom_objects vgs_kwargs must be a dict, got {value!r}")
                updates = dict(value)
            elif key in _SCALER_KEYWORDS:
                updates = {_SCALER_KEYWORDS[key]: value}
            else:
                raise ValueError(
                    f"custom_objects key {key!r} is no scaler setting; expected one of "
                    f"{sorted([*_SCALER_KEYWORDS, 'vgs_kwargs'])}"
                )
            unknown = sorted(set(updates) - set(config))
            if unknown:
                raise ValueError(f"custom_objects {key}: unknown scaler setting(s) {unknown}")
            config.update(updates)
        scaler.load_state_dict({**state, "config": config})

    def _check_parameter_links(self) -> VarianceGradientScaler | None:
        """Make sure the optimizer and the scaler act on the policy's own parameter objects.

        Run before every update. A rebuilt policy leaves the scaler tracking dead tensors: it
        is relinked (statistics kept). An optimizer over other tensors would train nothing the
        policy uses, which no relink can repair, so it is an error.
        """
        live = {id(p) for p in self.policy.parameters() if p.requires_grad}
        in_optimizer = {
            id(p) for group in self.policy.optimizer.param_groups for p in group["params"]
        }
        if in_optimizer != live:
            raise StaleOptimizerError(
                f"the optimizer tracks {len(in_optimizer & live)}/{len(live)} of the policy's "
                "parameters; rebuild it over policy.parameters()"
            )
        scaler = self._variance_gradient_scaler
        if scaler is None:
            return None
        if {id(p) for p in scaler.parameters} != live:
            scaler.update_parameters(self.policy.parameters())
        # SB3 creates its logger only when learning starts; until then there is none to attach.
        scaler.logger = self.__dict__.get("_logger")
        return scaler

    # -- training -------------------------------------------------------------------------

    def train(self) -> None:
        """Update policy and distributional critic on the collected rollout.

        SB3's PPO update and its logged values, with less overhead per minibatch: the logged
        losses stay tensors until the end (one host transfer each per call, not one per
        minibatch; only ``target_kl`` needs the KL estimate at once), the probability ratio's
        logarithm is computed once, the critic's targets are computed once per rollout (see
        :mod:`dppo_ckpt.buffers`), Adam steps on flat moment buffers
        (:mod:`dppo_ckpt._flat_adam`, falling back to torch's multi-tensor path,
        :mod:`dppo_ckpt._foreach`), the scaler updates its statistics in flat buffers and the
        quantile loss runs on torch's Huber kernel. None of this changes a result: no
        operation changes its order, and ``tests/test_train_speed.py`` compares a whole
        ``learn()`` with a plain per-parameter reference update bit for bit.
        """
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = (
            None
            if self.clip_range_vf is None
            else self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        )
        scaler = self._check_parameter_links()
        if self.normalize_returns:
            self.policy.update_return_statistics(self.rollout_buffer.returns)
        if clip_range_vf is not None:
            self.rollout_buffer.compute_value_distributions(self.policy.predict_value_distribution)
        self.rollout_buffer.compute_value_targets(self._value_targets)
        taus = quantile_midpoints(self.n_quantiles, device=self.device)
        parameters = list(self.policy.parameters())

        entropy_losses: list[th.Tensor] = []
        pg_losses: list[th.Tensor] = []
        value_losses: list[th.Tensor] = []
        clip_fractions: list[th.Tensor] = []
        cvars: list[th.Tensor] = []
        approx_kl_divs: list[th.Tensor] = []
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()

                value_out, log_prob, entropy = self.policy.evaluate_actions_distributional(
                    rollout_data.observations, actions
                )
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                log_ratio = log_prob - rollout_data.old_log_prob
                ratio = th.exp(log_ratio)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

                value_loss = self._value_loss(
                    value_out,
                    rollout_data.value_targets,
                    taus,
                    rollout_data.old_value_distributions,
                    clip_range_vf,
                )
                entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

                with th.no_grad():
                    pg_losses.append(policy_loss.detach())
                    clip_fractions.append(th.mean((th.abs(ratio - 1) > clip_range).float()))
                    value_losses.append(value_loss.detach())
                    entropy_losses.append(entropy_loss.detach())
                    if self.cvar_alpha is not None:
                        cvar = self.policy.distribution_cvar(value_out, self.cvar_alpha)
                        cvars.append(self.policy.denormalize(cvar).mean())
                    approx_kl_div = th.mean((ratio - 1) - log_ratio)
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None:
                    kl = approx_kl_div.cpu().numpy()
                    if kl > 1.5 * self.target_kl:
                        continue_training = False
                        if self.verbose >= 1:
                            print(f"Early stopping at step {epoch}: approx_kl {kl:.2f}")
                        break

                # Setting .grad to None is what optimizer.zero_grad() does, less its overhead.
                for param in parameters:
                    param.grad = None
                loss.backward()
                # The scaler's statistics must see the raw gradients, before clipping.
                scale = 1.0 if scaler is None else scaler.compute_scale()
                self._optimizer_step(scaler, scale, parameters)
                if self.update_progress is not None:
                    self.update_progress(epoch)

            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        self.logger.record("train/entropy_loss", np.mean(_floats(entropy_losses)))
        self.logger.record("train/policy_gradient_loss", np.mean(_floats(pg_losses)))
        self.logger.record("train/value_loss", np.mean(_floats(value_losses)))
        self.logger.record("train/approx_kl", np.mean(_float32s(approx_kl_divs)))
        self.logger.record("train/clip_fraction", np.mean(_floats(clip_fractions)))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if cvars:
            self.logger.record("train/cvar", np.mean(_floats(cvars)))
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def _value_targets(self, returns: th.Tensor) -> th.Tensor:
        """The critic's targets for scalar TD(lambda) ``returns``: head units, and for the
        categorical critic their two-hot encoding on the support."""
        targets = self.policy.normalize(returns)
        if self.critic == "quantile":
            return targets
        return two_hot(targets, self.policy.support)

    def _optimizer_step(
        self,
        scaler: VarianceGradientScaler | None,
        scale: float,
        parameters: list[th.nn.Parameter] | None = None,
    ) -> None:
        """Clip the gradients, then step the optimizer with its learning rate times ``scale``.

        The one update path of :meth:`train`; the checks that prove the factor reaches the
        step (``DPPO011``) drive this very method. ``parameters`` is
        ``list(policy.parameters())`` when the caller already has it.
        """
        if parameters is None:
            parameters = list(self.policy.parameters())
        clip_grad_norm(parameters, self.max_grad_norm)
        optimizer = self.policy.optimizer
        with foreach_kernels(optimizer), flat_adam(optimizer):
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer, scale)

    def _value_loss(
        self,
        value_out: th.Tensor,
        targets: th.Tensor,
        taus: th.Tensor,
        old_value_out: th.Tensor | None,
        clip_range_vf: float | None,
    ) -> th.Tensor:
        """Distributional critic loss against :meth:`_value_targets`: TD(lambda) returns in
        head units (quantile critic) or their two-hot encoding (categorical critic)."""
        if self.critic == "quantile":
            if clip_range_vf is not None and old_value_out is not None:
                value_out = clip_quantiles(value_out, old_value_out, clip_range_vf)
            return quantile_huber_loss(value_out, targets, taus, kappa=self.huber_kappa)

        support = self.policy.support
        target_probs = targets
        if clip_range_vf is None or old_value_out is None:
            return categorical_cross_entropy(value_out, target_probs)
        probs = th.softmax(value_out, dim=-1)
        mean = self.policy.distribution_mean(value_out)
        old_mean = self.policy.distribution_mean(old_value_out)
        clipped_mean = old_mean + th.clamp(mean - old_mean, -clip_range_vf, clip_range_vf)
        clipped_probs = shift_and_reproject(probs, support, clipped_mean - mean)
        # log of a normalised distribution is its own log-softmax, so it serves as logits.
        return categorical_cross_entropy(th.log(clipped_probs.clamp_min(1e-12)), target_probs)

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        """SB3's set-up, then hand the (possibly new) logger to the scaler."""
        result = super()._setup_learn(*args, **kwargs)
        if self._variance_gradient_scaler is not None:
            self._variance_gradient_scaler.logger = self.logger
        return result

    def set_logger(self, logger: Any) -> None:
        """Set the logger of the algorithm and of its scaler."""
        super().set_logger(logger)
        if self._variance_gradient_scaler is not None:
            self._variance_gradient_scaler.logger = logger

    # -- checkpoints ----------------------------------------------------------------------

    def _excluded_save_params(self) -> list[str]:
        """SB3's exclusions, plus the progress hook (a display of this process, never part of a
        model) and the scaler object: its state is a torch-saved parameter (``vgs.pth``, see
        :meth:`get_parameters`), and ``data`` keeps only its configuration (``vgs_*``)."""
        return [
            *super()._excluded_save_params(),
            "update_progress",
            SCALER_ENTRY,
            _RESTORED_FROM_DATA,
        ]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        """The policy, its optimizer and the scaler's state dict (``vgs``), each saved as its
        own ``.pth`` member that SB3 loads with ``torch.load(weights_only=True)``.

        The list does not depend on the instance (the checkpoint checks ask the class), so
        ``vgs`` is declared even when the scaler is off; :meth:`get_parameters` then leaves it
        out.
        """
        return [*_SB3_STATE_DICTS, SCALER_PARAMETER], []

    def get_parameters(self) -> dict[str, dict[str, Any]]:
        """SB3's parameters (policy and optimizer state dicts), plus the scaler's
        ``state_dict()`` under ``vgs`` when the scaler is on: statistics, counters and
        configuration, so that ``set_parameters`` on another model continues its scaling
        where this one stands instead of restarting the warm-up."""
        params = {name: recursive_getattr(self, name).state_dict() for name in _SB3_STATE_DICTS}
        scaler = self._variance_gradient_scaler
        if scaler is not None:
            params[SCALER_PARAMETER] = scaler.state_dict()
        return params

    def set_parameters(
        self,
        load_path_or_dict: str | dict[str, Any],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """Load parameters as SB3 does, the scaler's state (``vgs``) included.

        :param load_path_or_dict: a checkpoint path or a dict as :meth:`get_parameters`
            returns it.
        :param exact_match: every saved object must be given (and nothing else); ``vgs`` is
            required when the scaler is on, except while loading a layout-1 checkpoint, whose
            scaler state came from ``data`` (a ``vgs`` given as well takes precedence).
        :param device: where to load a checkpoint's tensors.
        :raises ValueError: an unknown key, a scaler state for a model whose scaler is off, or
            (with ``exact_match``) a missing object
        """
        if isinstance(load_path_or_dict, dict):
            params = dict(load_path_or_dict)
        else:
            _, params, _ = load_from_zip_file(load_path_or_dict, device=device, load_data=False)
        restored_from_data = bool(self.__dict__.pop(_RESTORED_FROM_DATA, False))
        scaler = self._variance_gradient_scaler
        scaler_state = params.pop(SCALER_PARAMETER, None)
        expected = set(_SB3_STATE_DICTS)
        if scaler is not None and (scaler_state is not None or not restored_from_data):
            expected.add(SCALER_PARAMETER)
        updated = set()
        for name, state in params.items():
            try:
                attr = recursive_getattr(self, name)
            except Exception as exc:
                raise ValueError(f"Key {name} is an invalid object name.") from exc
            if name not in _SB3_STATE_DICTS:
                raise ValueError(f"Key {name} is not a parameter of {type(self).__name__}")
            if isinstance(attr, th.optim.Optimizer):
                # As in SB3: optimizers take no `strict` and load their state as given.
                attr.load_state_dict(state)
            else:
                attr.load_state_dict(state, strict=exact_match)
            updated.add(name)
        if scaler_state is not None:
            if scaler is None:
                if exact_match:
                    raise ValueError(
                        f"the parameters hold a scaler state ({SCALER_PARAMETER!r}), but this "
                        "model's scaler is off (variance_gradient_scaling=False)"
                    )
            else:
                scaler.load_state_dict(scaler_state)
                updated.add(SCALER_PARAMETER)
        if exact_match and updated != expected:
            raise ValueError(
                "Names of parameters do not match agents' parameters: "
                f"expected {expected}, got {updated}"
            )

    def save(
        self,
        path: str | pathlib.Path | Any,
        exclude: Any = None,
        include: Any = None,
    ) -> None:
        """Save like SB3, plus the state of every random generator (for exact resume) and
        the numerics fingerprint of this process and the checkpoint layout
        (``dppo_ckpt.json``, plain JSON). The scaler's state is the parameter ``vgs.pth``."""
        self._rng_state = capture_rng_state(self.action_space)
        buffer = io.BytesIO()
        try:
            super().save(buffer, exclude=exclude, include=include)
        finally:
            del self._rng_state
        with zipfile.ZipFile(buffer, "a") as archive:
            archive.writestr(METADATA_MEMBER, encode_metadata(numerics.fingerprint()))
        # SB3's own path rules (a missing ".zip" suffix added, parent folders created); a
        # file object stays open for the caller, as SB3 leaves it.
        file = open_path(path, "w", verbose=0, suffix="zip")
        if isinstance(path, (str, pathlib.Path)):
            with file:
                file.write(buffer.getbuffer())
        else:
            file.write(buffer.getbuffer())

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfDistributionalPPO],
        path: str | pathlib.Path | Any,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfDistributionalPPO:
        """Load like SB3; the scaler is rebuilt over the live parameters with its statistics,
        and the random generators continue where the saved run stopped."""
        # SB3's load re-seeds the environment (pending seeds for its next reset()); a resumed
        # run must not replay the episodes its original seed produced.
        pending_seeds = list(getattr(env, "_seeds", []) or [])
        _refuse_unknown_layout(path)
        model = super().load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )
        if env is not None and hasattr(env, "_seeds"):
            env._seeds = pending_seeds or [None] * len(env._seeds)
        model._apply_scaler_overrides(custom_objects or {})
        rng_state = model.__dict__.pop("_rng_state", None)
        # Restored last: SB3's load re-seeds and samples gSDE noise, which moved the generators.
        if rng_state is not None:
            restore_rng_state(rng_state, model.action_space)
        model._check_parameter_links()
        return model


def _refuse_unknown_layout(path: str | pathlib.Path | Any) -> None:
    """Raise :class:`~dppo_ckpt.checkpoint.metadata.LayoutError` (one line, naming the release
    it needs) for a checkpoint whose layout this package does not know.

    Only the layout is judged here: a file without the member, or with one this package
    cannot parse for another reason, is left to SB3's loader as before.
    """
    file = open_path(path, "r", verbose=0, suffix="zip")
    try:
        position = file.tell()
        try:
            with zipfile.ZipFile(file) as archive:
                info = archive.getinfo(METADATA_MEMBER)
                if info.file_size > MAX_METADATA_BYTES:
                    return
                raw = archive.read(info)
        except (KeyError, zipfile.BadZipFile, OSError):
            return
        finally:
            file.seek(position)
        try:
            parse_metadata(raw)
        except LayoutError:
            raise
        except MetadataError:
            return
    finally:
        if isinstance(path, (str, pathlib.Path)):
            file.close()
