"""Variance Gradient Scaler (VGS): shorten the optimizer's step when the gradients are noisier
than usual.

The scaler keeps, for every trainable parameter tensor, exponential moving averages of the raw
gradient and of its element-wise square (the first and second moments Adam keeps, Kingma & Ba
2015). From them it estimates, per tensor, the ratio of the stochastic variance of the gradient
to its squared mean: the gradient noise scale of McCandlish et al. 2018 (*An Empirical Model of
Large-Batch Training*) at this batch size. A high quantile ``R`` of these ratios across tensors
is compared with a slow running level of ``R``; when ``R`` is above its level the gradients are
noisier than usual, and the factor ``(level / R) ** alpha`` (within ``[min_scale, 1]``)
multiplies the learning rate of this one optimizer step.

Why the learning rate and not the gradient: Adam's step is invariant to a constant gradient
scale, and ``clip_grad_norm_`` rescales the gradient to a fixed norm whenever it is active, so a
factor multiplied into ``.grad`` is divided out again and the parameters move as if the scaler
were off. The step size is the one place neither cancels it. The learning rate is changed for
one ``optimizer.step()`` only and restored to the very same object afterwards, so the optimizer
state, checkpoints and exact resume never see it.

Why a running level and not an absolute cap: on ``Pendulum-v1`` (RL Zoo settings) the per-tensor
ratio of a policy network is far above any fixed threshold on every update, so a factor
``1/(1 + alpha*min(R, cap))`` sat at one constant value, which a step-size-invariant optimizer
ignores. The level makes the factor relative: near 1 while the noise is as usual, lower only
while it is above the usual. The level is a geometric running mean (an EMA of ``log R``): ``R``
spans orders of magnitude from one update to the next, and an arithmetic mean would be set by
its rare spikes, leaving the factor at 1 almost always.

The scaler survives checkpoints by never pickling the parameter objects it tracks: pickling
copies them, and a scaler restored from such a pickle watches gradients no optimizer uses.
After unpickling, :meth:`VarianceGradientScaler.update_parameters` relinks the scaler to the
live parameters by identity and keeps the statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch._utils import _flatten_dense_tensors

from dppo_ckpt.vgs_format import (
    CONFIG_KEYS,
    CONFIG_KEYS_V1,
    DEFAULT_LEVEL_BETA,
    FORMAT_1_ONLY,
    LEGACY_STATE_KEYS,
    PICKLED_DEFAULTS,
    STATE_FORMAT_VERSION,
    STATE_KEYS,
    STATE_KEYS_V1,
)

if TYPE_CHECKING:
    from stable_baselines3.common.logger import Logger

__all__ = ["VarianceGradientScaler"]

# Attribute names that hold live objects and are never pickled (see ``__getstate__``).
_UNPICKLED_ATTRIBUTES = LEGACY_STATE_KEYS

# The stored shape (keys, orders, defaults) lives in the torch-free ``vgs_format``, which the
# code-free checkpoint tools share.
_CONFIG_KEYS = CONFIG_KEYS
_STATE_KEYS = STATE_KEYS
_STATE_KEYS_V1 = STATE_KEYS_V1
_CONFIG_KEYS_V1 = CONFIG_KEYS_V1
_DEFAULT_LEVEL_BETA = DEFAULT_LEVEL_BETA
_STATE_DEFAULTS: dict[str, Any] = PICKLED_DEFAULTS


def _real(name: str, value: Any) -> float:
    """Return ``value`` as a float, refusing booleans, non-numbers and NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _count(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _validate_config(
    beta: Any,
    alpha: Any,
    eps: Any,
    warmup_steps: Any,
    quantile: Any,
    level_beta: Any,
    min_scale: Any,
    enabled: Any,
) -> dict[str, Any]:
    """Check the hyperparameters and return them normalised (floats, int, bool)."""
    beta = _real("beta", beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    alpha = _real("alpha", alpha)
    if not 0.0 <= alpha < math.inf:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    eps = _real("eps", eps)
    if not 0.0 < eps < math.inf:
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    warmup_steps = _count("warmup_steps", warmup_steps)
    quantile = _real("quantile", quantile)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    level_beta = _real("level_beta", level_beta)
    if not 0.0 <= level_beta < 1.0:
        raise ValueError(f"level_beta must be in [0, 1), got {level_beta}")
    min_scale = _real("min_scale", min_scale)
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    return {
        "beta": beta,
        "alpha": alpha,
        "eps": eps,
        "warmup_steps": int(warmup_steps),
        "quantile": quantile,
        "level_beta": level_beta,
        "min_scale": min_scale,
        "enabled": enabled,
    }


def _upgrade_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 state dict in format 2: the absolute cap gives way to the running level.

    The level is unset (the first ratio after warm-up initialises it) and the counters of the
    factor's distribution start at zero; everything else is kept as it was.
    """
    missing = [key for key in _STATE_KEYS_V1 if key not in state]
    if missing:
        raise ValueError(f"VarianceGradientScaler state dict (format 1) is missing {missing}")
    config = state["config"]
    if not isinstance(config, Mapping) or set(config) != set(_CONFIG_KEYS_V1):
        raise ValueError(
            f"VarianceGradientScaler state config (format 1) must have exactly the keys "
            f"{list(_CONFIG_KEYS_V1)}, got {config!r}"
        )
    upgraded = {key: config[key] for key in _CONFIG_KEYS if key != "level_beta"}
    upgraded["level_beta"] = _DEFAULT_LEVEL_BETA
    return {
        "format_version": 2,
        "config": {key: upgraded[key] for key in _CONFIG_KEYS},
        "step_count": state["step_count"],
        "scaling_factor": state["scaling_factor"],
        "noise_ratio": state["noise_ratio"],
        "level": None,
        "post_warmup_steps": 0,
        "at_min_steps": 0,
        "at_one_steps": 0,
        "scale_sum": 0.0,
        "exp_avg": state["exp_avg"],
        "exp_avg_sq": state["exp_avg_sq"],
    }


def _trainable(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of ``parameters`` that require gradients, in order, checked for use."""
    if isinstance(parameters, torch.Tensor):
        # A lone tensor would otherwise be iterated row by row.
        raise TypeError("parameters must be an iterable of tensors, not a single tensor")
    tracked: list[torch.Tensor] = []
    seen: set[int] = set()
    for index, param in enumerate(parameters):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameter {index} is a {type(param).__name__}, not a tensor")
        if not param.requires_grad:
            continue
        if id(param) in seen:
            # Its gradient would be scaled twice per step.
            raise ValueError(f"parameter {index} appears more than once")
        if param.is_complex():
            raise ValueError(f"parameter {index} is complex; only real parameters are supported")
        seen.add(id(param))
        tracked.append(param)
    return tracked


def _check_compatible(params: list[torch.Tensor], exp_avg: list[torch.Tensor], what: str) -> None:
    """Raise ValueError unless ``params`` match the statistics in count and shape."""
    if len(params) != len(exp_avg):
        raise ValueError(
            f"{what}: the statistics cover {len(exp_avg)} trainable parameters "
            f"(requires_grad=True), got {len(params)}"
        )
    for index, (param, buf) in enumerate(zip(params, exp_avg, strict=True)):
        if param.shape != buf.shape:
            raise ValueError(
                f"{what}: parameter {index} does not match the statistics: "
                f"expected shape {tuple(buf.shape)}, got shape {tuple(param.shape)}"
            )


# Statistics are processed in groups of consecutive tensors of at least this many elements
# (about 1 MB of float32 per buffer): large enough that the per-kernel overhead is paid a few
# times per step, small enough that a group's buffers stay in cache from one kernel to the next.
_GROUP_ELEMENTS = 1 << 18


def _groups(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Split ``tensors`` into consecutive (start, stop) runs of about _GROUP_ELEMENTS elements."""
    groups: list[tuple[int, int]] = []
    start = size = 0
    for index, tensor in enumerate(tensors):
        size += tensor.numel()
        if size >= _GROUP_ELEMENTS:
            groups.append((start, index + 1))
            start, size = index + 1, 0
    if start < len(tensors):
        groups.append((start, len(tensors)))
    return groups


def _multiplier(value: float, tensors: list[torch.Tensor]) -> float | torch.Tensor:
    """``value`` in the form ``torch._foreach_mul_`` takes fastest for ``tensors``.

    On CPU a 0-dim tensor is several times faster than a Python number (which is wrapped anew
    for every tensor of the list). It has the tensors' dtype, so it is rounded exactly as the
    Python number would be and the products are identical (a float64 one would make 0-dim
    float32 tensors compute in float64). Mixed dtypes or devices keep the Python number.
    """
    first = tensors[0]
    if first.device.type == "cpu" and all(
        tensor.dtype == first.dtype and tensor.device == first.device for tensor in tensors
    ):
        return torch.scalar_tensor(value, dtype=first.dtype)
    return value


def _linear_quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` with linear interpolation, exactly as ``torch.quantile``.

    The order statistics are found in Python (a microsecond for the handful of values here,
    where ``torch.quantile`` spends tens); the interpolation itself uses ``torch.lerp`` on
    float64, as ``torch.quantile`` does, so the result is the same to the last bit (torch's
    kernel may fuse the multiply-add). NaN anywhere gives NaN, as in ``torch.quantile``.
    """
    if any(math.isnan(value) for value in values):
        return math.nan
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    below, above = math.floor(rank), math.ceil(rank)
    low, high, weight = (
        torch.scalar_tensor(x, dtype=torch.float64)
        for x in (ordered[below], ordered[above], rank - below)
    )
    return torch.lerp(low, high, weight).item()


def _to_floats(values: list[torch.Tensor]) -> list[float]:
    """The values of 0-dim tensors as Python floats, with one transfer when they share a device."""
    try:
        return torch.stack(values).tolist()
    except RuntimeError:
        # Parameters on several devices: read the per-tensor sums one by one.
        return [value.item() for value in values]


class _FlatStatistics(NamedTuple):
    """The statistics held in two flat buffers, one kernel per operation for all tensors.

    ``exp_avg`` and ``exp_avg_sq`` are the very lists the scaler holds, of views into ``m``
    and ``v`` shaped like the parameters: while the scaler still holds these list objects,
    the buffers are the statistics. ``groups`` are the (first, last + 1) tensor indices and
    (start, stop) element offsets of the runs of :func:`_groups`.
    """

    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    m: torch.Tensor | None  # None: the tensors differ in device or dtype, no flat buffers
    v: torch.Tensor | None
    groups: tuple[tuple[int, int, int, int], ...]
    # Scratch for clamp(v - correction*m^2, 0), reused every step, and its per-tensor parts.
    excess: torch.Tensor | None = None
    excess_parts: tuple[torch.Tensor, ...] = ()


def _flatten_statistics(
    exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor]
) -> _FlatStatistics:
    """Copy the statistics into two flat buffers and describe them (see :class:`_FlatStatistics`).

    The views that replace the per-tensor buffers hold the same values; tensors on several
    devices or with several dtypes get no flat buffers (``m`` is None) and keep their own.
    """
    first = exp_avg[0] if exp_avg else None
    if first is None or not all(
        buf.device == first.device and buf.dtype == first.dtype and buf.layout == torch.strided
        for buf in (*exp_avg, *exp_avg_sq)
    ):
        return _FlatStatistics(exp_avg, exp_avg_sq, None, None, ())
    sizes = tuple(buf.numel() for buf in exp_avg)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)

    def views(flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[offsets[index] : offsets[index + 1]].view(buf.shape)
            for index, buf in enumerate(exp_avg)
        ]

    def flattened(buffers: list[torch.Tensor]) -> torch.Tensor:
        # Copied tensor by tensor into one allocation: a broadcast or strided buffer is read
        # in place, with no contiguous copy of it first.
        flat = torch.empty(offsets[-1], dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for view, buf in zip(views(flat), buffers, strict=True):
                view.copy_(buf)
        return flat

    m, v = flattened(exp_avg), flattened(exp_avg_sq)

    groups = tuple(
        (start, stop, offsets[start], offsets[stop]) for start, stop in _groups(exp_avg)
    )
    excess = torch.empty_like(v)
    return _FlatStatistics(views(m), views(v), m, v, groups, excess, tuple(excess.split(sizes)))


class VarianceGradientScaler:
    """Shorten the optimizer's step when the gradient noise is above its usual level.

    Per tracked parameter tensor ``p`` with raw gradient ``g`` (before any scaling or clipping),
    at step ``t`` (1-based), with zero-initialised per-element buffers ``m`` and ``v``::

        m <- beta*m + (1-beta)*g            v <- beta*v + (1-beta)*g*g
        mh = m/(1-beta^t)                   vh = v/(1-beta^t)
        var = clamp(vh - mh^2, min=0)
        r_p = sum(var) / (sum(mh^2) + eps)
        R = quantile_q(r_1..r_P)            (linear interpolation, as torch.quantile)

        t <= warmup_steps:   scale = 1;  at t == warmup_steps (>= 2): level = R
        t >  warmup_steps:   scale = clamp((level / R) ** alpha, min_scale, 1)
                             log(level) <- level_beta*log(level) + (1-level_beta)*log(R)

        optimizer.step() with every param group's lr multiplied by scale, then restored

    The factor is computed from the level *before* this step's ``R`` enters it, so a noise
    step-up is seen at full height; the level then follows ``R`` with a time constant of
    ``1/(1-level_beta)`` steps (100 by default), so the factor returns to 1 once a higher
    noise has become the usual one. ``alpha = 1`` makes the step inversely proportional to the
    excess noise (twice the usual noise, half the step). The formula was chosen by measurement
    (README, "The Variance Gradient Scaler"): on the default ``Pendulum-v1`` run its factor
    varies (1 on 43% of the updates after warm-up, mean 0.81, no value on more than 80%),
    and over 5 seeds of 100k steps the final return with the scaler is -150 +- 35 against
    -186 +- 82 without it. Every number of this formula is computed in exactly one place,
    :meth:`_scale_and_level`.

    Tracked parameters are those that require gradients; frozen ones are ignored. The buffers
    live on each parameter's device with its dtype: two numbers per element, like Adam. When
    all of them share one device and dtype, they are views of two flat buffers (made at the
    first step, and again after a load or relink), so that each element-wise update is one
    kernel for all tensors; the per-tensor sums still run tensor by tensor. Every element
    and every sum is computed as tensor by tensor, in the same order: the results are bit for
    bit those of the per-tensor path, which steps with missing gradients still take.

    Edge cases, chosen so that a step without information changes nothing:

    - a parameter whose ``.grad`` is ``None`` at a step is skipped for that step: its
      statistics are not updated and it does not enter the quantile. The bias correction
      uses the scaler's step ``t`` for every tensor (the formula above);
    - a step where every ``.grad`` is ``None`` is a no-op: the step count, the statistics, the
      last scale and the logger are untouched, and 1.0 is returned;
    - ``enabled=False`` makes the scaler inert: :meth:`compute_scale` returns 1.0 and changes
      neither the statistics, the step count nor the logger;
    - the level is unset before warm-up ends (and in a state upgraded from format 1): the
      first step that needs it sets it to its ``R`` and scales by 1. Step 1 never sets it:
      the variance of a single sample is zero;
    - ``R == 0`` (no noise at all) scales by 1; a NaN or infinite ``R`` (non-finite gradients
      poison the averages, as they poison Adam's) scales by ``min_scale``. Neither enters the
      level, whose logarithm they would make infinite or NaN for good;
      :meth:`reset_statistics` recovers from poisoned averages.

    Checkpoints: pickling keeps the configuration, counters, level and statistics but never
    the parameters or the logger; an unpickled scaler is unlinked, and computing a scale
    raises until :meth:`update_parameters` links it to the live parameters (watching nothing
    would silently switch it off). :meth:`state_dict` / :meth:`load_state_dict` carry the same
    state as plain data with a format version; format-1 states (the absolute cap of older
    versions) load and are upgraded, and ``dppo-ckpt migrate`` rewrites them in files.

    :param parameters: the parameters whose raw gradients feed the statistics (e.g.
        ``policy.parameters()``); ``None`` leaves the scaler unlinked until
        :meth:`update_parameters` is called
    :param beta: decay of the gradient moving averages, in [0, 1)
    :param alpha: strength of the damping, the exponent of ``level / R``, >= 0 (0: off)
    :param eps: added to the squared mean of each tensor to avoid division by zero, > 0
    :param warmup_steps: steps during which statistics accumulate but the scale stays 1
    :param quantile: which quantile of the per-tensor ratios is ``R``, in [0, 1]
    :param level_beta: decay of the running level of ``log R``, in [0, 1)
    :param min_scale: lower bound on the scale, in (0, 1]
    :param enabled: when False the scaler does nothing at all
    :param logger: an SB3 logger; each step records ``vgs/scale``, ``vgs/noise_ratio``,
        ``vgs/level`` (once set) and ``vgs/step``, and each step after warm-up adds to the
        means ``vgs/scale_mean``, ``vgs/at_min_share`` and ``vgs/at_one_share`` (the share of
        the steps since the last dump whose scale was ``min_scale``, or 1)
    """

    STATE_FORMAT_VERSION: ClassVar[int] = STATE_FORMAT_VERSION

    # ``_flat`` (the statistics' flat buffers, derived from ``_exp_avg``/``_exp_avg_sq``) is a
    # slot, outside ``__dict__``: it is never pickled, and ``__dict__`` (which SB3 describes in
    # a checkpoint's ``data`` entry) holds the attributes it always held.
    __slots__ = ("__dict__", "__weakref__", "_flat")

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter] | None = None,
        beta: float = 0.99,
        alpha: float = 1.0,
        eps: float = 1e-8,
        warmup_steps: int = 100,
        quantile: float = 0.9,
        level_beta: float = _DEFAULT_LEVEL_BETA,
        min_scale: float = 0.1,
        enabled: bool = True,
        logger: Logger | None = None,
    ) -> None:
        config = _validate_config(
            beta, alpha, eps, warmup_steps, quantile, level_beta, min_scale, enabled
        )
        # The attribute order is the pickled order (vgs_format.PICKLED_ORDER).
        self._state_version: int = self.STATE_FORMAT_VERSION
        self.beta: float = config["beta"]
        self.alpha: float = config["alpha"]
        self.eps: float = config["eps"]
        self.warmup_steps: int = config["warmup_steps"]
        self.quantile: float = config["quantile"]
        self.level_beta: float = config["level_beta"]
        self.min_scale: float = config["min_scale"]
        self.enabled: bool = config["enabled"]

        self._step_count: int = 0
        self._scaling_factor: float = 1.0
        self._noise_ratio: float = 0.0
        self._level: float | None = None
        self._post_warmup_steps: int = 0
        self._at_min_steps: int = 0
        self._at_one_steps: int = 0
        self._scale_sum: float = 0.0
        self._exp_avg: list[torch.Tensor] | None = None
        self._exp_avg_sq: list[torch.Tensor] | None = None
        self._parameters: list[torch.Tensor] | None = None
        self._logger: Logger | None = logger
        self._legacy_parameters_dropped: bool = False
        # Derived from the statistics on the first step (see _flat_statistics).
        self._flat: _FlatStatistics | None = None
        if parameters is not None:
            self.update_parameters(parameters)

    # ------------------------------------------------------------------ read-only state

    @property
    def scaling_factor(self) -> float:
        """The scale computed at the last step (1.0 before the first)."""
        return self._scaling_factor

    @property
    def step_count(self) -> int:
        """Number of steps that updated the statistics (``t`` in the formulas)."""
        return self._step_count

    @property
    def noise_ratio(self) -> float:
        """The aggregated noise-to-signal ratio ``R`` of the last step (0.0 before the first)."""
        return self._noise_ratio

    @property
    def level(self) -> float | None:
        """The running (geometric) level of ``R``; None until warm-up has set it."""
        return self._level

    @property
    def factor_counts(self) -> dict[str, float]:
        """How the scale was distributed over the steps after warm-up, since the start.

        ``steps`` (after warm-up), ``at_min`` (scale == min_scale), ``at_one`` (scale == 1)
        and ``scale_sum`` (the sum of the scales, for their mean). Saved with the state.
        """
        return {
            "steps": self._post_warmup_steps,
            "at_min": self._at_min_steps,
            "at_one": self._at_one_steps,
            "scale_sum": self._scale_sum,
        }

    @property
    def legacy_parameters_dropped(self) -> bool:
        """True when this scaler was unpickled from a state that still held parameter copies.

        Such copies are stale by construction and were discarded; the owner must relink with
        :meth:`update_parameters` (and may want to tell the user the checkpoint is old).
        """
        return self._legacy_parameters_dropped

    @property
    def parameters(self) -> tuple[torch.Tensor, ...] | None:
        """The tracked parameter objects (the live ones, by identity), or None when unlinked."""
        return None if self._parameters is None else tuple(self._parameters)

    @property
    def logger(self) -> Logger | None:
        """The SB3 logger receiving ``vgs/*`` metrics, or None. Never pickled."""
        return self._logger

    @logger.setter
    def logger(self, logger: Logger | None) -> None:
        self._logger = logger

    def _config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _CONFIG_KEYS}

    # ------------------------------------------------------------------ the step

    def _scale_and_level(self, step: int, noise_ratio: float) -> tuple[float, float | None]:
        """The scale of step ``step`` and the level after it, from this step's ``R``.

        The whole formula of the class docstring, in plain Python floats (IEEE doubles), in a
        fixed order of operations so that the results are bit-identical from run to run.
        """
        level = self._level
        usable = 0.0 < noise_ratio < math.inf  # False for NaN as well
        # One sample has no variance: R at step 1 is 0 up to rounding, and a level started
        # there would hold the factor at min_scale for hundreds of steps.
        can_start = usable and step >= 2
        if step <= self.warmup_steps:
            if step == self.warmup_steps and can_start:
                level = noise_ratio
            return 1.0, level
        if level is None:
            # Warm-up ended without a usable ratio, or the state predates the level.
            return 1.0, noise_ratio if can_start else None
        if noise_ratio == 0.0 or self.alpha == 0.0:
            scale = 1.0
        elif not usable:
            scale = self.min_scale
        elif noise_ratio <= level:
            # (level/R)**alpha >= 1 is clamped to 1; not computing it avoids float overflow.
            scale = 1.0
        else:
            scale = max((level / noise_ratio) ** self.alpha, self.min_scale)
        if usable:
            decay = self.level_beta
            level = math.exp(decay * math.log(level) + (1.0 - decay) * math.log(noise_ratio))
        return scale, level

    def compute_scale(self) -> float:
        """Update the statistics from the raw gradients and return this step's scale.

        Call it after ``backward()`` and before gradient clipping, so that the statistics see
        the raw gradients; then take the optimizer step with :meth:`step`. The gradients are
        read, never changed.

        :return: the factor for this step's learning rate, in ``[min_scale, 1]``
        :raises RuntimeError: if the scaler is enabled but not linked to parameters (as after
            unpickling): watching nothing would silently disable it
        """
        if not self.enabled:
            return 1.0
        params = self._parameters
        if params is None or self._exp_avg is None or self._exp_avg_sq is None:
            raise RuntimeError(
                "VarianceGradientScaler is not linked to any parameters (parameters are never "
                "saved with it); call update_parameters(policy.parameters()) first"
            )
        grads = [param.grad for param in params]
        flat: _FlatStatistics | None = None
        if any(grad is None for grad in grads):
            present = [index for index, grad in enumerate(grads) if grad is not None]
            if not present:
                return 1.0
            grads = [grads[index] for index in present]
            exp_avg = [self._exp_avg[index] for index in present]
            exp_avg_sq = [self._exp_avg_sq[index] for index in present]
        else:
            flat = self._flat_statistics()
            exp_avg, exp_avg_sq = self._exp_avg, self._exp_avg_sq

        step = self._step_count + 1
        beta = self.beta
        # 1/(1-beta^t); beta**step underflows to 0 for long runs, giving exactly 1.
        correction = 1.0 / (1.0 - beta**step)
        with torch.no_grad():
            if flat is not None and flat.m is not None and flat.v is not None:
                signal_norms, noise_sums = self._flat_sums(flat, grads, beta, correction)
            else:
                signal_norms, noise_sums = self._tensor_sums(
                    grads, exp_avg, exp_avg_sq, beta, correction
                )
            # A handful of numbers: plain Python floats (IEEE double, like float64 tensors) are
            # the fastest. The order of operations is fixed so that results stay bit-identical.
            squared_correction, eps = correction**2, self.eps
            values = _to_floats(noise_sums + signal_norms)
            noises, norms = values[: len(noise_sums)], values[len(noise_sums) :]
            ratios = [
                noise * correction / (norm * norm * squared_correction + eps)
                for noise, norm in zip(noises, norms, strict=True)
            ]
            noise_ratio = _linear_quantile(ratios, self.quantile)
        scale, level = self._scale_and_level(step, noise_ratio)

        self._step_count = step
        self._scaling_factor = scale
        self._noise_ratio = noise_ratio
        self._level = level
        after_warmup = step > self.warmup_steps
        if after_warmup:
            self._post_warmup_steps += 1
            self._at_min_steps += scale == self.min_scale
            self._at_one_steps += scale == 1.0
            self._scale_sum += scale
        if self._logger is not None:
            self._logger.record("vgs/scale", scale)
            self._logger.record("vgs/noise_ratio", noise_ratio)
            if level is not None:
                self._logger.record("vgs/level", level)
            self._logger.record("vgs/step", step)
            if after_warmup:
                self._logger.record_mean("vgs/scale_mean", scale)
                self._logger.record_mean("vgs/at_min_share", float(scale == self.min_scale))
                self._logger.record_mean("vgs/at_one_share", float(scale == 1.0))
        return scale

    def _flat_statistics(self) -> _FlatStatistics:
        """The flat form of the current statistics, made (once) when they are new.

        Whenever ``_exp_avg``/``_exp_avg_sq`` are other lists than the ones last flattened
        (first step, a loaded state, a relink), they are copied into two flat buffers and
        replaced by views of them, with the very same values.
        """
        flat = self._flat
        if (
            flat is None
            or flat.exp_avg is not self._exp_avg
            or flat.exp_avg_sq is not self._exp_avg_sq
        ):
            assert self._exp_avg is not None and self._exp_avg_sq is not None
            flat = _flatten_statistics(self._exp_avg, self._exp_avg_sq)
            self._exp_avg, self._exp_avg_sq = flat.exp_avg, flat.exp_avg_sq
            self._flat = flat
        return flat

    @staticmethod
    def _flat_sums(
        flat: _FlatStatistics, grads: list[torch.Tensor], beta: float, correction: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Update the flat statistics from ``grads`` (one per tracked tensor) and return the
        per-tensor ``||m||`` and ``sum(clamp(v - correction*m^2, 0))``, as 0-dim tensors.

        Every operation is element-wise, so each element is computed by the very kernel, with
        the very scalars, of the per-tensor path (:meth:`_tensor_sums`): the buffers and sums
        are bit for bit the same, with one kernel call per operation and group instead of one
        per tensor. The per-tensor reductions run on views, again as in that path.
        """
        assert flat.m is not None and flat.v is not None and flat.excess is not None
        signal_norms: list[torch.Tensor] = []
        noise_sums: list[torch.Tensor] = []
        whole = len(flat.groups) == 1
        # The per-tensor path's multiplier, so that half-precision statistics round alike.
        decay = _multiplier(beta, [flat.v])
        for start, stop, low, high in flat.groups:
            g = _flatten_dense_tensors(grads[start:stop])
            m, v, excess = (
                (flat.m, flat.v, flat.excess)
                if whole
                else (flat.m[low:high], flat.v[low:high], flat.excess[low:high])
            )
            m.lerp_(g, 1.0 - beta)
            signal_norms.extend(torch._foreach_norm(flat.exp_avg[start:stop]))
            v.mul_(decay)
            v.addcmul_(g, g, value=1.0 - beta)
            torch.addcmul(v, m, m, value=-correction, out=excess)
            excess.clamp_min_(0.0)
            noise_sums.extend(part.sum() for part in flat.excess_parts[start:stop])
        return signal_norms, noise_sums

    @staticmethod
    def _tensor_sums(
        grads: list[torch.Tensor],
        exp_avg: list[torch.Tensor],
        exp_avg_sq: list[torch.Tensor],
        beta: float,
        correction: float,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`_flat_sums` tensor by tensor: for steps where some gradients are missing,
        and for statistics on several devices or with several dtypes."""
        signal_norms: list[torch.Tensor] = []
        noise_sums: list[torch.Tensor] = []
        decay = _multiplier(beta, exp_avg_sq)
        # Groups of about _GROUP_ELEMENTS elements go through all the kernels below before
        # the next group starts, so each group's data stays in cache between kernels.
        for start, stop in _groups(grads):
            g, m, v = grads[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop]
            torch._foreach_lerp_(m, g, 1.0 - beta)
            signal_norms.extend(torch._foreach_norm(m))
            torch._foreach_mul_(v, decay)
            torch._foreach_addcmul_(v, g, g, value=1.0 - beta)
            # sum(mh^2) = correction^2 * ||m||^2 and
            # sum(clamp(vh - mh^2, 0)) = correction * sum(clamp(v - correction*m^2, 0)):
            # one temporary per tensor instead of three.
            excess = torch._foreach_addcmul(v, m, m, value=-correction)
            torch._foreach_clamp_min_(excess, 0.0)
            # Plain sums beat _foreach_norm(ord=1) several times over on CPU.
            noise_sums.extend(tensor.sum() for tensor in excess)
            del excess
        return signal_norms, noise_sums

    def step(self, optimizer: torch.optim.Optimizer, scale: float) -> None:
        """``optimizer.step()`` with every param group's learning rate multiplied by ``scale``.

        The learning rates are put back afterwards (the very same objects, also when the step
        raises), so nothing of the scale outlives this step: not the optimizer's state, not a
        checkpoint, not a schedule that sets the rate at the next rollout.

        :param optimizer: the optimizer over the tracked parameters
        :param scale: the factor from :meth:`compute_scale` (1.0: a plain step)
        :raises ValueError: if ``scale`` is not a finite number > 0
        """
        scale = _real("scale", scale)
        if not 0.0 < scale < math.inf:
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if scale == 1.0:
            optimizer.step()
            return
        groups = optimizer.param_groups
        rates = [group["lr"] for group in groups]
        try:
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate * scale
            optimizer.step()
        finally:
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate

    # ------------------------------------------------------------------ linking and state

    def update_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Track ``params`` (those requiring gradients) by identity, keeping the statistics.

        Call it whenever the live parameter objects change: after unpickling, after loading a
        checkpoint, after the owner rebuilt its policy or optimizer. Existing statistics are
        kept (moved to the parameters' device and dtype if those changed); without statistics,
        zero buffers are created.

        :raises ValueError: if the number of trainable parameters or the shape of one differs
            from the statistics (the message names the first mismatch); nothing is changed
        """
        tracked = _trainable(params)
        if self._exp_avg is None or self._exp_avg_sq is None:
            with torch.no_grad():
                self._exp_avg = [torch.zeros_like(param) for param in tracked]
                self._exp_avg_sq = [torch.zeros_like(param) for param in tracked]
        else:
            _check_compatible(tracked, self._exp_avg, "update_parameters")
            self._exp_avg = self._relocate(self._exp_avg, tracked, copy=False)
            self._exp_avg_sq = self._relocate(self._exp_avg_sq, tracked, copy=False)
        self._parameters = tracked

    @staticmethod
    def _relocate(
        buffers: list[torch.Tensor], params: list[torch.Tensor], copy: bool
    ) -> list[torch.Tensor]:
        """``buffers`` on their parameters' devices and dtypes (copied if ``copy``)."""
        # Statistics never require gradients, so no detach: without ``copy`` a buffer already
        # in place is returned as the very same tensor.
        return [
            buf.to(device=param.device, dtype=param.dtype, copy=copy)
            for buf, param in zip(buffers, params, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: format version, config, counters, level and
        buffers. The buffers are cloned, so the result does not change as training goes on.
        """

        def clone(buffers: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if buffers is None else [buf.detach().clone() for buf in buffers]

        return {
            "format_version": self.STATE_FORMAT_VERSION,
            "config": self._config(),
            "step_count": self._step_count,
            "scaling_factor": self._scaling_factor,
            "noise_ratio": self._noise_ratio,
            "level": self._level,
            "post_warmup_steps": self._post_warmup_steps,
            "at_min_steps": self._at_min_steps,
            "at_one_steps": self._at_one_steps,
            "scale_sum": self._scale_sum,
            "exp_avg": clone(self._exp_avg),
            "exp_avg_sq": clone(self._exp_avg_sq),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` bit for bit (config included); the links are kept.

        A format-1 state (absolute cap, no running level) is upgraded first: its cap is
        dropped, ``level_beta`` takes its default, the level is unset and the counters start
        at zero. Everything is checked before anything changes.

        :raises ValueError: if ``state`` is not a scaler state, comes from a newer format, or
            (when linked) does not match the tracked parameters in count or shape
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"expected a VarianceGradientScaler state dict, got {type(state)}")
        version = state.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(
                f"not a VarianceGradientScaler state dict: format_version is {version!r}"
            )
        if version > self.STATE_FORMAT_VERSION:
            raise ValueError(
                f"VarianceGradientScaler state format_version {version} is newer than the "
                f"supported {self.STATE_FORMAT_VERSION}; upgrade dppo-ckpt to load it"
            )
        if version < 1:
            raise ValueError(f"unknown VarianceGradientScaler state format_version {version}")
        if version == 1:
            state = _upgrade_state(state)
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"VarianceGradientScaler state dict is missing {missing}")
        config = state["config"]
        if not isinstance(config, Mapping) or set(config) != set(_CONFIG_KEYS):
            raise ValueError(
                f"VarianceGradientScaler state config must have exactly the keys "
                f"{list(_CONFIG_KEYS)}, got {config!r}"
            )
        config = _validate_config(**{key: config[key] for key in _CONFIG_KEYS})
        step_count = _count("step_count", state["step_count"])
        scaling_factor = _real("scaling_factor", state["scaling_factor"])
        # A NaN ratio is a real outcome (poisoned averages), so it is kept, not refused.
        noise_ratio = state["noise_ratio"]
        if not (isinstance(noise_ratio, float) and math.isnan(noise_ratio)):
            noise_ratio = _real("noise_ratio", noise_ratio)
        level = state["level"]
        if level is not None:
            level = _real("level", level)
            if not 0.0 < level < math.inf:
                raise ValueError(f"level must be None or finite and > 0, got {level}")
        counters = {
            key: _count(key, state[key])
            for key in ("post_warmup_steps", "at_min_steps", "at_one_steps")
        }
        scale_sum = _real("scale_sum", state["scale_sum"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if (exp_avg is None) != (exp_avg_sq is None):
            raise ValueError("exp_avg and exp_avg_sq must both be lists of tensors or both None")
        if exp_avg is not None:
            if not (isinstance(exp_avg, (list, tuple)) and isinstance(exp_avg_sq, (list, tuple))):
                raise ValueError("exp_avg and exp_avg_sq must be lists of tensors")
            if len(exp_avg) != len(exp_avg_sq):
                raise ValueError(
                    f"exp_avg has {len(exp_avg)} tensors but exp_avg_sq has {len(exp_avg_sq)}"
                )
            for index, (mean, sq) in enumerate(zip(exp_avg, exp_avg_sq, strict=True)):
                if not (isinstance(mean, torch.Tensor) and isinstance(sq, torch.Tensor)):
                    raise ValueError(f"statistics {index} are not tensors")
                if mean.shape != sq.shape:
                    raise ValueError(
                        f"statistics {index}: exp_avg shape {tuple(mean.shape)} differs from "
                        f"exp_avg_sq shape {tuple(sq.shape)}"
                    )
            if self._parameters is not None:
                _check_compatible(self._parameters, list(exp_avg), "load_state_dict")

        flat: _FlatStatistics | None = None
        if exp_avg is None:
            new_avg = new_avg_sq = None
            if self._parameters is not None:
                with torch.no_grad():
                    new_avg = [torch.zeros_like(param) for param in self._parameters]
                    new_avg_sq = [torch.zeros_like(param) for param in self._parameters]
        elif self._parameters is not None:
            flat = self._flat_load(list(exp_avg), list(exp_avg_sq), self._parameters)
            if flat is not None:
                new_avg, new_avg_sq = flat.exp_avg, flat.exp_avg_sq
            else:
                new_avg = self._relocate([buf.detach() for buf in exp_avg], self._parameters, True)
                new_avg_sq = self._relocate(
                    [buf.detach() for buf in exp_avg_sq], self._parameters, True
                )
        else:
            new_avg = [buf.detach().clone() for buf in exp_avg]
            new_avg_sq = [buf.detach().clone() for buf in exp_avg_sq]

        for key, value in config.items():
            setattr(self, key, value)
        self._state_version = self.STATE_FORMAT_VERSION
        self._step_count = step_count
        self._scaling_factor = scaling_factor
        self._noise_ratio = noise_ratio
        self._level = level
        self._post_warmup_steps = counters["post_warmup_steps"]
        self._at_min_steps = counters["at_min_steps"]
        self._at_one_steps = counters["at_one_steps"]
        self._scale_sum = scale_sum
        self._exp_avg = new_avg
        self._exp_avg_sq = new_avg_sq
        if flat is not None:
            self._flat = flat

    def _flat_load(
        self,
        exp_avg: list[torch.Tensor],
        exp_avg_sq: list[torch.Tensor],
        params: list[torch.Tensor],
    ) -> _FlatStatistics | None:
        """The loaded statistics in flat buffers, when every tensor already has its
        parameter's device and dtype; None otherwise (they are relocated tensor by tensor).

        They are copied into the current flat buffers when the scaler has them (as a module's
        ``load_state_dict`` copies into its parameters), else into new ones: either way the
        one copy a load needs, in the form the next :meth:`compute_scale` uses.
        """
        if not all(
            buf.device == param.device and buf.dtype == param.dtype
            for buffers in (exp_avg, exp_avg_sq)
            for buf, param in zip(buffers, params, strict=True)
        ):
            return None
        flat = self._flat
        if (
            flat is not None
            and flat.m is not None
            and flat.v is not None
            and flat.exp_avg is self._exp_avg
            and flat.exp_avg_sq is self._exp_avg_sq
            and len(flat.exp_avg) == len(exp_avg)
            and all(old.shape == new.shape for old, new in zip(flat.exp_avg, exp_avg, strict=True))
            # Parameters moved or cast since the buffers were made need buffers like them.
            and flat.m.dtype == exp_avg[0].dtype
            and flat.m.device == exp_avg[0].device
            # A source inside the buffers themselves would be overwritten while it is read.
            and not {flat.m.untyped_storage().data_ptr(), flat.v.untyped_storage().data_ptr()}
            & {buf.untyped_storage().data_ptr() for buf in (*exp_avg, *exp_avg_sq)}
        ):
            with torch.no_grad():
                torch._foreach_copy_(flat.exp_avg, exp_avg)
                torch._foreach_copy_(flat.exp_avg_sq, exp_avg_sq)
            return flat
        flat = _flatten_statistics(exp_avg, exp_avg_sq)
        return flat if flat.m is not None else None

    def reset_statistics(self) -> None:
        """Zero the moving averages, the step count, the level and the factor counters, so
        that warm-up starts again."""
        if self._exp_avg is not None and self._exp_avg_sq is not None:
            with torch.no_grad():
                torch._foreach_zero_(self._exp_avg)
                torch._foreach_zero_(self._exp_avg_sq)
        self._step_count = 0
        self._scaling_factor = 1.0
        self._noise_ratio = 0.0
        self._level = None
        self._post_warmup_steps = self._at_min_steps = self._at_one_steps = 0
        self._scale_sum = 0.0

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """The picklable state: everything but the parameters and the logger.

        Pickled parameters come back as copies that no optimizer updates; the owner relinks
        the live ones with :meth:`update_parameters` after loading.
        """
        state = self.__dict__.copy()
        for key in _UNPICKLED_ATTRIBUTES:
            state.pop(key, None)
        if self._flat is not None:
            # Views would pickle the whole flat buffer; each tensor pickles on its own, as
            # before the buffers were flat.
            for key in ("_exp_avg", "_exp_avg_sq"):
                if state.get(key) is not None:
                    state[key] = [buf.clone() for buf in state[key]]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore an unlinked scaler, discarding parameter copies held by older pickles and
        upgrading a format-1 state (see :meth:`load_state_dict`)."""
        state = dict(state)
        # Any of these keys marks a pickle of an earlier version (the checkpoint checks and
        # migrate apply the same rule): this scaler never pickles them.
        legacy = [key for key in _UNPICKLED_ATTRIBUTES if key in state]
        for key in legacy:
            state.pop(key)
        # Format 1 had an absolute cap on R; the running level replaces it.
        for key in FORMAT_1_ONLY:
            state.pop(key, None)
        self.__dict__.update(_STATE_DEFAULTS)
        self.__dict__.update(state)
        self._state_version = self.STATE_FORMAT_VERSION
        self._parameters = None
        self._logger = None
        self._legacy_parameters_dropped = bool(legacy)
        self._flat = None

    def __repr__(self) -> str:
        config = ", ".join(f"{key}={getattr(self, key)!r}" for key in _CONFIG_KEYS)
        if self._parameters is None:
            link = "unlinked"
        else:
            elements = sum(param.numel() for param in self._parameters)
            link = f"{len(self._parameters)} tensors, {elements} elements"
        return (
            f"{type(self).__name__}({config}; step_count={self._step_count}, "
            f"scaling_factor={self._scaling_factor:.6g}, noise_ratio={self._noise_ratio:.6g}, "
            f"level={self._level if self._level is None else format(self._level, '.6g')}, "
            f"{link})"
        )
