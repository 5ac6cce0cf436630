"""The faster update path gives the very bits of the plain one (see dppo_ckpt/_foreach.py and
dppo_ckpt/buffers.py); fixtures/make_fixtures.py checks the same end to end."""

from __future__ import annotations

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
