"""Distributional value math: quantile regression, categorical projection and CVaR.

Pure tensor functions with no dependency on stable-baselines3, so that the critic math can be
read, tested and reused on its own. Every function is small and spells out its math.

Two ways to represent a return distribution are supported:

- **Quantiles** (QR-DQN, Dabney et al. 2018, "Distributional Reinforcement Learning with
  Quantile Regression"): N values ``theta_1..theta_N`` that estimate the quantile function at
  the midpoints ``tau_i = (2i + 1) / (2N)``; each holds probability mass ``1/N``. They are fitted
  with the quantile Huber loss.
- **Categorical** (C51, Bellemare et al. 2017, "A Distributional Perspective on Reinforcement
  Learning"): probabilities over a fixed, evenly spaced support ``z_0 < ... < z_{K-1}``. Targets
  are projected back onto the support by splitting each atom's mass between its two neighbours
  and fitted with a cross-entropy loss.

For both, CVaR at level ``alpha`` is the lower-tail mean
``CVaR_alpha = (1 / alpha) * integral_0^alpha F^{-1}(u) du``, computed exactly for the
piecewise-constant quantile function, including the fractional share of the atom that straddles
``alpha``.

Shapes: ``B`` is the batch size, ``N`` the number of predicted quantiles, ``M`` the number of
target samples, ``K`` the number of support atoms and ``K'`` the number of atoms being projected.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "categorical_cross_entropy",
    "categorical_mean",
    "categorical_support",
    "clip_quantiles",
    "cvar_from_categorical",
    "cvar_from_quantiles",
    "project_onto_support",
    "quantile_huber_loss",
    "quantile_mean",
    "quantile_midpoints",
    "shift_and_reproject",
    "two_hot",
]


# --------------------------------------------------------------------------------------------
# Argument checks (only the cheap ones: Python scalars and shapes, never tensor values, which
# would force a device synchronisation inside the training loop)
# --------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"CVaR level alpha must be in (0, 1], got {alpha}")


def _check_ndim(name: str, tensor: Tensor, ndim: int) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")


def _check_support(support: Tensor) -> None:
    _check_ndim("support", support, 1)
    if support.shape[0] < 2:
        raise ValueError(f"support needs at least 2 atoms, got {support.shape[0]}")


# --------------------------------------------------------------------------------------------
# Quantile representation (Dabney et al. 2018)
# --------------------------------------------------------------------------------------------


def quantile_midpoints(
    n_quantiles: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Quantile levels at the midpoints of N equal probability bins.

    ``tau_i = (2i + 1) / (2N)`` for ``i = 0..N-1`` (Dabney et al. 2018, Lemma 2): the
    Wasserstein-optimal levels for N equally weighted quantiles.

    :param n_quantiles: number of quantiles N (>= 1).
    :param device: device of the result.
    :param dtype: floating point dtype of the result.
    :return: taus of shape (N,), strictly increasing in (0, 1).
    """
    if n_quantiles < 1:
        raise ValueError(f"n_quantiles must be >= 1, got {n_quantiles}")
    i = torch.arange(n_quantiles, device=device, dtype=dtype)
    return (2.0 * i + 1.0) / (2.0 * n_quantiles)


def quantile_huber_loss(
    pred_quantiles: Tensor,
    target_samples: Tensor,
    taus: Tensor,
    kappa: float = 1.0,
) -> Tensor:
    """Quantile Huber loss of Dabney et al. 2018 (QR-DQN, eq. 9-10).

    For every pair of predicted quantile ``theta_i`` and target sample ``T_j``::

        u_ij   = T_j - theta_i
        L_k(u) = 0.5 u^2                  if |u| <= kappa
                 kappa (|u| - 0.5 kappa)  otherwise
        rho_ij = |tau_i - 1{u_ij < 0}| * L_k(u_ij) / kappa

    and the loss is ``rho`` summed over quantiles i, averaged over targets j and over the batch.
    The asymmetric weight makes the minimiser of the loss in ``theta_i`` the ``tau_i``-quantile
    of the targets; the Huber part keeps the gradient smooth around zero. Dividing by kappa
    makes the gradient magnitude in the linear region ``|tau_i - 1{u<0}|`` for every kappa.

    The targets are treated as constants: they are detached here, so gradients flow to
    ``pred_quantiles`` only even when ``target_samples`` is part of a graph.

    ``L_k`` is torch's Huber loss (one kernel forward and backward, instead of the dozen nodes
    of ``abs``, ``where``, ``pow`` and friends), and the weight one ``where`` between
    ``1 - tau`` and ``tau``. Loss and gradient are bit for bit those of the formula written
    with elementary tensor ops (the kernel computes the same products, ``0.5 z z``,
    ``kappa (z - 0.5 kappa)``, ``x g`` and ``+-kappa g``; ``tests/test_train_speed.py``
    compares them, on the kink included). No operation changes its order. That holds for
    float32 and float64; for float16 and bfloat16 the kernel computes in float32 inside, so
    with ``kappa != 1`` the last bits can differ from the elementary ops.

    :param pred_quantiles: predicted quantiles, shape (B, N).
    :param target_samples: target samples, shape (B, M), or (B,) for a single sample per row.
    :param taus: quantile levels of the predictions, shape (N,).
    :param kappa: Huber threshold (> 0).
    :return: scalar loss.
    """
    if not (math.isfinite(kappa) and kappa > 0.0):
        raise ValueError(f"kappa must be a finite number > 0, got {kappa}")
    _check_ndim("pred_quantiles", pred_quantiles, 2)
    if target_samples.dim() == 1:
        target_samples = target_samples.unsqueeze(-1)
    _check_ndim("target_samples", target_samples, 2)
    _check_ndim("taus", taus, 1)
    batch_size, n_quantiles = pred_quantiles.shape
    if target_samples.shape[0] != batch_size:
        raise ValueError(
            f"batch sizes differ: pred_quantiles {tuple(pred_quantiles.shape)}, "
            f"target_samples {tuple(target_samples.shape)}"
        )
    if taus.shape[0] != n_quantiles:
        raise ValueError(f"taus has {taus.shape[0]} levels for {n_quantiles} quantiles")

    target = target_samples.detach().to(pred_quantiles.dtype)
    taus = taus.to(device=pred_quantiles.device, dtype=pred_quantiles.dtype)

    # (B, N, M): u[b, i, j] = T[b, j] - theta[b, i]. torch's Huber loss takes x = theta - T
    # = -u; the Huber function is even, and its gradient in theta is autograd's for the
    # formula through u: the same products (x * g, +-kappa * g), with the sign of x.
    n_targets = target.shape[1]
    shape = (batch_size, n_quantiles, n_targets)
    theta = pred_quantiles.unsqueeze(2).expand(shape)
    samples = target.unsqueeze(1).expand(shape)
    # The Huber kernel multiplies by its threshold in double; the formula's ops multiply by
    # kappa rounded to the tensors' dtype, so that is the threshold it gets.
    delta = kappa if kappa == 1.0 else torch.tensor(kappa, dtype=theta.dtype).item()
    if not (math.isfinite(delta) and delta > 0.0):
        raise ValueError(f"kappa {kappa} is not a positive finite number in {theta.dtype}")
    huber = F.huber_loss(theta, samples, reduction="none", delta=delta)
    # |tau - 1| is 1 - tau rounded (rounding is symmetric) and |tau - 0| is tau; u < 0 exactly
    # when T < theta (a difference of unequal floats is never zero).
    taus = taus.view(1, -1, 1)
    weight = torch.where(samples < theta.detach(), 1.0 - taus, taus)
    rho = weight * huber
    # Dividing by 1.0, and averaging over one sample, change no bit (forward or backward):
    # for the default kappa and one target per row those ops are left out.
    if kappa != 1.0:
        rho = rho / kappa
    per_target = rho.sum(dim=1)
    if n_targets == 1:
        return per_target.squeeze(1).mean()
    return per_target.mean(dim=1).mean()


def quantile_mean(quantiles: Tensor) -> Tensor:
    """Mean of the distribution given by N equally weighted quantiles.

    :param quantiles: shape (B, N).
    :return: shape (B,).
    """
    _check_ndim("quantiles", quantiles, 2)
    return quantiles.mean(dim=-1)


def clip_quantiles(pred: Tensor, old_pred: Tensor, clip_range: float) -> Tensor:
    """PPO-style value clipping applied to every quantile on its own.

    ``old + clamp(pred - old, -clip_range, clip_range)``, element-wise, so each quantile may
    move at most ``clip_range`` away from its value under the policy that collected the data.

    :param pred: current predictions, any shape (typically (B, N)).
    :param old_pred: predictions at rollout time, same shape as ``pred``.
    :param clip_range: largest allowed move per quantile (>= 0).
    :return: clipped predictions, same shape as ``pred``; gradients flow through ``pred``
        where it is not clipped.
    """
    if clip_range < 0.0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    if pred.shape != old_pred.shape:
        raise ValueError(
            f"pred and old_pred shapes differ: {tuple(pred.shape)} vs {tuple(old_pred.shape)}"
        )
    return old_pred + torch.clamp(pred - old_pred, -clip_range, clip_range)


def cvar_from_quantiles(quantiles: Tensor, alpha: float) -> Tensor:
    """Lower-tail CVaR of a distribution given by N equally weighted quantiles.

    The quantiles define a piecewise-constant quantile function: after sorting ascending,
    ``F^{-1}(u) = q_(i)`` for ``u`` in ``[i/N, (i+1)/N)``. Then::

        CVaR_alpha = (1 / alpha) * integral_0^alpha F^{-1}(u) du
                   = (1 / alpha) * sum_i w_i q_(i),   w_i = clamp(alpha - i/N, 0, 1/N)

    so the quantile whose bin straddles ``alpha`` contributes a fractional weight.
    ``alpha = 1`` gives the mean. The input is sorted on a copy (quantile heads need not be
    monotone); gradients flow through the sort.

    :param quantiles: shape (B, N), in any order.
    :param alpha: tail level in (0, 1].
    :return: shape (B,).
    """
    _check_alpha(alpha)
    _check_ndim("quantiles", quantiles, 2)
    n_quantiles = quantiles.shape[-1]
    sorted_q, _ = torch.sort(quantiles, dim=-1)
    i = torch.arange(n_quantiles, device=quantiles.device, dtype=quantiles.dtype)
    # Computing alpha * N - i (instead of alpha - i / N) keeps the weights exact for the
    # common case where alpha * N is a whole number.
    weights = torch.clamp(alpha * n_quantiles - i, 0.0, 1.0) / n_quantiles
    return (sorted_q * weights).sum(dim=-1) / alpha


# --------------------------------------------------------------------------------------------
# Categorical representation (Bellemare et al. 2017)
# --------------------------------------------------------------------------------------------


def categorical_support(
    v_min: float,
    v_max: float,
    n_atoms: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Evenly spaced support ``z_k = v_min + k (v_max - v_min) / (K - 1)`` of a C51 critic.

    :param v_min: lowest atom.
    :param v_max: highest atom (> v_min).
    :param n_atoms: number of atoms K (>= 2).
    :param device: device of the result.
    :param dtype: floating point dtype of the result.
    :return: shape (K,), strictly increasing, first and last entries exactly v_min and v_max.
    """
    if not v_min < v_max:
        raise ValueError(f"v_min must be < v_max, got v_min={v_min}, v_max={v_max}")
    if n_atoms < 2:
        raise ValueError(f"n_atoms must be >= 2, got {n_atoms}")
    return torch.linspace(v_min, v_max, n_atoms, device=device, dtype=dtype)


def project_onto_support(values: Tensor, probs: Tensor, support: Tensor) -> Tensor:
    """Project a distribution with arbitrary atoms onto the support (C51, Bellemare et al. 2017).

    Each atom ``v`` with mass ``p`` is clamped to ``[z_0, z_{K-1}]`` and its mass split
    between the two support atoms around it by linear interpolation::

        l    = index with z_l <= v < z_{l+1}   (l = K-2 for v = z_{K-1})
        frac = (v - z_l) / (z_{l+1} - z_l)
        out[l]   += p (1 - frac)
        out[l+1] += p frac

    Mass is conserved and, inside the support, so is the expected value. The lower neighbour
    is found with ``searchsorted`` against the support itself rather than with
    ``floor((v - v_min) / delta)``: the classic C51 code takes ``floor`` and ``ceil`` of that
    ratio, which coincide when it is integral and then drop the atom's mass, and the ratio
    itself can land a rounding error below an integer. Comparing against the stored atoms puts
    a value equal to an atom entirely on that atom, exactly.

    :param values: atom locations, shape (B, K').
    :param probs: atom masses, shape (B, K') (or broadcastable to ``values``).
    :param support: support atoms, shape (K,), strictly increasing (e.g.
        :func:`categorical_support`).
    :return: projected probabilities, shape (B, K), in the dtype of ``probs`` and ``values``.
    """
    _check_support(support)
    _check_ndim("values", values, 2)
    probs = probs.expand_as(values)
    n_atoms = support.shape[0]
    dtype = torch.promote_types(values.dtype, probs.dtype)
    support = support.to(device=values.device, dtype=dtype).contiguous()
    values = values.to(dtype)

    clamped = values.clamp(support[0], support[-1]).contiguous()
    # right=True: a value equal to z_k gets index k + 1, so lower = k and frac = 0.
    lower = torch.searchsorted(support, clamped, right=True) - 1
    lower = lower.clamp(0, n_atoms - 2)
    upper = lower + 1
    z_lower = support[lower]
    frac = (clamped - z_lower) / (support[upper] - z_lower)

    probs = probs.to(dtype)
    out = torch.zeros(values.shape[0], n_atoms, device=values.device, dtype=dtype)
    out.scatter_add_(1, lower, probs * (1.0 - frac))
    out.scatter_add_(1, upper, probs * frac)
    return out


def two_hot(targets: Tensor, support: Tensor) -> Tensor:
    """Two-hot encoding of scalar targets on the support.

    Equal to ``project_onto_support(targets[:, None], ones, support)``: each target's unit mass
    goes to its two neighbouring atoms, so ``categorical_mean(two_hot(t)) == clamp(t)``.

    :param targets: shape (B,).
    :param support: shape (K,), strictly increasing.
    :return: shape (B, K).
    """
    _check_ndim("targets", targets, 1)
    values = targets.unsqueeze(-1)
    return project_onto_support(values, torch.ones_like(values), support)


def categorical_mean(probs: Tensor, support: Tensor) -> Tensor:
    """Expected value ``sum_k p_k z_k`` of a categorical distribution.

    :param probs: shape (B, K).
    :param support: shape (K,).
    :return: shape (B,).
    """
    _check_support(support)
    _check_ndim("probs", probs, 2)
    return (probs * support.to(probs.dtype)).sum(dim=-1)


def categorical_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy between target probabilities and a categorical head, batch-averaged.

    ``mean_b( -sum_k p_bk log softmax(logits)_bk )``: the C51 loss (KL to the projected target
    up to the target's entropy, which carries no gradient).

    :param logits: unnormalised log-probabilities, shape (B, K).
    :param target_probs: target probabilities, shape (B, K).
    :return: scalar loss.
    """
    _check_ndim("logits", logits, 2)
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"logits and target_probs shapes differ: {tuple(logits.shape)} vs "
            f"{tuple(target_probs.shape)}"
        )
    log_probs = F.log_softmax(logits, dim=-1)
    return -(target_probs.to(log_probs.dtype) * log_probs).sum(dim=-1).mean()


def shift_and_reproject(probs: Tensor, support: Tensor, shift: Tensor) -> Tensor:
    """Move every atom of each row by ``shift[b]`` and project back onto the support.

    Used for distributional targets of the form ``Z + c`` (e.g. a return normaliser's offset,
    or ``r + gamma * Z`` after scaling has been folded into the support).

    :param probs: shape (B, K) on ``support``.
    :param support: shape (K,), strictly increasing.
    :param shift: shape (B,).
    :return: shape (B, K); with a zero shift, exactly ``probs``.
    """
    _check_support(support)
    _check_ndim("probs", probs, 2)
    _check_ndim("shift", shift, 1)
    if probs.shape[-1] != support.shape[0]:
        raise ValueError(f"probs has {probs.shape[-1]} atoms, support has {support.shape[0]}")
    values = support.to(device=probs.device).unsqueeze(0) + shift.unsqueeze(-1)
    return project_onto_support(values, probs, support)


def cvar_from_categorical(probs: Tensor, support: Tensor, alpha: float) -> Tensor:
    """Lower-tail CVaR of a categorical distribution on an ascending support.

    With ``c_k = sum_{j<k} p_j`` the mass strictly below atom k, atom k covers the levels
    ``[c_k, c_k + p_k)`` of the quantile function, so::

        w_k        = clamp(alpha - c_k, 0, p_k)
        CVaR_alpha = (1 / alpha) * sum_k w_k z_k

    The atom straddling ``alpha`` contributes the fractional mass ``alpha - c_k``; ``alpha = 1``
    gives the mean.

    :param probs: shape (B, K), rows summing to one.
    :param support: shape (K,), ascending.
    :param alpha: tail level in (0, 1].
    :return: shape (B,).
    """
    _check_alpha(alpha)
    _check_support(support)
    _check_ndim("probs", probs, 2)
    if probs.shape[-1] != support.shape[0]:
        raise ValueError(f"probs has {probs.shape[-1]} atoms, support has {support.shape[0]}")
    mass_below = torch.cumsum(probs, dim=-1) - probs
    weights = torch.minimum((alpha - mass_below).clamp(min=0.0), probs)
    return (weights * support.to(probs.dtype)).sum(dim=-1) / alpha
