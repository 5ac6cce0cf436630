"""The faster update path gives the very bits of the plain one (see dppo_ckpt/_foreach.py,
dppo_ckpt/_flat_adam.py, dppo_ckpt/vgs.py and dppo_ckpt/buffers.py), down to a whole
learn() against a plain reference update; fixtures/make_fixtures.py checks the same end to
end."""

from __future__ import annotations

import copy
import math
import random

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import DummyVecEnv

from dppo_ckpt import DistributionalPPO
from dppo_ckpt._foreach import clip_grad_norm, foreach_kernels
from dppo_ckpt.buffers import DistributionalRolloutBuffer
from dppo_ckpt.distributional import (
    categorical_support,
    quantile_huber_loss,
    quantile_midpoints,
    two_hot,
)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _steps(optimizer: torch.optim.Optimizer, net: torch.nn.Module, fast: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for param in net.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        if fast:
            with foreach_kernels(optimizer):
                optimizer.step()
        else:
            optimizer.step()


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs"),
    [
        (torch.optim.Adam, {"lr": 1e-3, "eps": 1e-5}),
        (torch.optim.Adam, {"lr": 3e-3, "weight_decay": 0.1, "amsgrad": True}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    ],
)
def test_foreach_adam_gives_the_same_bits(optimizer_class, kwargs) -> None:
    plain_net, fast_net = _net(), _net()
    plain = optimizer_class(plain_net.parameters(), **kwargs)
    fast = optimizer_class(fast_net.parameters(), **kwargs)
    _steps(plain, plain_net, fast=False)
    _steps(fast, fast_net, fast=True)
    for a, b in zip(plain_net.parameters(), fast_net.parameters(), strict=True):
        assert torch.equal(a, b)
    plain_state, fast_state = plain.state_dict(), fast.state_dict()
    assert plain_state["param_groups"] == fast_state["param_groups"]
    assert fast_state["param_groups"][0]["foreach"] is None  # the saved configuration is SB3's
    for index, state in plain_state["state"].items():
        for key, value in state.items():
            assert torch.equal(value, fast_state["state"][index][key]), key


def test_foreach_leaves_chosen_and_other_optimizers_alone() -> None:
    net = _net()
    chosen = torch.optim.Adam(net.parameters(), foreach=False)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with foreach_kernels(chosen), foreach_kernels(sgd):
        assert chosen.param_groups[0]["foreach"] is False
        assert sgd.param_groups[0]["foreach"] is None
    adam = torch.optim.Adam(net.parameters())
    with pytest.raises(RuntimeError), foreach_kernels(adam):
        assert adam.param_groups[0]["foreach"] is True
        raise RuntimeError("a failing step")
    assert adam.param_groups[0]["foreach"] is None


def _filled(buffer: RolloutBuffer, seed: int) -> RolloutBuffer:
    rng = np.random.default_rng(seed)
    for _ in range(buffer.buffer_size):
        buffer.add(
            rng.normal(size=(buffer.n_envs, *buffer.obs_shape)).astype(np.float32),
            rng.integers(0, 3, size=(buffer.n_envs, buffer.action_dim)),
            rng.normal(size=buffer.n_envs).astype(np.float32),
            np.zeros(buffer.n_envs, dtype=np.float32),
            torch.as_tensor(rng.normal(size=buffer.n_envs), dtype=torch.float32),
            torch.as_tensor(rng.normal(size=buffer.n_envs), dtype=torch.float32),
        )
    buffer.compute_returns_and_advantage(torch.zeros(buffer.n_envs), np.zeros(buffer.n_envs))
    return buffer


def test_cpu_minibatches_equal_sb3s() -> None:
    spaces = (gym.spaces.Box(-1, 1, (3,)), gym.spaces.MultiDiscrete([3, 3]))
    ours = _filled(DistributionalRolloutBuffer(16, *spaces, n_envs=2), seed=0)
    sb3 = _filled(RolloutBuffer(16, *spaces, n_envs=2), seed=0)
    np.random.seed(3)
    mine = list(ours.get(5))
    np.random.seed(3)
    theirs = list(sb3.get(5))
    assert len(mine) == len(theirs) == 7
    for a, b in zip(mine, theirs, strict=True):
        for x, y in zip(tuple(a)[:6], tuple(b), strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)
    # The minibatches are copies: changing one leaves the buffer alone.
    mine[0].advantages.add_(1.0)
    np.random.seed(3)
    assert torch.equal(next(ours.get(5)).advantages, theirs[0].advantages)


def test_value_targets_equal_a_per_minibatch_two_hot() -> None:
    spaces = (gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (1,)))
    buffer = _filled(DistributionalRolloutBuffer(16, *spaces, n_envs=2), seed=1)
    support = categorical_support(-2.0, 2.0, 11)
    buffer.compute_value_targets(lambda returns: two_hot(returns, support))
    for batch in buffer.get(6):
        assert torch.equal(batch.value_targets, two_hot(batch.returns, support))


def test_train_logs_what_the_per_minibatch_reads_gave() -> None:
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1")])
    model = DistributionalPPO(
        "MlpPolicy", env, n_steps=64, batch_size=16, n_epochs=2, seed=0, device="cpu",
        critic="categorical", target_kl=10.0, policy_kwargs=dict(net_arch=[8]),
    )  # fmt: skip
    model.learn(64)
    logged = dict(model.logger.name_to_value)
    for key in ("train/entropy_loss", "train/policy_gradient_loss", "train/value_loss",
                "train/approx_kl", "train/clip_fraction", "train/loss"):  # fmt: skip
        assert np.isfinite(logged[key]), key
    assert isinstance(logged["train/approx_kl"], np.float32)  # numpy float32, as SB3 logs it
    assert logged["train/n_updates"] == 2
    assert 0.0 <= logged["train/clip_fraction"] <= 1.0


def test_clip_grad_norm_gives_torchs_bits() -> None:
    generator = torch.Generator().manual_seed(2)
    for max_norm, spread in ((0.5, 1.0), (100.0, 1.0), (0.5, 0.0)):
        ours, theirs = _net(), _net()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator) * spread
            b.grad = a.grad.clone()
        list(ours.parameters())[1].grad = None  # a parameter without gradient is skipped
        list(theirs.parameters())[1].grad = None
        clip_grad_norm(list(ours.parameters()), max_norm)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def _quantile_huber_as_written(pred, targets, taus, kappa):
    """The loss of the docstring, every operation spelled out (the former implementation)."""
    target = (targets.unsqueeze(-1) if targets.dim() == 1 else targets).to(pred.dtype)
    u = target.unsqueeze(1) - pred.unsqueeze(2)
    abs_u = u.abs()
    huber = torch.where(abs_u <= kappa, 0.5 * u.pow(2), kappa * (abs_u - 0.5 * kappa))
    weight = (taus.view(1, -1, 1) - (u.detach() < 0).to(u.dtype)).abs()
    return (weight * huber / kappa).sum(dim=1).mean(dim=1).mean()


@pytest.mark.parametrize("kappa", [1.0, 0.5, 1.3])
@pytest.mark.parametrize(("batch", "n", "m"), [(64, 32, 1), (7, 5, 3), (1, 1, 1)])
def test_quantile_huber_loss_and_gradient_are_those_of_the_formula(kappa, batch, n, m) -> None:
    generator = torch.Generator().manual_seed(batch * n + m)
    pred = torch.randn(batch, n, generator=generator) * 3
    targets = torch.randn(batch, m, generator=generator) * 3
    targets[:, 0] = pred[:, 0] + kappa  # on the kink of the Huber function
    if m == 1:
        targets = targets[:, 0]
    taus = quantile_midpoints(n)
    ours, reference = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    loss = quantile_huber_loss(ours, targets, taus, kappa=kappa)
    expected = _quantile_huber_as_written(reference, targets, taus, kappa)
    loss.backward()
    expected.backward()
    assert torch.equal(loss, expected)
    assert torch.equal(ours.grad, reference.grad)


@pytest.mark.parametrize("trial", range(40))
def test_quantile_huber_loss_matches_the_formula_on_random_shapes_and_dtypes(trial) -> None:
    """Bit for bit, signs of zero included, for float32 and float64, several kappas (some not
    representable in float32), one or several targets, predictions on the kink and equal to
    a target."""
    rng = random.Random(trial)
    batch, n, m = rng.randint(1, 70), rng.randint(1, 40), rng.choice([1, 2, 5])
    kappa = rng.choice([1.0, 0.5, 1.3, 0.1, 3.7])
    dtype = rng.choice([torch.float32, torch.float64])
    generator = torch.Generator().manual_seed(trial)
    pred = (torch.randn(batch, n, generator=generator) * rng.choice([0.1, 3.0, 30.0])).to(dtype)
    targets = (torch.randn(batch, m, generator=generator) * 3).to(dtype)
    targets[:, 0] = pred[:, 0] + kappa
    if m > 1 and n > 1:
        targets[:, 1] = pred[:, 1]
    taus = quantile_midpoints(n, dtype=dtype)
    ours, reference = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    loss = quantile_huber_loss(ours, targets, taus, kappa=kappa)
    expected = _quantile_huber_as_written(reference, targets, taus, kappa)
    (loss * 0.7).backward()
    (expected * 0.7).backward()
    assert torch.equal(loss, expected)
    assert torch.equal(ours.grad, reference.grad)
    assert torch.equal(ours.grad.signbit(), reference.grad.signbit())


# -- the whole update against a plain reference ---------------------------------------------


class _ReferenceScaler:
    """The scaler's formula (dppo_ckpt/vgs.py), one parameter at a time, nothing cached.

    The operations are torch's, in the documented order: ``m.lerp_(g, 1 - beta)`` is
    ``m <- beta*m + (1-beta)*g`` as torch rounds it, the noise sum uses
    ``sum(clamp(vh - mh^2, 0)) = c * sum(clamp(v - c*m^2, 0))`` and the signal
    ``sum(mh^2) = c^2 * ||m||^2`` (c = 1/(1-beta^t)), and R is ``torch.quantile``.
    """

    def __init__(self, params: list[torch.Tensor], config: dict) -> None:
        self.config = config
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0
        self.level: float | None = None

    def scale(self, params: list[torch.Tensor]) -> float:
        beta, eps = self.config["beta"], self.config["eps"]
        self.t += 1
        c = 1.0 / (1.0 - beta**self.t)
        ratios = []
        with torch.no_grad():
            for p, m, v in zip(params, self.m, self.v, strict=True):
                g = p.grad
                m.lerp_(g, 1.0 - beta)
                v.mul_(beta).addcmul_(g, g, value=1.0 - beta)
                noise = torch.addcmul(v, m, m, value=-c).clamp_min(0.0).sum().item()
                norm = torch.linalg.vector_norm(m).item()
                ratios.append(noise * c / (norm * norm * c**2 + eps))
        r = torch.quantile(torch.tensor(ratios, dtype=torch.float64), self.config["quantile"])
        return self._scale(r.item())

    def _scale(self, r: float) -> float:
        cfg, t = self.config, self.t
        usable = 0.0 < r < math.inf
        if t <= cfg["warmup_steps"]:
            if t == cfg["warmup_steps"] and usable and t >= 2:
                self.level = r
            return 1.0
        if self.level is None:
            self.level = r if usable and t >= 2 else None
            return 1.0
        if r == 0.0 or cfg["alpha"] == 0.0:
            scale = 1.0
        elif not usable:
            scale = cfg["min_scale"]
        elif r <= self.level:
            scale = 1.0
        else:
            scale = max((self.level / r) ** cfg["alpha"], cfg["min_scale"])
        if usable:
            lb = cfg["level_beta"]
            self.level = math.exp(lb * math.log(self.level) + (1.0 - lb) * math.log(r))
        return scale


class _ReferencePPO(DistributionalPPO):
    """DistributionalPPO with the update of SB3's PPO written out plainly: per-minibatch
    targets and losses from their formulas, ``zero_grad``, torch's own ``clip_grad_norm_``
    and Adam (its per-tensor loop), the scaler of :class:`_ReferenceScaler`, and the scale
    applied to the learning rate for the one step."""

    reference: _ReferenceScaler | None = None

    def train(self) -> None:
        self.policy.set_training_mode(True)
        optimizer = self.policy.optimizer
        self._update_learning_rate(optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        params = list(self.policy.parameters())
        if self.reference is None:
            self.reference = _ReferenceScaler(params, self._variance_gradient_scaler._config())
        n = self.n_quantiles
        taus = (2.0 * torch.arange(n, dtype=torch.float32) + 1.0) / (2.0 * n)
        for _ in range(self.n_epochs):
            for batch in self.rollout_buffer.get(self.batch_size):
                value_out, log_prob, entropy = self.policy.evaluate_actions_distributional(
                    batch.observations, batch.actions
                )
                adv = batch.advantages
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = torch.exp(log_prob - batch.old_log_prob)
                policy_loss = -torch.min(
                    adv * ratio, adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
                ).mean()
                if self.critic == "quantile":
                    value_loss = _quantile_huber_as_written(value_out, batch.returns, taus, 1.0)
                else:
                    target = two_hot(batch.returns, self.policy.support)
                    log_p = torch.log_softmax(value_out, dim=-1)
                    value_loss = -(target * log_p).sum(dim=-1).mean()
                loss = (
                    policy_loss
                    + self.ent_coef * -torch.mean(entropy)
                    + self.vf_coef * value_loss
                )
                optimizer.zero_grad()
                loss.backward()
                scale = self.reference.scale(params)
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                rates = [group["lr"] for group in optimizer.param_groups]
                for group, rate in zip(optimizer.param_groups, rates, strict=True):
                    group["lr"] = rate * scale if scale != 1.0 else rate
                optimizer.step()
                for group, rate in zip(optimizer.param_groups, rates, strict=True):
                    group["lr"] = rate
            self._n_updates += 1


@pytest.mark.parametrize("critic", ["quantile", "categorical"])
def test_whole_training_equals_the_plain_reference_bit_for_bit(critic) -> None:
    """learn() with the fast update (flat scaler statistics, flat Adam, the loss as one
    autograd node, the buffers' gathered minibatches) gives the very parameters, optimizer
    state and scaler statistics of the plain update above, over several updates with the
    scaler past its warm-up (its factor below 1 on some steps).

    Bit for bit, because no operation changed its order: every fast path runs the same
    element-wise kernels on the same operands and the same per-tensor reductions."""
    settings = dict(
        n_steps=64, batch_size=16, n_epochs=3, seed=0, device="cpu", critic=critic,
        vgs_warmup_steps=4, policy_kwargs=dict(net_arch=[16, 16]),
    )  # fmt: skip
    # One after the other: each model seeds the global generators when it is built.
    fast = DistributionalPPO("MlpPolicy", DummyVecEnv([lambda: gym.make("Pendulum-v1")]),
                             **settings).learn(64 * 4)  # fmt: skip
    plain = _ReferencePPO("MlpPolicy", DummyVecEnv([lambda: gym.make("Pendulum-v1")]),
                          **settings).learn(64 * 4)  # fmt: skip
    scaler, reference = fast._variance_gradient_scaler, plain.reference
    assert reference is not None and scaler.step_count == reference.t == 4 * 3 * 4
    assert scaler.factor_counts["at_one"] < scaler.factor_counts["steps"]  # it did scale
    for a, b in zip(fast.policy.parameters(), plain.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    fast_state = fast.policy.optimizer.state_dict()["state"]
    plain_state = plain.policy.optimizer.state_dict()["state"]
    for index, state in plain_state.items():
        for key, value in state.items():
            assert torch.equal(value, fast_state[index][key]), (index, key)
    for mine, theirs in ((scaler._exp_avg, reference.m), (scaler._exp_avg_sq, reference.v)):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)
    assert scaler.level == reference.level


def test_flat_adam_gives_torchs_bits_across_loads_and_fallbacks() -> None:
    """The flat step against torch's own Adam over several steps: a state loaded in the
    middle (flattened again), a step with a missing gradient (torch's step, counters then
    differ per tensor), saved states whose tensors own their storage, and the optimizer's
    ``step`` left as it was."""
    from dppo_ckpt._flat_adam import flat_adam

    plain_net, fast_net = _net(), _net()
    plain = torch.optim.Adam(plain_net.parameters(), lr=1e-2, eps=1e-5)
    fast = torch.optim.Adam(fast_net.parameters(), lr=1e-2, eps=1e-5)
    generator = torch.Generator().manual_seed(4)
    for index in range(12):
        grads = [torch.randn(p.shape, generator=generator) for p in plain_net.parameters()]
        for net in (plain_net, fast_net):
            for param, grad in zip(net.parameters(), grads, strict=True):
                param.grad = grad.clone()
        if index == 5:  # one tensor without gradient: torch's step, which skips it
            for net in (plain_net, fast_net):
                list(net.parameters())[2].grad = None
        plain.step()
        with flat_adam(fast):
            fast.step()
        assert "step" not in vars(fast)
        if index == 8:  # a loaded state holds new tensors: flattened again at the next step
            fast.load_state_dict(copy.deepcopy(fast.state_dict()))
        for a, b in zip(plain_net.parameters(), fast_net.parameters(), strict=True):
            assert torch.equal(a, b), index
    saved = fast.state_dict()["state"]
    for index, state in plain.state_dict()["state"].items():
        for key, value in state.items():
            mine = saved[index][key]
            assert torch.equal(value, mine), (index, key)
            assert mine.untyped_storage().nbytes() == mine.numel() * mine.element_size()
    # Views of the flat buffers do live in the optimizer's state: the flat path ran.
    assert any(state["exp_avg"]._base is not None for state in fast.state.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flat_adam_in_half_precision_gives_torchs_bits(dtype) -> None:
    """Half-precision moments: the step falls back to torch's, whose foreach ``mul`` by
    beta2 rounds unlike a flat ``mul_`` would, so parameters and state stay torch's."""
    from dppo_ckpt._flat_adam import flat_adam

    generator = torch.Generator().manual_seed(5)
    start = [torch.randn(shape, generator=generator).to(dtype) for shape in [(33,), (7, 5)]]
    plain_params = [torch.nn.Parameter(t.clone()) for t in start]
    fast_params = [torch.nn.Parameter(t.clone()) for t in start]
    plain = torch.optim.Adam(plain_params, lr=3e-4, eps=1e-5, foreach=True)
    fast = torch.optim.Adam(fast_params, lr=3e-4, eps=1e-5, foreach=True)
    for _ in range(6):
        grads = [torch.randn(t.shape, generator=generator).to(dtype) for t in start]
        for params in (plain_params, fast_params):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
        plain.step()
        with flat_adam(fast):
            fast.step()
    for a, b in zip(plain_params, fast_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain_params, fast_params, strict=True):
        assert torch.equal(plain.state[a]["exp_avg_sq"], fast.state[b]["exp_avg_sq"])
