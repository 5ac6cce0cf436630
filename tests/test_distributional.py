"""Tests for dppo_ckpt.distributional: hand-computed cases, loop references and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dppo_ckpt.distributional import (
    categorical_cross_entropy,
    categorical_mean,
    categorical_support,
    clip_quantiles,
    cvar_from_categorical,
    cvar_from_quantiles,
    project_onto_support,
    quantile_huber_loss,
    quantile_mean,
    quantile_midpoints,
    shift_and_reproject,
    two_hot,
)

F64 = torch.float64


def _t(data: object) -> torch.Tensor:
    return torch.tensor(data, dtype=F64)


# --------------------------------------------------------------------------------------------
# Quantiles
# --------------------------------------------------------------------------------------------


def test_quantile_midpoints_values() -> None:
    taus = quantile_midpoints(4, dtype=F64)
    assert torch.equal(taus, _t([0.125, 0.375, 0.625, 0.875]))
    assert torch.equal(quantile_midpoints(1, dtype=F64), _t([0.5]))
    assert quantile_midpoints(3).dtype == torch.float32


def test_quantile_midpoints_rejects_zero() -> None:
    with pytest.raises(ValueError, match="n_quantiles"):
        quantile_midpoints(0)


def test_quantile_huber_loss_hand_computed() -> None:
    # N = 2 quantiles at taus (0.25, 0.75), both rows predict (0, 1), M = 2 targets each.
    # Row 0, targets (0.5, 3.0):
    #   i=0 (tau .25, theta 0): u=+0.5 quad  0.125 * |.25-0| = 0.03125
    #                           u=+3.0 lin   2.5   * |.25-0| = 0.625
    #   i=1 (tau .75, theta 1): u=-0.5 quad  0.125 * |.75-1| = 0.03125
    #                           u=+2.0 lin   1.5   * |.75-0| = 1.125
    #   sum over i, mean over j: (0.03125 + 0.625 + 0.03125 + 1.125) / 2 = 0.90625
    # Row 1, targets (-2.0, 1.25):
    #   i=0: u=-2.0  lin  1.5      * |.25-1| = 1.125
    #        u=+1.25 lin  0.75     * |.25-0| = 0.1875
    #   i=1: u=-3.0  lin  2.5      * |.75-1| = 0.625
    #        u=+0.25 quad 0.03125  * |.75-0| = 0.0234375
    #   (1.125 + 0.1875 + 0.625 + 0.0234375) / 2 = 0.98046875
    # Mean over the batch: (0.90625 + 0.98046875) / 2 = 0.943359375
    pred = _t([[0.0, 1.0], [0.0, 1.0]])
    target = _t([[0.5, 3.0], [-2.0, 1.25]])
    taus = _t([0.25, 0.75])
    loss = quantile_huber_loss(pred, target, taus, kappa=1.0)
    assert loss.item() == pytest.approx(0.943359375, abs=1e-12)


def test_quantile_huber_loss_hand_computed_kappa_two() -> None:
    # Row 0 of the case above with kappa = 2 (|u| <= 2 is quadratic, else 2 (|u| - 1)):
    #   u=+0.5 -> 0.125 * .25 = 0.03125    u=+3.0 -> 4.0 * .25 = 1.0
    #   u=-0.5 -> 0.125 * .25 = 0.03125    u=+2.0 -> 2.0 * .75 = 1.5   (boundary: quadratic)
    #   sum = 2.5625, divided by kappa = 1.28125, mean over the 2 targets = 0.640625
    pred = _t([[0.0, 1.0]])
    target = _t([[0.5, 3.0]])
    loss = quantile_huber_loss(pred, target, _t([0.25, 0.75]), kappa=2.0)
    assert loss.item() == pytest.approx(0.640625, abs=1e-12)


def _quantile_huber_loop(
    pred: torch.Tensor, target: torch.Tensor, taus: torch.Tensor, kappa: float
) -> float:
    """Straight transcription of Dabney et al. 2018, eq. 9-10, one pair at a time."""
    batch_size, n_quantiles = pred.shape
    n_targets = target.shape[1]
    total = 0.0
    for b in range(batch_size):
        row = 0.0
        for i in range(n_quantiles):
            for j in range(n_targets):
                u = float(target[b, j] - pred[b, i])
                huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
                indicator = 1.0 if u < 0 else 0.0
                row += abs(float(taus[i]) - indicator) * huber / kappa
        total += row / n_targets
    return total / batch_size


@pytest.mark.parametrize("kappa", [0.1, 1.0, 3.0])
def test_quantile_huber_loss_matches_loop_reference(kappa: float) -> None:
    gen = torch.Generator().manual_seed(1234)
    pred = torch.randn(5, 7, generator=gen, dtype=F64) * 2.0
    target = torch.randn(5, 4, generator=gen, dtype=F64) * 2.0
    taus = quantile_midpoints(7, dtype=F64)
    loss = quantile_huber_loss(pred, target, taus, kappa=kappa)
    assert loss.item() == pytest.approx(_quantile_huber_loop(pred, target, taus, kappa), rel=1e-12)


def test_quantile_huber_loss_accepts_one_target_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 3, generator=gen, dtype=F64)
    target = torch.randn(6, generator=gen, dtype=F64)
    taus = quantile_midpoints(3, dtype=F64)
    flat = quantile_huber_loss(pred, target, taus)
    column = quantile_huber_loss(pred, target[:, None], taus)
    assert flat.item() == column.item()
    assert flat.item() == pytest.approx(_quantile_huber_loop(pred, target[:, None], taus, 1.0))


def test_quantile_huber_loss_gradient_moves_toward_tau_quantile() -> None:
    # Targets 0..99: the 0.25-quantile lies near 24.75, the 0.75-quantile near 74.25.
    target = torch.arange(100, dtype=F64)[None, :]
    taus = _t([0.25, 0.75])

    # Both predictions start above their quantile: the gradient must be positive for both
    # (descent lowers them), and moving them halfway to the quantile must lower the loss.
    pred = _t([[60.0, 90.0]]).requires_grad_(True)
    loss = quantile_huber_loss(pred, target, taus)
    loss.backward()
    assert pred.grad is not None
    assert (pred.grad > 0).all()
    closer = _t([[42.0, 82.0]])
    assert quantile_huber_loss(closer, target, taus) < loss

    # Both below: the gradient must be negative.
    pred = _t([[5.0, 50.0]]).requires_grad_(True)
    quantile_huber_loss(pred, target, taus).backward()
    assert pred.grad is not None
    assert (pred.grad < 0).all()

    # The minimiser over a grid sits at the tau-quantile of the targets.
    grid = torch.linspace(0.0, 99.0, 397, dtype=F64)
    losses = torch.stack(
        [quantile_huber_loss(g.view(1, 1), target, _t([0.25]), kappa=0.01) for g in grid]
    )
    best = grid[losses.argmin()].item()
    assert 24.0 <= best <= 25.0


def test_quantile_huber_loss_gradient_reaches_pred_only() -> None:
    pred = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    target = torch.ones(2, 4, dtype=F64, requires_grad=True)
    loss = quantile_huber_loss(pred, target, quantile_midpoints(3, dtype=F64))
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None


@pytest.mark.parametrize("kappa", [0.0, -1.0])
def test_quantile_huber_loss_rejects_bad_kappa(kappa: float) -> None:
    with pytest.raises(ValueError, match="kappa"):
        quantile_huber_loss(torch.zeros(2, 3), torch.zeros(2, 4), quantile_midpoints(3), kappa)


def test_quantile_huber_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="batch"):
        quantile_huber_loss(torch.zeros(2, 3), torch.zeros(5, 4), quantile_midpoints(3))
    with pytest.raises(ValueError, match="taus"):
        quantile_huber_loss(torch.zeros(2, 3), torch.zeros(2, 4), quantile_midpoints(4))


def test_quantile_mean() -> None:
    assert torch.equal(quantile_mean(_t([[1.0, 2.0, 6.0], [0.0, 0.0, -3.0]])), _t([3.0, -1.0]))


def test_clip_quantiles_per_quantile() -> None:
    old = _t([[0.0, 1.0, -1.0, 5.0]])
    pred = _t([[0.5, 1.1, -3.0, 4.9]])
    clipped = clip_quantiles(pred, old, 0.2)
    # Each quantile is clipped around its own old value.
    assert torch.allclose(clipped, _t([[0.2, 1.1, -1.2, 4.9]]), atol=1e-15)


def test_clip_quantiles_gradient_only_where_unclipped() -> None:
    old = _t([[0.0, 0.0]])
    pred = _t([[0.1, 0.5]]).requires_grad_(True)
    clip_quantiles(pred, old, 0.2).sum().backward()
    assert pred.grad is not None
    assert torch.equal(pred.grad, _t([[1.0, 0.0]]))


def test_clip_quantiles_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="clip_range"):
        clip_quantiles(torch.zeros(2, 3), torch.zeros(2, 3), -0.1)
    with pytest.raises(ValueError, match="shapes"):
        clip_quantiles(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)


def test_cvar_from_quantiles_uniform_whole_bins() -> None:
    q = torch.arange(1.0, 11.0, dtype=F64)[None, :]
    # alpha = 0.3 covers exactly the three lowest quantiles: (1 + 2 + 3) / 3.
    assert cvar_from_quantiles(q, 0.3).item() == pytest.approx(2.0, abs=1e-12)


def test_cvar_from_quantiles_fractional_boundary() -> None:
    q = torch.arange(1.0, 11.0, dtype=F64)[None, :]
    # alpha = 0.25: 0.1 * 1 + 0.1 * 2 + 0.05 * 3 = 0.45, divided by 0.25 -> 1.8.
    assert cvar_from_quantiles(q, 0.25).item() == pytest.approx(1.8, abs=1e-12)
    # alpha = 0.05 lies inside the lowest bin: CVaR is the lowest quantile.
    assert cvar_from_quantiles(q, 0.05).item() == pytest.approx(1.0, abs=1e-12)


def test_cvar_from_quantiles_alpha_one_is_mean() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 9, generator=gen, dtype=F64)
    assert torch.allclose(cvar_from_quantiles(q, 1.0), q.mean(dim=-1), atol=1e-12)


def test_cvar_from_quantiles_sorts_a_copy() -> None:
    q = _t([[7.0, 1.0, 10.0, 3.0, 2.0, 9.0, 4.0, 8.0, 6.0, 5.0]])
    before = q.clone()
    assert cvar_from_quantiles(q, 0.3).item() == pytest.approx(2.0, abs=1e-12)
    assert torch.equal(q, before)


def test_cvar_from_quantiles_matches_numerical_integral() -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 6, generator=gen, dtype=F64)
    alpha = 0.37
    # Midpoint rule on the piecewise-constant quantile function F^{-1}(u) = q_(floor(u N)).
    n_grid = 600_000
    u = (torch.arange(n_grid, dtype=F64) + 0.5) / n_grid * alpha
    idx = torch.floor(u * q.shape[1]).long()
    reference = q.sort(dim=-1).values[:, idx].mean(dim=-1)
    assert torch.allclose(cvar_from_quantiles(q, alpha), reference, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.01])
def test_cvar_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        cvar_from_quantiles(torch.zeros(1, 4), alpha)
    with pytest.raises(ValueError, match="alpha"):
        cvar_from_categorical(torch.full((1, 3), 1 / 3), categorical_support(-1, 1, 3), alpha)


# --------------------------------------------------------------------------------------------
# Categorical
# --------------------------------------------------------------------------------------------


def test_categorical_support_endpoints_and_spacing() -> None:
    support = categorical_support(-10.0, 10.0, 51, dtype=F64)
    assert support.shape == (51,)
    assert support[0].item() == -10.0 and support[-1].item() == 10.0
    assert torch.allclose(support.diff(), torch.full((50,), 0.4, dtype=F64))


def test_categorical_support_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="v_min"):
        categorical_support(1.0, 1.0, 11)
    with pytest.raises(ValueError, match="v_min"):
        categorical_support(2.0, -2.0, 11)
    with pytest.raises(ValueError, match="n_atoms"):
        categorical_support(-1.0, 1.0, 1)


def test_two_hot_linear_interpolation() -> None:
    support = _t([0.0, 1.0, 2.0, 3.0, 4.0])
    encoded = two_hot(_t([1.25, 3.5]), support)
    assert torch.allclose(
        encoded,
        _t([[0.0, 0.75, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5, 0.5]]),
        atol=1e-15,
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_two_hot_exact_on_every_atom(dtype: torch.dtype) -> None:
    # A spacing of 0.4 is not representable in binary: (z_k - v_min) / delta lands a rounding
    # error away from k for some k, which must not leak mass to a neighbour.
    support = categorical_support(-10.0, 10.0, 51, dtype=dtype)
    encoded = two_hot(support.clone(), support)
    assert torch.equal(encoded, torch.eye(51, dtype=dtype))


def test_two_hot_clamps_at_the_edges() -> None:
    support = categorical_support(-2.0, 2.0, 5, dtype=F64)
    encoded = two_hot(_t([-2.0, 2.0, -100.0, 100.0, math.inf, -math.inf]), support)
    low = _t([1.0, 0.0, 0.0, 0.0, 0.0])
    high = _t([0.0, 0.0, 0.0, 0.0, 1.0])
    assert torch.equal(encoded, torch.stack([low, high, low, high, high, low]))


def test_project_onto_support_several_atoms_hand_computed() -> None:
    support = _t([-1.0, 0.0, 1.0])
    # Row 0: 0.5 at -0.5 -> 0.25/0.25 on (-1, 0); 0.5 at 2.0 (clamped to 1) -> 0.5 on 1.
    # Row 1: 0.2 at 0.0 -> all on 0; 0.8 at 0.75 -> 0.2 on 0 and 0.6 on 1.
    values = _t([[-0.5, 2.0], [0.0, 0.75]])
    probs = _t([[0.5, 0.5], [0.2, 0.8]])
    projected = project_onto_support(values, probs, support)
    assert torch.allclose(projected, _t([[0.25, 0.25, 0.5], [0.0, 0.4, 0.6]]), atol=1e-15)


_finite = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    n_atoms=st.integers(min_value=2, max_value=41),
    rows=st.lists(
        st.lists(
            st.tuples(_finite, st.floats(min_value=0.0, max_value=1.0)), min_size=1, max_size=8
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_project_onto_support_conserves_mass(
    n_atoms: int, rows: list[list[tuple[float, float]]]
) -> None:
    width = max(len(row) for row in rows)
    # Pad rows with zero-mass atoms so that they stack.
    padded = [row + [(0.0, 0.0)] * (width - len(row)) for row in rows]
    values = _t([[v for v, _ in row] for row in padded])
    masses = _t([[p for _, p in row] for row in padded])
    support = categorical_support(-10.0, 10.0, n_atoms, dtype=F64)
    projected = project_onto_support(values, masses, support)
    assert projected.shape == (len(rows), n_atoms)
    assert (projected >= 0).all()
    assert torch.allclose(projected.sum(dim=-1), masses.sum(dim=-1), atol=1e-12)
    # Inside the support the expected value is preserved too (after clamping each atom).
    expected_mean = (values.clamp(-10.0, 10.0) * masses).sum(dim=-1)
    assert torch.allclose(categorical_mean(projected, support), expected_mean, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    targets=st.lists(_finite, min_size=1, max_size=16),
    n_atoms=st.integers(min_value=2, max_value=101),
)
def test_two_hot_mean_is_clamped_target(targets: list[float], n_atoms: int) -> None:
    support = categorical_support(-5.0, 5.0, n_atoms, dtype=F64)
    t = _t(targets)
    encoded = two_hot(t, support)
    assert torch.allclose(encoded.sum(dim=-1), torch.ones(len(targets), dtype=F64), atol=1e-12)
    assert ((encoded > 0).sum(dim=-1) <= 2).all()
    assert torch.allclose(categorical_mean(encoded, support), t.clamp(-5.0, 5.0), atol=1e-9)


def test_shift_and_reproject_zero_shift_is_identity() -> None:
    gen = torch.Generator().manual_seed(11)
    support = categorical_support(-10.0, 10.0, 51)
    probs = torch.softmax(torch.randn(8, 51, generator=gen), dim=-1)
    shifted = shift_and_reproject(probs, support, torch.zeros(8))
    assert torch.equal(shifted, probs)


def test_shift_and_reproject_moves_mass() -> None:
    support = categorical_support(0.0, 4.0, 5, dtype=F64)
    probs = _t([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    # Row 0 moves one atom up (the top atom's mass would leave the support and stays at 4);
    # row 1 moves half an atom up: each mass splits evenly between its atom and the next.
    shifted = shift_and_reproject(probs, support, _t([1.0, 0.5]))
    expected = _t([[0.0, 0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.25, 0.0, 0.0]])
    assert torch.allclose(shifted, expected, atol=1e-15)
    # Inside the support the mean moves by the shift.
    assert torch.allclose(
        categorical_mean(shifted, support), categorical_mean(probs, support) + _t([1.0, 0.5])
    )


def test_categorical_cross_entropy_hand_value() -> None:
    # Row 0: softmax(0, 0) = (.5, .5), target (.25, .75): -(ln .5) = ln 2.
    # Row 1: softmax(0, ln 3) = (.25, .75), target (1, 0): -ln .25 = ln 4.
    logits = _t([[0.0, 0.0], [0.0, math.log(3.0)]])
    target = _t([[0.25, 0.75], [1.0, 0.0]])
    loss = categorical_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(1.5 * math.log(2.0), abs=1e-12)


def test_categorical_cross_entropy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        categorical_cross_entropy(torch.zeros(2, 5), torch.zeros(2, 4))


def test_cvar_from_categorical_known_masses() -> None:
    support = _t([-1.0, 0.0, 1.0])
    probs = _t([[0.2, 0.5, 0.3]])
    # alpha = 0.5: all 0.2 of -1 and 0.3 of the 0.5 at 0 -> -0.2 / 0.5.
    assert cvar_from_categorical(probs, support, 0.5).item() == pytest.approx(-0.4, abs=1e-12)
    # alpha inside the lowest atom's mass: CVaR is that atom.
    assert cvar_from_categorical(probs, support, 0.1).item() == pytest.approx(-1.0, abs=1e-12)
    # alpha = 0.9: -0.2 + 0 + 0.2 * 1 = 0.
    assert cvar_from_categorical(probs, support, 0.9).item() == pytest.approx(0.0, abs=1e-12)
    # alpha = 1 is the mean: -0.2 + 0.3 = 0.1.
    assert cvar_from_categorical(probs, support, 1.0).item() == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.3, 0.62, 1.0])
def test_cvar_from_categorical_agrees_with_quantiles(alpha: float) -> None:
    # N equally weighted quantiles sitting on N support atoms are the same distribution.
    support = torch.arange(1.0, 11.0, dtype=F64)
    probs = torch.full((1, 10), 0.1, dtype=F64)
    from_categorical = cvar_from_categorical(probs, support, alpha)
    from_quantiles = cvar_from_quantiles(support[None, :], alpha)
    assert torch.allclose(from_categorical, from_quantiles, atol=1e-12)


def test_cvar_is_vectorised_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 8, generator=gen, dtype=F64)
    batched = cvar_from_quantiles(q, 0.4)
    rows = torch.cat([cvar_from_quantiles(q[i : i + 1], 0.4) for i in range(6)])
    assert torch.equal(batched, rows)

    support = categorical_support(-3.0, 3.0, 13, dtype=F64)
    probs = torch.softmax(torch.randn(6, 13, generator=gen, dtype=F64), dim=-1)
    batched = cvar_from_categorical(probs, support, 0.4)
    rows = torch.cat([cvar_from_categorical(probs[i : i + 1], support, 0.4) for i in range(6)])
    assert torch.equal(batched, rows)


@pytest.mark.parametrize(
    ("kappa", "dtype"),
    [(float("nan"), torch.float32), (float("inf"), torch.float32), (1e-50, torch.float32),
     (1e-8, torch.float16)],  # fmt: skip
)
def test_a_kappa_that_is_no_positive_number_in_the_dtype_is_a_clear_error(kappa, dtype):
    pred = torch.randn(4, 3).to(dtype)
    with pytest.raises(ValueError, match="kappa"):
        quantile_huber_loss(pred, torch.randn(4, 2).to(dtype), torch.rand(3), kappa=kappa)
