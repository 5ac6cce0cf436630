"""Tests for dppo_ckpt.vgs: the scaler against a plain-Python float64 reference, its state,
its pickling rules and its parameter links.

Tolerances. The reference runs in float64; the scaler keeps its statistics in the parameters'
dtype. With float64 parameters both evaluate the same formulas in the same precision and agree
to ~1e-12 or better, so we demand ``rel 1e-9``. With float32 parameters (the usual case) every
update rounds each average at unit roundoff u = 6e-8 and the moving average shrinks old errors,
so over the <= 12 steps of a stream the averages stay within a few u of the float64 ones: we
allow ``rel 1e-6``, plus an absolute floor of ``1e-6 * max|g|`` (``max g^2`` for the squares)
because ``m`` may cancel to almost zero, where only its absolute error (a few u * max|g|) is
meaningful, plus 1e-37 for values below float32's normal range. Over 3000 random streams the
largest float32 error seen was about a tenth of this bound. The aggregated ratio computed from
float32 averages can differ from the float64 one by more than that when a tensor's mean is tiny
next to its spread (``sum(mh^2)`` then inherits the absolute error of ``m``), so for float32 the
scale and ``R`` are checked against the reference applied to the scaler's own averages (whose
accuracy the buffer check establishes): ``rel 1e-6`` (``R`` also ``abs 1e-6``, as it can be ~0).
The scale ``(level/R)**alpha`` with ``alpha <= 1`` inherits at most alpha times the relative
error of ``R`` and of the level; the level, a geometric mean, inherits that of ``R``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from stable_baselines3.common.logger import KVWriter, Logger

import dppo_ckpt.vgs as vgs_module
from dppo_ckpt.vgs import VarianceGradientScaler

# --------------------------------------------------------------------------------------------
# A naive reference: plain Python floats (float64), one element at a time
# --------------------------------------------------------------------------------------------


def _linear_quantile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (NumPy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


@dataclass
class _Outcome:
    """What one reference step did, and which regime it was in."""

    scale: float
    noise_ratio: float
    level: float | None
    warmup: bool
    floored: bool  # (level/R)**alpha fell below min_scale
    at_one: bool  # the scale was 1 after warm-up (R at or below its level, or level unset)
    skipped: int  # tensors whose gradient was None


@dataclass
class _Reference:
    """The VGS of DESIGN.md and of the class docstring written out literally, element by
    element."""

    sizes: list[int]
    beta: float = 0.99
    alpha: float = 1.0
    eps: float = 1e-8
    warmup_steps: int = 100
    quantile: float = 0.9
    level_beta: float = 0.99
    min_scale: float = 0.1
    t: int = 0
    level: float | None = None
    m: list[list[float]] = field(default_factory=list)
    v: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.m = [[0.0] * n for n in self.sizes]
        self.v = [[0.0] * n for n in self.sizes]

    def ratio(
        self, index: int, m: list[float] | None = None, v: list[float] | None = None
    ) -> float:
        """r_p of tensor ``index`` at the current step (optionally from other averages)."""
        m = self.m[index] if m is None else m
        v = self.v[index] if v is None else v
        correction = 1.0 - self.beta**self.t
        variance = signal = 0.0
        for m_k, v_k in zip(m, v, strict=True):
            mh, vh = m_k / correction, v_k / correction
            variance += max(vh - mh * mh, 0.0)
            signal += mh * mh
        return variance / (signal + self.eps)

    def finish(self, ratios: list[float], skipped: int, level: float | None) -> _Outcome:
        """Aggregate per-tensor ratios into R, the scale and the new level, at step ``self.t``
        from the level ``level`` before it."""
        noise_ratio = _linear_quantile(ratios, self.quantile)
        usable = 0.0 < noise_ratio < math.inf
        warmup = self.t <= self.warmup_steps
        floored = False
        can_start = usable and self.t >= 2
        if warmup:
            scale = 1.0
            if self.t == self.warmup_steps and can_start:
                level = noise_ratio
        elif level is None:
            scale, level = 1.0, (noise_ratio if can_start else None)
        else:
            raw = (level / noise_ratio) ** self.alpha if noise_ratio > 0 else 1.0
            floored = raw < self.min_scale
            scale = min(max(raw, self.min_scale), 1.0)
            if usable:
                b = self.level_beta
                level = math.exp(b * math.log(level) + (1 - b) * math.log(noise_ratio))
        return _Outcome(
            scale=scale,
            noise_ratio=noise_ratio,
            level=level,
            warmup=warmup,
            floored=floored,
            at_one=not warmup and scale == 1.0,
            skipped=skipped,
        )

    def step(self, grads: list[list[float] | None]) -> _Outcome | None:
        """One step on flattened gradients (None: no gradient); None if nothing happened."""
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return None
        self.t += 1
        b = self.beta
        for i in present:
            g, m, v = grads[i], self.m[i], self.v[i]
            assert g is not None
            for k, g_k in enumerate(g):
                m[k] = b * m[k] + (1.0 - b) * g_k
                v[k] = b * v[k] + (1.0 - b) * g_k * g_k
        outcome = self.finish(
            [self.ratio(i) for i in present], len(grads) - len(present), self.level
        )
        self.level = outcome.level
        return outcome


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

# Below float32's smallest normal number (1.2e-38) there is no relative precision left: the
# tiniest gradients hypothesis draws square to zero in float32 but not in float64.
_F32_TINY = 1e-37


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[Any]:
    return [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]


def _flat(tensor: torch.Tensor) -> list[float]:
    return tensor.detach().double().flatten().tolist()


def _assert_close(actual: Any, expected: Any, rel: float, abs_: float, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    bound = rel * np.abs(expected) + abs_
    error = np.abs(actual - expected)
    assert np.all(error <= bound), f"{what}: max error {error.max()} exceeds bound"


def _set_grads(params: list[Any], grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Give each parameter a fresh gradient; return the originals (copies) for comparison."""
    for param, grad in zip(params, grads, strict=True):
        param.grad = None if grad is None else grad.clone()
    return [None if grad is None else grad.clone() for grad in grads]


def _step_and_check_in_place(
    scaler: VarianceGradientScaler, params: list[Any], grads: list[torch.Tensor | None]
) -> float:
    """Run one step and check every live gradient was read and left exactly as it was."""
    originals = _set_grads(params, grads)
    live = [param.grad for param in params]
    scale = scaler.compute_scale()
    for param, before, tensor in zip(params, originals, live, strict=True):
        if before is None:
            assert param.grad is None
            continue
        assert param.grad is tensor, "the gradient tensor was replaced"
        assert torch.equal(param.grad, before), "compute_scale() changed a raw gradient"
    return scale


@dataclass
class _Stream:
    shapes: list[tuple[int, ...]]
    config: dict[str, Any]
    steps: list[list[torch.Tensor | None]]


def _run_against_reference(stream: _Stream, dtype: torch.dtype) -> list[_Outcome]:
    """Drive scaler and reference with the same gradients, checking every step."""
    params = _params(stream.shapes, dtype)
    scaler = VarianceGradientScaler(params, **stream.config)
    reference = _Reference([math.prod(s) for s in stream.shapes], **stream.config)
    exact = dtype == torch.float64
    outcomes: list[_Outcome] = []
    max_abs_grad = [0.0] * len(params)
    for grads in stream.steps:
        grads = [None if g is None else g.to(dtype) for g in grads]
        for i, g in enumerate(grads):
            if g is not None and g.numel():
                max_abs_grad[i] = max(max_abs_grad[i], float(g.abs().max()))
        before = scaler.state_dict()
        level_before = reference.level
        scale = _step_and_check_in_place(scaler, params, grads)
        outcome = reference.step([None if g is None else _flat(g) for g in grads])
        if outcome is None:
            # No gradient at all: nothing may change.
            assert scale == 1.0
            _assert_same_state(scaler.state_dict(), before)
            continue
        outcomes.append(outcome)
        assert scaler.step_count == reference.t
        assert scaler.scaling_factor == scale

        assert scaler._exp_avg is not None and scaler._exp_avg_sq is not None
        for i in range(len(params)):
            m, v = _flat(scaler._exp_avg[i]), _flat(scaler._exp_avg_sq[i])
            if exact:
                _assert_close(m, reference.m[i], 1e-9, 1e-300, f"exp_avg[{i}]")
                _assert_close(v, reference.v[i], 1e-9, 1e-300, f"exp_avg_sq[{i}]")
            else:
                floor = 1e-6 * max_abs_grad[i]
                _assert_close(m, reference.m[i], 1e-6, floor + _F32_TINY, f"exp_avg[{i}]")
                v_floor = floor * max_abs_grad[i] + _F32_TINY
                _assert_close(v, reference.v[i], 1e-6, v_floor, f"exp_avg_sq[{i}]")

        if exact:
            expected = outcome
        else:
            # The reference's aggregation applied to the scaler's own float32 averages.
            present = [i for i, g in enumerate(grads) if g is not None]
            ratios = [
                reference.ratio(i, _flat(scaler._exp_avg[i]), _flat(scaler._exp_avg_sq[i]))
                for i in present
            ]
            expected = reference.finish(ratios, outcome.skipped, level_before)
        tolerance = 1e-9 if exact else 1e-6
        # The variance is a difference v - m^2 that cancels when the noise is small next to
        # the signal: R then has a relative error of about k*u/R (k ~ 16 roundings), and the
        # scale (level/R)**alpha, alpha <= 1, at most that. (The level is the scaler's own.)
        ratio = expected.noise_ratio
        rel = tolerance * (1.0 + 1.0 / ratio) if ratio > 0 else math.inf
        if rel < 1.0:
            _assert_close(scale, expected.scale, rel, 0.0, "scale")
        assert stream.config["min_scale"] <= scale <= 1.0
        # R can be ~0 (pure signal); there its absolute error ~u is what matters.
        _assert_close(scaler.noise_ratio, expected.noise_ratio, tolerance, tolerance, "R")
        # R ~ 0 (no noise) is a knife edge: rounding decides whether it is 0 (the level stays
        # unset) or a tiny positive number (it may start the level). The scale is 1 either way.
        if expected.noise_ratio > tolerance:
            assert (scaler.level is None) == (expected.level is None)
            if expected.level is not None:
                _assert_close(scaler.level, expected.level, tolerance, tolerance, "level")
        # From here on the reference continues from the scaler's own level, so that float32
        # errors are not compounded through the level.
        reference.level = scaler.level
    return outcomes


def _assert_same_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Bit-for-bit equality of two state dicts (values, dtypes and raw bytes of tensors)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        if key in ("exp_avg", "exp_avg_sq") and expected[key] is not None:
            assert len(actual[key]) == len(expected[key])
            for a, e in zip(actual[key], expected[key], strict=True):
                assert a.dtype == e.dtype and a.shape == e.shape
                assert torch.equal(a, e)
                assert a.numpy().tobytes() == e.numpy().tobytes()
        else:
            assert actual[key] == expected[key], key


# --------------------------------------------------------------------------------------------
# Matching the reference
# --------------------------------------------------------------------------------------------

_SHAPES = st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=4)


@st.composite
def _streams(draw: st.DrawFn) -> _Stream:
    """Several tensors, up to 12 steps, some gradients None, configs that reach every regime."""
    shapes = draw(_SHAPES)
    config = {
        "beta": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]) | st.floats(0.0, 0.999)),
        "alpha": draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        "eps": draw(st.sampled_from([1e-8, 1e-3, 1.0])),
        "warmup_steps": draw(st.integers(0, 4)),
        "quantile": draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)),
        "level_beta": draw(st.sampled_from([0.0, 0.5, 0.99]) | st.floats(0.0, 0.999)),
        "min_scale": draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]) | st.floats(0.05, 1.0)),
    }
    n_steps = draw(st.integers(1, 12))
    p_missing = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    # Per tensor: a mean and a spread, so that ratios range from ~0 (pure signal) to large
    # (pure noise), and a magnitude, so that tensors differ in scale by orders of magnitude.
    profile = [
        (
            draw(st.floats(-2.0, 2.0)),
            draw(st.sampled_from([0.0, 0.1, 1.0, 3.0])),
            10.0 ** draw(st.integers(-3, 3)),
        )
        for _ in shapes
    ]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    steps = []
    for _ in range(n_steps):
        grads: list[torch.Tensor | None] = []
        for shape, (mean, spread, magnitude) in zip(shapes, profile, strict=True):
            if rng.random() < p_missing:
                grads.append(None)
                continue
            values = magnitude * (mean + spread * rng.standard_normal(shape))
            grads.append(torch.from_numpy(np.asarray(values, dtype=np.float32)))
        steps.append(grads)
    return _Stream(shapes, config, steps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@given(stream=_streams())
def test_matches_reference_on_random_streams(stream: _Stream, dtype: torch.dtype) -> None:
    for outcome in _run_against_reference(stream, dtype):
        # Reported by --hypothesis-show-statistics; the regime tests below guarantee coverage.
        flags = [("warmup", outcome.warmup), ("at_one", outcome.at_one)]
        flags.append(("floored", outcome.floored and not outcome.warmup))
        event("+".join(name for name, hit in flags if hit) or "free")
        if outcome.skipped:
            event("some gradients None")


def _regime_stream(name: str) -> _Stream:
    """A hand-made stream for one regime; the test asserts the regime is really reached."""
    rng = np.random.default_rng(7)
    shapes = [(3, 4), (5,), (), (2, 2, 2)]

    def grads(mean: float, spread: float) -> list[torch.Tensor | None]:
        return [
            torch.from_numpy(np.asarray(mean + spread * rng.standard_normal(s), dtype=np.float32))
            for s in shapes
        ]

    base = dict(beta=0.9, alpha=0.5, eps=1e-8, warmup_steps=2, quantile=0.75, level_beta=0.9)
    if name == "free":  # noise rising step by step: level < R, min_scale < scale < 1
        return _Stream(
            shapes,
            dict(base, min_scale=0.1),
            [grads(1.0, 0.2 * 1.5**k) for k in range(8)],
        )
    if name == "at_one":  # noise falling step by step: R below its level, scale 1
        return _Stream(
            shapes, dict(base, min_scale=0.1), [grads(1.0, 3.0 * 0.3**k) for k in range(8)]
        )
    if name == "floored":  # noise rising fast, strong damping: (level/R)**alpha < min_scale
        return _Stream(
            shapes,
            dict(base, alpha=1.0, min_scale=0.6),
            [grads(1.0, 0.05 * 4.0**k) for k in range(8)],
        )
    if name == "missing":  # some gradients None at some steps, one step with none at all
        steps = [grads(0.5, 1.0) for _ in range(8)]
        steps[3][1] = steps[3][2] = None
        steps[5] = [None] * len(shapes)
        steps[6][0] = None
        return _Stream(shapes, dict(base, min_scale=0.1), steps)
    raise AssertionError(name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("regime", ["free", "at_one", "floored", "missing"])
def test_each_regime_is_reached_and_matches_reference(regime: str, dtype: torch.dtype) -> None:
    stream = _regime_stream(regime)
    outcomes = _run_against_reference(stream, dtype)
    assert [o.warmup for o in outcomes[:3]] == [True, True, False]  # warmup_steps=2
    assert outcomes[1].level == outcomes[1].noise_ratio  # the last warm-up step sets it
    after = outcomes[2:]
    if regime == "free":
        assert all(not o.floored and stream.config["min_scale"] < o.scale < 1 for o in after)
    elif regime == "at_one":
        assert all(o.at_one for o in after)
    elif regime == "floored":
        assert all(o.floored and o.scale == stream.config["min_scale"] for o in after[1:])
    else:
        assert len(outcomes) == len(stream.steps) - 1  # the all-None step did not count
        assert any(o.skipped for o in outcomes)


@pytest.mark.parametrize("group_elements", [1, 5, 13])
def test_processing_in_groups_matches_reference(
    monkeypatch: pytest.MonkeyPatch, group_elements: int
) -> None:
    # Real models form several groups; the tiny tensors here form one unless the bound shrinks.
    monkeypatch.setattr(vgs_module, "_GROUP_ELEMENTS", group_elements)
    stream = _regime_stream("missing")
    assert len(vgs_module._groups([torch.zeros(s) for s in stream.shapes])) > 1
    _run_against_reference(stream, torch.float32)


@given(sizes=st.lists(st.integers(0, 50), max_size=12), bound=st.integers(1, 60))
def test_groups_partition_the_tensors_in_order(sizes: list[int], bound: int) -> None:
    tensors = [torch.zeros(n) for n in sizes]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vgs_module, "_GROUP_ELEMENTS", bound)
        groups = vgs_module._groups(tensors)
    assert [i for start, stop in groups for i in range(start, stop)] == list(range(len(sizes)))
    assert all(start < stop for start, stop in groups)
    # Every group but the last reaches the bound, and would not without its last tensor.
    for start, stop in groups[:-1]:
        assert sum(sizes[start:stop]) >= bound > sum(sizes[start : stop - 1])


def test_quantile_interpolates_linearly_between_tensors() -> None:
    # Four single-element tensors with ratios known in closed form. With beta = 0.5 and
    # gradients a then b: m = .25a + .5b, v = .25a^2 + .5b^2, 1 - beta^2 = .75, so
    # mh = (a + 2b)/3, vh = (a^2 + 2b^2)/3 and var = vh - mh^2 = 2(a - b)^2/9.
    params = _params([(), (), (), ()])
    scaler = VarianceGradientScaler(params, beta=0.5, eps=1e-300, warmup_steps=2, quantile=0.3)
    first = [torch.tensor(x) for x in (1.0, 1.0, 1.0, 1.0)]
    second = [torch.tensor(x) for x in (1.0, 4.0, -2.0, 0.25)]
    ratios = []
    for a, b in zip(first, second, strict=True):
        a, b = float(a), float(b)
        ratios.append((2 * (a - b) ** 2 / 9) / ((a + 2 * b) / 3) ** 2)
    _step_and_check_in_place(scaler, params, first)
    _step_and_check_in_place(scaler, params, second)
    expected = float(torch.quantile(torch.tensor(ratios, dtype=torch.float64), 0.3))
    assert expected == pytest.approx(_linear_quantile(ratios, 0.3), rel=1e-12)
    assert scaler.noise_ratio == pytest.approx(expected, rel=1e-5)
    assert scaler.level == scaler.noise_ratio  # the last warm-up step starts the level


def test_variance_is_clamped_element_wise_before_summing() -> None:
    # Averages from real gradients always have vh >= mh^2 (Jensen), so only restored
    # statistics where one element has v < m^2 show that the clamp acts per element: summed
    # unclamped, element 0's negative variance would outweigh element 1's positive one.
    f64 = torch.float64
    params = _params([(2,)], f64)
    config = dict(beta=0.5, alpha=1.0, eps=1e-12, warmup_steps=0)
    scaler = VarianceGradientScaler(params, **config)
    state = scaler.state_dict()
    state.update(step_count=3, level=0.1, exp_avg=[torch.tensor([2.0, 0.1], dtype=f64)])
    state["exp_avg_sq"] = [torch.tensor([0.0, 1.0], dtype=f64)]
    scaler.load_state_dict(state)
    reference = _Reference([2], **config)
    reference.t, reference.m, reference.v = 3, [[2.0, 0.1]], [[0.0, 1.0]]
    reference.level = 0.1

    scale = _step_and_check_in_place(scaler, params, [torch.zeros(2, dtype=f64)])
    outcome = reference.step([[0.0, 0.0]])
    assert outcome is not None
    assert 0.2 < outcome.scale < 0.6  # unclamped, the ratio would be negative and scale 1
    assert scale == pytest.approx(outcome.scale, rel=1e-12)
    assert scaler.noise_ratio == pytest.approx(outcome.noise_ratio, rel=1e-12)


# --------------------------------------------------------------------------------------------
# The step: in place, frozen parameters, missing gradients, disabled, unlinked
# --------------------------------------------------------------------------------------------


def _noisy_grads(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def test_live_gradients_are_read_in_place_and_left_unchanged() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    scaler = VarianceGradientScaler(net.parameters(), warmup_steps=2, alpha=1.0)
    scales = []
    for seed in range(6):
        net.zero_grad(set_to_none=False)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        (net(x).pow(2).sum() * (1 + seed) ** 2).backward()  # ever noisier gradients
        ids = [id(p.grad) for p in net.parameters()]
        before = [p.grad.clone() for p in net.parameters()]
        scales.append(scaler.compute_scale())
        assert [id(p.grad) for p in net.parameters()] == ids
        for p, b in zip(net.parameters(), before, strict=True):
            assert torch.equal(p.grad, b)
    assert scales[:2] == [1.0, 1.0] and scaler.level is not None
    assert any(s < 1.0 for s in scales[2:])


def test_frozen_parameters_are_not_tracked() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for p in net[0].parameters():
        p.requires_grad_(False)
    scaler = VarianceGradientScaler(net.parameters(), warmup_steps=0, alpha=1.0)
    assert scaler.parameters is not None
    assert [id(p) for p in scaler.parameters] == [id(p) for p in net[1].parameters()]
    assert scaler._exp_avg is not None and len(scaler._exp_avg) == 2
    frozen_grad = torch.ones(4, 3)
    net[0].weight.grad = frozen_grad
    for seed in range(3):
        for p, g in zip(net[1].parameters(), _noisy_grads([(2, 4), (2,)], seed), strict=True):
            p.grad = g
        scaler.compute_scale()
    assert scaler.step_count == 3
    assert net[0].weight.grad is frozen_grad and torch.equal(frozen_grad, torch.ones(4, 3))


def test_step_with_no_gradient_at_all_changes_nothing() -> None:
    params = _params([(2, 3), (3,)])
    scaler = VarianceGradientScaler(params, warmup_steps=0, alpha=1.0)
    for seed in range(3):
        _step_and_check_in_place(scaler, params, _noisy_grads([(2, 3), (3,)], seed))
    before = scaler.state_dict()
    assert before["level"] is not None
    for p in params:
        p.grad = None
    assert scaler.compute_scale() == 1.0
    _assert_same_state(scaler.state_dict(), before)


def test_disabled_scaler_is_inert() -> None:
    params = _params([(2, 3), (3,)])
    scaler = VarianceGradientScaler(params, warmup_steps=0, alpha=1.0, enabled=False)
    logger, memory = _memory_logger()
    scaler.logger = logger
    before = scaler.state_dict()
    for seed in range(3):
        grads = _noisy_grads([(2, 3), (3,)], seed)
        _set_grads(params, grads)
        assert scaler.compute_scale() == 1.0
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
        logger.dump(seed)
    _assert_same_state(scaler.state_dict(), before)
    assert memory.rows == [{}, {}, {}]


def test_unlinked_scaler_refuses_to_compute_a_scale() -> None:
    scaler = VarianceGradientScaler(None)
    assert scaler.parameters is None and scaler._exp_avg is None
    with pytest.raises(RuntimeError, match="update_parameters"):
        scaler.compute_scale()
    unpickled = pickle.loads(pickle.dumps(VarianceGradientScaler(_params([(2,)]))))
    with pytest.raises(RuntimeError, match="not linked"):
        unpickled.compute_scale()
    # A disabled scaler needs no parameters.
    assert VarianceGradientScaler(None, enabled=False).compute_scale() == 1.0


@pytest.mark.parametrize(
    ("noise_ratio", "expected"),
    [(0.0, 1.0), (math.inf, 0.25), (math.nan, 0.25), (4.0, 0.5), (0.5, 1.0)],
    ids=["zero", "inf", "nan", "above", "below"],
)
def test_scale_of_unusual_ratios_and_the_level_they_leave(
    noise_ratio: float, expected: float
) -> None:
    scaler = VarianceGradientScaler(None, warmup_steps=0, alpha=1.0, min_scale=0.25)
    scaler._level = 2.0
    scale, level = scaler._scale_and_level(10, noise_ratio)
    assert scale == expected
    if 0.0 < noise_ratio < math.inf:
        assert level == pytest.approx(math.exp(0.99 * math.log(2.0) + 0.01 * math.log(noise_ratio)))
    else:
        assert level == 2.0  # neither 0, inf nor NaN enters the geometric level


def test_extreme_levels_do_not_overflow() -> None:
    scaler = VarianceGradientScaler(None, warmup_steps=0, alpha=3.0, min_scale=0.25)
    scaler._level = 1e300
    assert scaler._scale_and_level(5, 1e-300)[0] == 1.0
    scaler._level = 1e-300
    assert scaler._scale_and_level(5, 1e300)[0] == 0.25


def test_alpha_zero_never_scales() -> None:
    scaler = VarianceGradientScaler(None, warmup_steps=0, alpha=0.0)
    scaler._level = 1e-9
    assert scaler._scale_and_level(5, 1e9)[0] == 1.0
    assert scaler._scale_and_level(5, math.nan)[0] == 1.0


def test_the_first_step_never_starts_the_level() -> None:
    # One sample has no variance: R at step 1 is rounding noise, not a usable level.
    for warmup in (0, 1):
        scaler = VarianceGradientScaler(None, warmup_steps=warmup)
        assert scaler._scale_and_level(1, 1e-9) == (1.0, None)
        assert scaler._scale_and_level(2, 3.0) == (1.0, 3.0)


# --------------------------------------------------------------------------------------------
# The factor follows the noise
# --------------------------------------------------------------------------------------------

#: Updates between a noise change and the measurement of the factor it causes.
_K = 10
#: Updates between noise changes.
_HOLD = 20


def _noise_schedule(sigmas: list[float], seed: int = 0) -> list[float]:
    """The factor after each update of a scaler fed gradients g = mu + sigma_j * noise, where
    sigma_j holds for _HOLD updates each (from update 100 + j*_HOLD on, 0-based); a 100-update
    warm-up at sigmas[0] comes first."""
    shapes = [(16, 8), (16,), (4, 16), (4,)]
    params = _params(shapes)
    scaler = VarianceGradientScaler(params, beta=0.9, warmup_steps=100, alpha=1.0)
    generator = torch.Generator().manual_seed(seed)
    mean = [torch.randn(shape, generator=generator) for shape in shapes]
    factors = []
    for sigma in [sigmas[0]] * 100 + [s for s in sigmas for _ in range(_HOLD)]:
        for param, mu in zip(params, mean, strict=True):
            param.grad = mu + sigma * torch.randn(mu.shape, generator=generator)
        factors.append(scaler.compute_scale())
    return factors


def test_factor_falls_as_the_noise_steps_up_and_recovers_when_it_drops() -> None:
    sigmas = [0.5 * 1.5**j for j in range(7)]  # the usual noise, then six step-ups by half
    sigmas += [sigmas[0]] * 4  # then back down to the usual noise, for 80 updates
    factors = _noise_schedule(sigmas)
    # The factor at the K-th update after each change of the noise.
    measured = [factors[100 + j * _HOLD + _K - 1] for j in range(len(sigmas))]
    assert measured[0] > 0.9  # after warm-up, at the usual noise
    rising = measured[:7]
    assert all(b < a for a, b in zip(rising, rising[1:], strict=False)), rising
    assert rising[-1] < 0.6
    # Once the noise is back down, the factor climbs back and is 1 again within 3K updates
    # (the gradient averages, beta 0.9, first forget the high noise), and stays there.
    drop = 100 + 7 * _HOLD
    recovery = factors[drop : drop + 3 * _K]
    assert recovery[-1] == 1.0 and recovery[_K] > recovery[0]
    assert min(factors[drop + 3 * _K :]) == 1.0


def test_factor_returns_towards_one_when_a_higher_noise_persists() -> None:
    # A relative scaler: a noise that stays up becomes the usual one as the level follows it.
    factors = _noise_schedule([0.5] + [2.0] * 40)
    after_step = factors[100 + _HOLD :]
    assert min(after_step[:_K]) < 0.5
    assert after_step[-1] > 0.9


# --------------------------------------------------------------------------------------------
# The step: the factor scales the learning rate of one optimizer step
# --------------------------------------------------------------------------------------------


def _adam_setup(lr: Any = 1e-3) -> tuple[list[Any], torch.optim.Optimizer]:
    params = _params([(4, 3), (3,)])
    for param, value in zip(params, _noisy_grads([(4, 3), (3,)], 5), strict=True):
        param.data.copy_(value)
    optimizer = torch.optim.Adam(params, lr=lr)
    return params, optimizer


@pytest.mark.parametrize("lr", [1e-3, torch.tensor(1e-3)], ids=["float", "tensor"])
def test_step_scales_the_update_and_restores_the_learning_rate(lr: Any) -> None:
    params, optimizer = _adam_setup(lr)
    scaler = VarianceGradientScaler(params)
    grads = _noisy_grads([(4, 3), (3,)], 1)
    state = copy.deepcopy(optimizer.state_dict())

    def update(scale: float) -> list[torch.Tensor]:
        optimizer.load_state_dict(copy.deepcopy(state))
        rate = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param.zero_()  # from the origin, so that the result is the step itself
                param.grad = grad.clone()
        scaler.step(optimizer, scale)
        assert optimizer.param_groups[0]["lr"] is rate  # the very same object
        return [p.detach().double().clone() for p in params]

    unit, scaled = update(1.0), update(0.3)
    for a, b in zip(unit, scaled, strict=True):
        assert float((b - 0.3 * a).norm()) <= 1e-5 * float(a.norm()) + 1e-12
        assert float(a.norm()) > 0


def test_a_gradient_factor_does_not_reach_adams_step() -> None:
    # Why the factor goes into the learning rate: Adam divides a gradient factor out again.
    params, optimizer = _adam_setup()
    grads = _noisy_grads([(4, 3), (3,)], 1)
    moves = []
    for factor in (1.0, 0.3):
        fresh = torch.optim.Adam(params, lr=1e-3)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param.zero_()
                param.grad = grad * factor
        fresh.step()
        moves.append(torch.cat([p.detach().flatten() for p in params]).clone())
    assert torch.allclose(moves[0], moves[1], rtol=1e-4)
    del optimizer


def test_step_restores_the_learning_rate_when_the_optimizer_raises() -> None:
    params, optimizer = _adam_setup()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    optimizer.step = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        VarianceGradientScaler(params).step(optimizer, 0.5)
    assert optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, "0.5", True])
def test_step_refuses_a_scale_that_is_no_positive_number(scale: Any) -> None:
    params, optimizer = _adam_setup()
    with pytest.raises(ValueError, match="scale"):
        VarianceGradientScaler(params).step(optimizer, scale)


# --------------------------------------------------------------------------------------------
# Pickling
# --------------------------------------------------------------------------------------------


class _CapturedState:
    """Stands in for the scaler class when unpickling, to see the raw pickled state."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class _CapturingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("dppo_ckpt.vgs", "VarianceGradientScaler"):
            return _CapturedState
        return super().find_class(module, name)


def _trained_scaler(steps: int = 5) -> tuple[VarianceGradientScaler, list[Any]]:
    shapes = [(4, 3), (4,), ()]
    params = _params(shapes)
    scaler = VarianceGradientScaler(params, warmup_steps=2, alpha=0.5, logger=_memory_logger()[0])
    for seed in range(steps):
        _step_and_check_in_place(scaler, params, _noisy_grads(shapes, seed))
    return scaler, params


def test_pickle_holds_neither_parameters_nor_logger() -> None:
    scaler, params = _trained_scaler()
    assert scaler.logger is not None
    data = pickle.dumps(scaler)
    assert b"_parameters" not in data and b"_logger" not in data

    raw = _CapturingUnpickler(io.BytesIO(data)).load().state
    assert "_parameters" not in raw and "_logger" not in raw
    assert "_legacy_parameters_dropped" not in raw
    assert raw["_step_count"] == 5 and len(raw["_exp_avg"]) == 3

    restored = pickle.loads(data)
    assert restored._parameters is None and restored.parameters is None
    assert restored._logger is None and restored.logger is None
    assert restored.legacy_parameters_dropped is False
    # The original is untouched by pickling.
    assert scaler.parameters is not None and scaler.logger is not None


def test_unpickled_scaler_relinks_by_identity_with_bit_identical_statistics() -> None:
    scaler, params = _trained_scaler()
    before = scaler.state_dict()
    restored = pickle.loads(pickle.dumps(scaler))
    _assert_same_state(restored.state_dict(), before)

    restored.update_parameters(params)
    assert restored.parameters is not None
    assert {id(p) for p in restored.parameters} == {id(p) for p in params}
    assert [id(p) for p in restored.parameters] == [id(p) for p in params]
    _assert_same_state(restored.state_dict(), before)

    # Both now continue identically on the same gradients.
    grads = _noisy_grads([(4, 3), (4,), ()], 99)
    assert _step_and_check_in_place(scaler, params, grads) == _step_and_check_in_place(
        restored, params, grads
    )
    _assert_same_state(restored.state_dict(), scaler.state_dict())


def test_legacy_pickle_drops_parameter_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler, params = _trained_scaler()

    def legacy_getstate(self: VarianceGradientScaler) -> dict[str, Any]:
        # What old versions pickled: everything, parameters and logger included.
        return dict(self.__dict__)

    monkeypatch.setattr(VarianceGradientScaler, "__getstate__", legacy_getstate)
    data = pickle.dumps(scaler)
    monkeypatch.undo()
    assert b"_parameters" in data  # really a legacy pickle

    restored = pickle.loads(data)
    assert restored._parameters is None and restored._logger is None
    assert restored.legacy_parameters_dropped is True
    _assert_same_state(restored.state_dict(), scaler.state_dict())
    # Re-pickling a relinked legacy scaler gives a clean pickle and no legacy flag.
    restored.update_parameters(params)
    clean = pickle.loads(pickle.dumps(restored))
    assert clean.legacy_parameters_dropped is False


def test_a_pickle_holding_parameters_none_is_legacy_by_the_one_rule() -> None:
    from dppo_ckpt.checkpoint.contents import legacy_state_keys

    scaler = VarianceGradientScaler(None)
    state = dict(scaler.__dict__)  # _parameters is None here, but the key was pickled
    restored = VarianceGradientScaler.__new__(VarianceGradientScaler)
    restored.__setstate__(state)
    # The same answer as DPPO005, CYC007 and migrate give for this state.
    assert restored.legacy_parameters_dropped is bool(legacy_state_keys(state)) is True
    modern = VarianceGradientScaler.__new__(VarianceGradientScaler)
    modern.__setstate__(scaler.__getstate__())
    assert modern.legacy_parameters_dropped is False
    # An old pickle missing newer attributes still unpickles to a usable scaler.
    restored = VarianceGradientScaler.__new__(VarianceGradientScaler)
    restored.__setstate__({"beta": 0.9, "_parameters": [torch.zeros(2)]})
    assert restored.beta == 0.9 and restored.step_count == 0
    assert restored.legacy_parameters_dropped is True
    restored.update_parameters(_params([(2,)]))
    assert restored._exp_avg is not None and torch.equal(restored._exp_avg[0], torch.zeros(2))


def test_deepcopy_follows_the_pickling_rules() -> None:
    scaler, _ = _trained_scaler()
    duplicate = copy.deepcopy(scaler)
    assert duplicate.parameters is None and duplicate.logger is None
    _assert_same_state(duplicate.state_dict(), scaler.state_dict())


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict / reset_statistics
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip_is_bit_for_bit() -> None:
    scaler, params = _trained_scaler()
    state = scaler.state_dict()
    assert state["format_version"] == VarianceGradientScaler.STATE_FORMAT_VERSION == 2
    assert state["config"] == {
        "beta": 0.99,
        "alpha": 0.5,
        "eps": 1e-8,
        "warmup_steps": 2,
        "quantile": 0.9,
        "level_beta": 0.99,
        "min_scale": 0.1,
        "enabled": True,
    }
    assert state["step_count"] == 5 and state["scaling_factor"] == scaler.scaling_factor
    assert state["noise_ratio"] == scaler.noise_ratio
    assert state["level"] == scaler.level and state["level"] is not None
    assert state["post_warmup_steps"] == 3
    assert state["at_min_steps"] + state["at_one_steps"] <= 3
    counts = scaler.factor_counts
    assert counts["steps"] == 3 and counts["scale_sum"] == state["scale_sum"]
    # Cloned, not aliased.
    assert scaler._exp_avg is not None
    assert all(a is not b for a, b in zip(state["exp_avg"], scaler._exp_avg, strict=True))

    fresh = VarianceGradientScaler(params)  # default config, different from the saved one
    fresh.load_state_dict(state)
    _assert_same_state(fresh.state_dict(), state)
    assert fresh.alpha == 0.5 and fresh.warmup_steps == 2
    assert fresh.step_count == 5 and fresh.scaling_factor == scaler.scaling_factor

    # Mutating the loaded dict afterwards does not reach the scaler.
    state["exp_avg"][0].add_(1.0)
    assert not torch.equal(fresh._exp_avg[0], state["exp_avg"][0])

    grads = _noisy_grads([(4, 3), (4,), ()], 123)
    assert _step_and_check_in_place(scaler, params, grads) == _step_and_check_in_place(
        fresh, params, grads
    )
    _assert_same_state(fresh.state_dict(), scaler.state_dict())


def test_a_load_into_flat_statistics_copies_into_their_buffers() -> None:
    scaler, params = _trained_scaler()  # has stepped: its statistics are flat
    flat = scaler._flat
    assert flat is not None and flat.m is not None
    lists, buffers = (scaler._exp_avg, scaler._exp_avg_sq), (flat.m, flat.v)
    before = scaler.state_dict()
    other, _ = _trained_scaler()
    other_state = other.state_dict()
    for buf in other_state["exp_avg"]:
        buf.add_(0.25)  # values unlike the scaler's own

    scaler.load_state_dict(other_state)
    # The same buffers and views, holding the loaded bits; the loaded dict is not aliased.
    assert (scaler._exp_avg, scaler._exp_avg_sq) == lists and scaler._flat is flat
    assert (flat.m, flat.v) == buffers
    assert id(scaler._exp_avg[0]) == id(lists[0][0])
    _assert_same_state(scaler.state_dict(), other_state)
    other_state["exp_avg"][0].add_(1.0)
    assert not torch.equal(scaler._exp_avg[0], other_state["exp_avg"][0])
    # A state taken before the load is a copy that the load did not touch.
    assert not torch.equal(before["exp_avg"][0], scaler._exp_avg[0])
    scaler.load_state_dict(before)
    _assert_same_state(scaler.state_dict(), before)


def test_a_load_after_the_parameters_were_cast_takes_buffers_like_them() -> None:
    layer = torch.nn.Linear(3, 2)
    scaler = VarianceGradientScaler(layer.parameters(), warmup_steps=0)
    for param in layer.parameters():
        param.grad = torch.ones_like(param)
    scaler.compute_scale()  # flat float32 buffers
    layer.double()  # the same Parameter objects, now float64
    state = scaler.state_dict()
    state["exp_avg"] = [torch.full_like(p, 0.5) for p in layer.parameters()]
    state["exp_avg_sq"] = [torch.full_like(p, 0.25) for p in layer.parameters()]
    scaler.load_state_dict(state)
    assert all(buf.dtype == torch.float64 for buf in scaler._exp_avg + scaler._exp_avg_sq)
    _assert_same_state(scaler.state_dict(), state)
    for param in layer.parameters():
        param.grad = torch.ones_like(param)
    assert 0.0 < scaler.compute_scale() <= 1.0


def test_a_load_from_the_scalers_own_buffers_takes_new_ones() -> None:
    scaler, params = _trained_scaler()
    expected = scaler.state_dict()
    aliased = {**expected, "exp_avg": scaler._exp_avg, "exp_avg_sq": scaler._exp_avg_sq}
    flat = scaler._flat
    scaler.load_state_dict(aliased)
    assert scaler._flat is not flat  # copied out, not overwritten while read
    _assert_same_state(scaler.state_dict(), expected)


def test_broadcast_statistics_load_as_full_tensors() -> None:
    scaler, params = _trained_scaler()
    state = scaler.state_dict()
    ones = [torch.ones(()).expand_as(buf) for buf in state["exp_avg"]]
    scaler.load_state_dict({**state, "exp_avg_sq": ones})
    for buf, param in zip(scaler._exp_avg_sq, params, strict=True):
        assert buf.shape == param.shape and buf.is_contiguous()
        assert torch.equal(buf, torch.ones_like(param))
    buf = scaler._exp_avg_sq[0]
    buf.add_(1.0)  # its own memory: the other elements stay as they were
    assert buf.flatten().tolist() == [2.0] * buf.numel()


def test_load_state_dict_into_unlinked_scaler_then_link() -> None:
    scaler, params = _trained_scaler()
    state = scaler.state_dict()
    fresh = VarianceGradientScaler(None)
    fresh.load_state_dict(state)
    fresh.update_parameters(params)
    _assert_same_state(fresh.state_dict(), state)


def test_load_state_dict_refuses_newer_and_malformed_states() -> None:
    scaler, params = _trained_scaler()
    state = scaler.state_dict()
    fresh = VarianceGradientScaler(params)
    untouched = fresh.state_dict()
    with pytest.raises(ValueError, match="format_version 3 is newer"):
        fresh.load_state_dict({**state, "format_version": 3})
    with pytest.raises(ValueError, match="format_version"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "format_version"})
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "exp_avg_sq"})
    with pytest.raises(ValueError, match="beta"):
        fresh.load_state_dict({**state, "config": {**state["config"], "beta": 1.5}})
    with pytest.raises(ValueError, match="step_count"):
        fresh.load_state_dict({**state, "step_count": -1})
    with pytest.raises(ValueError, match="level"):
        fresh.load_state_dict({**state, "level": 0.0})
    with pytest.raises(ValueError, match="at_min_steps"):
        fresh.load_state_dict({**state, "at_min_steps": 1.5})
    with pytest.raises(ValueError, match="format 1"):
        fresh.load_state_dict({**state, "format_version": 1})  # a format-2 config
    with pytest.raises(ValueError, match=r"parameter 1 .*expected shape \(4,\), got shape \(5,\)"):
        other = VarianceGradientScaler(_params([(4, 3), (5,), ()]))
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="cover 3 trainable parameters .*got 2"):
        VarianceGradientScaler(params[:2]).load_state_dict(state)
    _assert_same_state(fresh.state_dict(), untouched)


def _format_1_state(scaler: VarianceGradientScaler) -> dict[str, Any]:
    """What the format-1 scaler (absolute cap, no level) returned from state_dict()."""
    state = scaler.state_dict()
    config = {k: v for k, v in state["config"].items() if k != "level_beta"}
    config = {**config, "variance_cap": 50.0}
    keep = ("step_count", "scaling_factor", "noise_ratio", "exp_avg", "exp_avg_sq")
    return {"format_version": 1, "config": config, **{key: state[key] for key in keep}}


def test_format_1_state_dict_loads_upgraded() -> None:
    scaler, params = _trained_scaler()
    old = _format_1_state(scaler)
    fresh = VarianceGradientScaler(params)
    fresh.load_state_dict(old)
    state = fresh.state_dict()
    assert state["format_version"] == 2
    assert state["config"] == {
        **{k: v for k, v in old["config"].items() if k != "variance_cap"},
        "level_beta": 0.99,
    }
    assert state["level"] is None
    assert (state["post_warmup_steps"], state["at_min_steps"], state["at_one_steps"]) == (0, 0, 0)
    for key in ("step_count", "scaling_factor", "noise_ratio"):
        assert state[key] == old[key]
    for key in ("exp_avg", "exp_avg_sq"):
        assert [t.numpy().tobytes() for t in state[key]] == [t.numpy().tobytes() for t in old[key]]
    # Past warm-up with no level: the next step starts it and scales by 1, then it scales.
    assert _step_and_check_in_place(fresh, params, _noisy_grads([(4, 3), (4,), ()], 7)) == 1.0
    assert fresh.level == fresh.noise_ratio


def _format_1_pickle_state(scaler: VarianceGradientScaler) -> dict[str, Any]:
    """The attributes a format-1 scaler pickled, in its order."""
    state = scaler.__getstate__()
    order = ("beta", "alpha", "eps", "warmup_steps", "quantile")
    old = {key: state[key] for key in order}
    old["variance_cap"] = 50.0
    for key in ("min_scale", "enabled", "_step_count", "_scaling_factor", "_noise_ratio"):
        old[key] = state[key]
    old["_exp_avg"], old["_exp_avg_sq"] = state["_exp_avg"], state["_exp_avg_sq"]
    return old


def test_format_1_pickle_unpickles_upgraded_in_the_current_attribute_order() -> None:
    scaler, params = _trained_scaler()
    restored = VarianceGradientScaler.__new__(VarianceGradientScaler)
    restored.__setstate__(_format_1_pickle_state(scaler))
    assert not hasattr(restored, "variance_cap")
    assert restored.level is None and restored.factor_counts["steps"] == 0
    assert restored._state_version == VarianceGradientScaler.STATE_FORMAT_VERSION
    fresh = VarianceGradientScaler(params)
    assert list(restored.__getstate__()) == list(fresh.__getstate__())
    assert list(vgs_module._STATE_DEFAULTS) == list(fresh.__getstate__())
    upgraded = VarianceGradientScaler(params)
    upgraded.load_state_dict(_format_1_state(scaler))
    _assert_same_state(restored.state_dict(), upgraded.state_dict())


def test_reset_statistics_zeroes_buffers_and_step() -> None:
    scaler, params = _trained_scaler()
    buffers = list(scaler._exp_avg or []) + list(scaler._exp_avg_sq or [])
    assert any(bool(b.abs().sum()) for b in buffers)
    scaler.reset_statistics()
    assert scaler.step_count == 0 and scaler.scaling_factor == 1.0 and scaler.noise_ratio == 0.0
    assert all(torch.equal(b, torch.zeros_like(b)) for b in buffers)
    # Warm-up starts over: the next steps do not scale.
    assert _step_and_check_in_place(scaler, params, _noisy_grads([(4, 3), (4,), ()], 0)) == 1.0
    assert scaler.step_count == 1


# --------------------------------------------------------------------------------------------
# update_parameters
# --------------------------------------------------------------------------------------------


def test_update_parameters_keeps_statistics_and_reports_mismatches() -> None:
    scaler, params = _trained_scaler()
    before = scaler.state_dict()
    new_params = _params([(4, 3), (4,), ()])
    scaler.update_parameters(iter(new_params))  # any iterable, e.g. module.parameters()
    assert [id(p) for p in scaler.parameters or ()] == [id(p) for p in new_params]
    _assert_same_state(scaler.state_dict(), before)

    with pytest.raises(ValueError) as info:
        scaler.update_parameters(_params([(4, 3), (4,), (1,)]))
    message = str(info.value)
    assert "parameter 2" in message and "expected shape ()" in message
    assert "got shape (1,)" in message
    with pytest.raises(
        ValueError, match=r"cover 3 trainable parameters \(requires_grad=True\), got 4"
    ):
        scaler.update_parameters(_params([(4, 3), (4,), (), (2,)]))
    frozen = _params([(4, 3), (4,), ()])
    frozen[1].requires_grad_(False)
    with pytest.raises(ValueError, match="got 2"):
        scaler.update_parameters(frozen)
    # A failed relink changes nothing.
    assert [id(p) for p in scaler.parameters or ()] == [id(p) for p in new_params]
    _assert_same_state(scaler.state_dict(), before)


def test_update_parameters_creates_zero_buffers_when_there_are_none() -> None:
    scaler = VarianceGradientScaler(None)
    params = _params([(2, 3), (3,)], dtype=torch.float64)
    scaler.update_parameters(params)
    assert scaler._exp_avg is not None and scaler._exp_avg_sq is not None
    for buf, p in zip(scaler._exp_avg + scaler._exp_avg_sq, params + params, strict=True):
        assert buf.dtype == p.dtype and buf.device == p.device and buf.shape == p.shape
        assert not buf.requires_grad and torch.equal(buf, torch.zeros_like(p))


def test_update_parameters_follows_the_parameters_dtype() -> None:
    scaler, _ = _trained_scaler()
    before = scaler.state_dict()
    params64 = _params([(4, 3), (4,), ()], dtype=torch.float64)
    scaler.update_parameters(params64)
    assert scaler._exp_avg is not None
    for buf, saved in zip(scaler._exp_avg, before["exp_avg"], strict=True):
        assert buf.dtype == torch.float64 and torch.equal(buf, saved.double())


def test_update_parameters_rejects_duplicates_and_non_tensors() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than once"):
        VarianceGradientScaler([p, p])
    with pytest.raises(TypeError, match="not a tensor"):
        VarianceGradientScaler([p, 3.0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single tensor"):
        VarianceGradientScaler(p)


# --------------------------------------------------------------------------------------------
# Logging, configuration, repr
# --------------------------------------------------------------------------------------------


class _Memory(KVWriter):
    """Keeps every dumped row in memory."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: Any, step: int = 0) -> None:
        self.rows.append(dict(key_values))

    def close(self) -> None:
        pass


def _memory_logger() -> tuple[Logger, _Memory]:
    memory = _Memory()
    return Logger(folder=None, output_formats=[memory]), memory


def test_logger_receives_scale_noise_ratio_level_and_shares() -> None:
    shapes = [(3, 2), (2,)]
    params = _params(shapes)
    logger, memory = _memory_logger()
    scaler = VarianceGradientScaler(params, warmup_steps=2, alpha=1.0, logger=logger)
    assert scaler.logger is logger
    expected = []
    for seed in range(4):
        scale = _step_and_check_in_place(scaler, params, _noisy_grads(shapes, seed))
        row: dict[str, Any] = {"vgs/scale": scale, "vgs/noise_ratio": scaler.noise_ratio}
        if scaler.level is not None:
            row["vgs/level"] = scaler.level
        row["vgs/step"] = seed + 1
        if seed + 1 > 2:
            row["vgs/scale_mean"] = scale
            row["vgs/at_min_share"] = float(scale == scaler.min_scale)
            row["vgs/at_one_share"] = float(scale == 1.0)
        expected.append(row)
        logger.dump(seed)
    assert memory.rows == expected
    assert "vgs/level" not in expected[0] and "vgs/level" in expected[1]

    # Between two dumps the shares are those of the updates in between.
    for seed in range(4, 8):
        _step_and_check_in_place(scaler, params, _noisy_grads(shapes, seed))
    logger.dump(8)
    counts = scaler.factor_counts
    row = memory.rows[-1]
    assert row["vgs/at_min_share"] + row["vgs/at_one_share"] <= 1.0
    assert counts["steps"] == 6
    assert row["vgs/scale_mean"] == pytest.approx(
        (counts["scale_sum"] - sum(r["vgs/scale_mean"] for r in expected[2:])) / 4
    )

    scaler.logger = None
    _step_and_check_in_place(scaler, params, _noisy_grads(shapes, 9))
    logger.dump(9)
    assert memory.rows[-1] == {}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("beta", 1.0),
        ("beta", -0.1),
        ("beta", float("nan")),
        ("alpha", -1.0),
        ("alpha", float("inf")),
        ("eps", 0.0),
        ("warmup_steps", -1),
        ("warmup_steps", 2.5),
        ("warmup_steps", True),
        ("quantile", 1.5),
        ("quantile", -0.1),
        ("level_beta", 1.0),
        ("level_beta", -0.5),
        ("min_scale", 0.0),
        ("min_scale", 1.5),
        ("enabled", 1),
        ("alpha", "0.1"),
    ],
)
def test_invalid_configuration_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        VarianceGradientScaler(None, **{name: value})


def test_boundary_configuration_is_accepted() -> None:
    scaler = VarianceGradientScaler(
        None,
        beta=0.0,
        alpha=0.0,
        warmup_steps=0,
        quantile=1.0,
        level_beta=0.0,
        min_scale=1.0,
    )
    assert scaler.beta == 0.0 and scaler.level_beta == 0.0
    assert VarianceGradientScaler(None, quantile=0.0, alpha=3).alpha == 3.0


def test_repr_shows_configuration_and_state() -> None:
    scaler, _ = _trained_scaler()
    text = repr(scaler)
    assert text.startswith("VarianceGradientScaler(beta=0.99, alpha=0.5,")
    assert "step_count=5" in text and "3 tensors, 17 elements" in text
    assert "unlinked" in repr(pickle.loads(pickle.dumps(scaler)))


@given(
    values=st.lists(st.floats(-1e6, 1e6) | st.sampled_from([0.0, math.inf]), min_size=1),
    q=st.floats(0.0, 1.0),
)
def test_internal_quantile_equals_torch_quantile(values: list[float], q: float) -> None:
    expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
    actual = vgs_module._linear_quantile(values, q)
    # Bit for bit: the scale must not depend on which of the two computed the quantile.
    assert actual == expected or (math.isnan(actual) and math.isnan(expected))
    with_nan = [*values, math.nan]
    assert math.isnan(vgs_module._linear_quantile(with_nan, q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_flat_statistics_update_equals_the_per_tensor_one_in_every_float_dtype(dtype):
    """The flat path (every gradient present) and the per-tensor path (some missing) must
    update the moments alike, so a step's results do not depend on which one ran; half
    precision rounds beta in the statistics' dtype on both."""
    from dppo_ckpt.vgs import _flatten_statistics

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 7)]
    means = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    squares = [torch.rand(s, generator=generator).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    beta, correction = 0.9, 1 / (1 - 0.9**3)
    flat = _flatten_statistics([m.clone() for m in means], [v.clone() for v in squares])
    flat_norms, flat_noise = VarianceGradientScaler._flat_sums(flat, grads, beta, correction)
    tensor_means, tensor_squares = [m.clone() for m in means], [v.clone() for v in squares]
    norms, noise = VarianceGradientScaler._tensor_sums(
        grads, tensor_means, tensor_squares, beta, correction
    )
    for a, b in zip(flat.exp_avg_sq, tensor_squares, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(flat.exp_avg, tensor_means, strict=True):
        assert torch.equal(a, b)
    for a, b in zip([*flat_norms, *flat_noise], [*norms, *noise], strict=True):
        assert torch.equal(a, b)
