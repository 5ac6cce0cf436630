"""The load checks of ``dppo-ckpt verify`` (``DPPO007``-``DPPO012``): load the model with the
allow-list loader, then examine it: identity, statistics, gradient probe, round trip.

Each function is declared with its ID, title, category and remedy in
:data:`~dppo_ckpt.checkpoint.registry.VERIFY`, which gives the run order. The declarations
must be known to a static run, which never imports torch: so this module imports torch,
numpy and gymnasium inside the functions that use them, never at the top.

Identity is checked with ``id()``: equal values prove nothing, since the original bug was a
scaler holding *copies* of the parameters that compared equal and were never updated.
"""

from __future__ import annotations

import copy
import io
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dppo_ckpt.checkpoint.contents import SCALER_ENTRY, scaler_payload
from dppo_ckpt.checkpoint.context import CheckContext
from dppo_ckpt.checkpoint.registry import VERIFY, CheckSpec, describe, one_line
from dppo_ckpt.checkpoint.results import CheckResult
from dppo_ckpt.checkpoint.static_checks import UNSAFE_REMEDY

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gymnasium import spaces

__all__ = [
    "PROBE_ABS_TOLERANCE",
    "PROBE_REL_TOLERANCE",
    "check_loads_safely",
    "check_optimizer_tracks_policy",
    "check_round_trip",
    "check_scale_reaches_step",
    "check_scaler_statistics",
    "check_scaler_tracks_policy",
    "model_state",
    "state_fingerprint",
]

_PROBE_BATCH = 8
_PROBE_SEED = 0


def _scaler(model: Any) -> Any:
    return model.__dict__.get("_variance_gradient_scaler")


def _is_distributional(model: Any) -> bool:
    from dppo_ckpt.ppo import DistributionalPPO

    return isinstance(model, DistributionalPPO)


def _not_applicable(spec: CheckSpec, model: Any) -> CheckResult | None:
    """A skip result when ``model`` has no scaler to check, else ``None``."""
    if not _is_distributional(model):
        return spec.skipped(
            f"not a DistributionalPPO checkpoint ({type(model).__name__}): no scaler"
        )
    if _scaler(model) is None:
        return spec.skipped("the scaler is off (variance_gradient_scaling=False)")
    return None


def _trainable(model: Any) -> list[torch.Tensor]:
    return [p for p in model.policy.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


@VERIFY.check(
    "DPPO007",
    title="Model loads safely",
    category="archive",
    stage="load",
    summary="allow-list loader",
    on_failure="exit 2; exit 3 (security) if refused as unsafe",
    remedy="Inspect the file with `dppo-ckpt inspect`; restore it from a good copy or save the "
    "model again.",
)
def check_loads_safely(ctx: CheckContext) -> CheckResult:
    """DPPO007: load with the allow-list loader (``safe_load``); a refusal is exit 3, any
    other failure makes the file unusable (exit 2)."""
    from dppo_ckpt.checkpoint.safe_pickle import UnsafePickleError, safe_load

    spec = VERIFY["DPPO007"]
    assert ctx.archive is not None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx.model = safe_load(
                ctx.archive, env=ctx.env, device="cpu", trust=ctx.trust, budgets=ctx.budgets,
                allow=ctx.allow,
            )  # fmt: skip
    except UnsafePickleError as exc:
        ctx.load_blocker = "the loader refused the file as unsafe (DPPO007)"
        return spec.failed(
            describe(exc),
            category="security",
            remedy=UNSAFE_REMEDY,
            member=exc.member,
            **({"entry": exc.entry} if exc.entry else {}),
        )
    except Exception as exc:
        ctx.load_blocker = "the model did not load (DPPO007)"
        return spec.failed(f"the model does not load: {describe(exc)}")
    ctx.load_warnings = [one_line(w.message) for w in caught]
    model = ctx.model
    name = type(model).__name__
    params = sum(p.numel() for p in model.policy.parameters())
    how = (
        "with code from the file allowed to run (--trust)"
        if ctx.trust and ctx.scan is not None and ctx.scan.refused
        else "without running code from the file"
    )
    return spec.passed(
        f"{name} loaded {how} ({params} policy parameters)",
        algorithm=name,
        parameters=params,
        warnings=ctx.load_warnings,
    )


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


@VERIFY.check(
    "DPPO008",
    title="Scaler tracks the policy's parameters",
    category="lifecycle",
    stage="model",
    summary="N/N by `id()`",
    remedy="Upgrade dppo-ckpt: its DistributionalPPO relinks the scaler on load; call "
    "scaler.update_parameters(policy.parameters()) after rebuilding a policy.",
)
def check_scaler_tracks_policy(ctx: CheckContext) -> CheckResult:
    """DPPO008: the scaler's tracked tensors are exactly the policy's trainable parameter
    objects (by ``id()``), in the same order."""
    spec = VERIFY["DPPO008"]
    model = ctx.model
    skip = _not_applicable(spec, model)
    if skip is not None:
        return skip
    live = _trainable(model)
    tracked = _scaler(model).parameters
    if tracked is None:
        return spec.failed(
            f"the scaler is not linked to any parameter (0/{len(live)} of the policy's)"
        )
    live_ids = [id(p) for p in live]
    shared = len(set(live_ids) & {id(p) for p in tracked})
    message = f"{shared}/{len(live)} of the policy's parameters tracked by identity"
    if shared != len(live) or len(tracked) != len(live):
        extra = len(tracked) - shared
        return spec.failed(
            message + (f", {extra} foreign tensor(s)" if extra else ""),
            tracked=len(tracked),
            policy=len(live),
            shared=shared,
        )
    if [id(p) for p in tracked] != live_ids:
        return spec.failed(message + ", but in another order than the policy's", shared=shared)
    return spec.passed(message, shared=shared, policy=len(live))


@VERIFY.check(
    "DPPO009",
    title="Optimizer tracks the policy's parameters",
    category="lifecycle",
    stage="model",
    summary="N/N by `id()`",
    remedy="Rebuild the optimizer over policy.parameters() after the policy is (re)built, then "
    "relink the scaler.",
)
def check_optimizer_tracks_policy(ctx: CheckContext) -> CheckResult:
    """DPPO009: the optimizer's parameter groups hold exactly the policy's trainable
    parameter objects (by ``id()``)."""
    spec = VERIFY["DPPO009"]
    model = ctx.model
    live = {id(p) for p in _trainable(model)}
    optimizer = getattr(model.policy, "optimizer", None)
    if optimizer is None:
        return spec.failed("the policy has no optimizer")
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    shared = len(live & set(in_optimizer))
    message = f"{shared}/{len(live)} of the policy's parameters in the optimizer by identity"
    foreign = len(set(in_optimizer) - live)
    if shared != len(live) or foreign or len(in_optimizer) != len(set(in_optimizer)):
        return spec.failed(
            message + (f", {foreign} foreign tensor(s)" if foreign else ""),
            shared=shared,
            policy=len(live),
            foreign=foreign,
        )
    return spec.passed(message, shared=shared, policy=len(live))


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _comparable(state: Any, tensor: Callable[[torch.Tensor], Any]) -> Any:
    """``state`` with every tensor replaced by ``tensor(t)`` and every float by its bits (so
    that NaN equals itself and -0.0 differs from 0.0), lists and tuples as lists."""
    import torch

    if isinstance(state, torch.Tensor):
        return tensor(state)
    if isinstance(state, dict):
        return {key: _comparable(value, tensor) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [_comparable(value, tensor) for value in state]
    if isinstance(state, float):
        return ("float", struct.pack("<d", state))
    return state


def state_fingerprint(state: Any) -> Any:
    """A bit-exact comparable form of a nested state (tensors by dtype, shape and bits;
    floats by their bits). The fingerprint is a snapshot: it holds copies of the tensors, so
    later changes to the state do not change it."""
    return _comparable(state, lambda t: _TensorBits(t.detach().to("cpu", copy=True)))


class _TensorBits:
    """A tensor that compares equal to another of the same dtype and shape with the very
    same bits, compared in place: for states whose tensors are copies nobody changes."""

    __slots__ = ("tensor",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach().cpu()

    def __eq__(self, other: object) -> bool:
        import torch

        if not isinstance(other, _TensorBits):
            return NotImplemented
        a, b = self.tensor, other.tensor
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two fingerprints first differ, or ``None`` when they are identical."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'state'}: keys differ"
        for key in a:
            found = _first_difference(a[key], b[key], f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{where}[{index}]")
            if found:
                return found
        return None
    return None if a == b else (where or "value")


def _stored_scaler_state(ctx: CheckContext) -> dict[str, Any] | None:
    """The scaler state the load restores, as the checkpoint stores it: the ``vgs.pth`` member
    read with ``torch.load(weights_only=True)`` (as SB3 reads it), else layout 1's scaler entry
    decoded with the allow-list unpickler, or, for a model checked in memory, the one given.

    ``vgs.pth`` comes first: the load restores it after the scaler is built, so where a file
    holds a scaler entry in ``data`` as well, the member's state is the one that must survive.
    """
    from dppo_ckpt.checkpoint.contents import SCALER_MEMBER
    from dppo_ckpt.checkpoint.safe_pickle import SafeUnpickler

    if ctx.archive is None:
        return ctx.stored_scaler
    if ctx.algorithm != "DistributionalPPO":
        return None
    if SCALER_MEMBER in ctx.archive:
        import torch

        # A stored member (as SB3 writes it) is read in place, not copied first.
        stream = ctx.archive.stored_window(SCALER_MEMBER) or ctx.archive.spool_member(
            SCALER_MEMBER
        )
        with stream:
            state = torch.load(stream, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{SCALER_MEMBER} holds a {type(state).__name__}, not a state dict")
        return state
    payload = scaler_payload(ctx.archive)
    if payload is None:
        return None
    scaler = SafeUnpickler(io.BytesIO(payload), entry=SCALER_ENTRY).load()
    return scaler.state_dict()


@VERIFY.check(
    "DPPO010",
    title="Scaler statistics survive the load",
    category="statistics",
    stage="model",
    summary="bit for bit against the stored ones: `vgs.pth`, else the `data` entry",
    remedy="Upgrade dppo-ckpt: loading must restore the scaler's saved statistics with "
    "load_state_dict() instead of starting from zero.",
)
def check_scaler_statistics(ctx: CheckContext) -> CheckResult:
    """DPPO010: the loaded scaler's ``state_dict()`` equals the stored one bit for bit
    (configuration, step count, last scale and ratio, both moment buffers)."""
    spec = VERIFY["DPPO010"]
    try:
        stored_state = _stored_scaler_state(ctx)
    except Exception as exc:
        return spec.errored(f"cannot decode the stored scaler: {describe(exc)}")
    model = ctx.model
    skip = _not_applicable(spec, model)
    if skip is not None:
        return skip
    if stored_state is None:
        return spec.skipped("no stored scaler state to compare with")
    live = _scaler(model).state_dict()
    # Both states are copies of their own: their tensors are compared where they lie.
    difference = _first_difference(
        _comparable(stored_state, _TensorBits), _comparable(live, _TensorBits)
    )
    if difference is not None:
        return spec.failed(
            f"the loaded scaler differs from the stored one at {difference} "
            f"(stored step {stored_state.get('step_count')}, loaded step {live['step_count']})",
            difference=difference,
        )
    buffers = live["exp_avg"] or []
    return spec.passed(
        f"step {live['step_count']}, scale {live['scaling_factor']:.6g} and "
        f"{2 * len(buffers)} moment tensors equal the stored ones bit for bit",
        step_count=live["step_count"],
    )


# ---------------------------------------------------------------------------------------------
# Gradient probe
# ---------------------------------------------------------------------------------------------


def _sample(space: spaces.Space, rng: np.random.Generator, n: int) -> Any:
    """``n`` points of ``space`` from a local generator (the space's own RNG is untouched)."""
    import numpy as np
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        low = np.where(np.isfinite(space.low), space.low, -1.0)
        high = np.where(np.isfinite(space.high), space.high, 1.0)
        values = rng.uniform(low, high, size=(n, *space.shape))
        return values.astype(space.dtype)
    if isinstance(space, spaces.Discrete):
        return rng.integers(space.start, space.start + space.n, size=n)
    if isinstance(space, spaces.MultiDiscrete):
        return (space.start + rng.integers(0, space.nvec, size=(n, *space.nvec.shape))).astype(
            space.dtype
        )
    if isinstance(space, spaces.MultiBinary):
        return rng.integers(0, 2, size=(n, *space.shape)).astype(space.dtype)
    if isinstance(space, spaces.Dict):
        return {key: _sample(sub, rng, n) for key, sub in space.spaces.items()}
    raise TypeError(f"cannot build a probe batch for a {type(space).__name__} space")


def _probe_loss(model: Any) -> torch.Tensor:
    """A loss in the shape of the PPO objective (policy, value and entropy terms) on a
    synthetic batch, reaching every trainable parameter the training loss reaches."""
    import numpy as np
    import torch
    from gymnasium import spaces

    policy = model.policy
    rng = np.random.default_rng(_PROBE_SEED)
    obs, _ = policy.obs_to_tensor(_sample(policy.observation_space, rng, _PROBE_BATCH))
    # Float actions, as the rollout buffer hands them out: MultiBinary samples are int8, and
    # the Bernoulli log-probability cannot take them.
    actions = torch.as_tensor(
        _sample(policy.action_space, rng, _PROBE_BATCH), dtype=torch.float32, device=model.device
    )
    if isinstance(policy.action_space, spaces.Discrete):
        actions = actions.long().flatten()
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    loss = -log_prob.mean() + 0.5 * values.float().square().mean()
    if entropy is not None:
        loss = loss - 0.01 * entropy.mean()
    return loss


@dataclass(frozen=True)
class _Snapshot:
    """What a probe update may change, as it was before: taken by :func:`_restored`."""

    optimizer_state: dict[str, Any]
    scaler_state: dict[str, Any]


@contextmanager
def _restored(model: Any) -> Iterator[_Snapshot]:
    """Restore, on exit, everything a probe update touches: the parameters (in place, so
    their identity is kept), their gradients, the optimizer's state and hyperparameters, the
    scaler's state and logger, the training mode and the torch RNG.

    The snapshot it yields is the probe's origin too: nothing may change it.
    """
    import torch

    scaler = _scaler(model)
    policy = model.policy
    optimizer = policy.optimizer
    params = list(policy.parameters())
    values = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    snapshot = _Snapshot(copy.deepcopy(optimizer.state_dict()), scaler.state_dict())
    logger = scaler.logger
    training = policy.training
    rng = torch.random.get_rng_state()
    try:
        yield snapshot
    finally:
        with torch.no_grad():
            for param, value in zip(params, values, strict=True):
                param.copy_(value)
        # The last use of the snapshot: the optimizer may keep its tensors.
        optimizer.load_state_dict(snapshot.optimizer_state)
        scaler.load_state_dict(snapshot.scaler_state)
        scaler.logger = logger
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        policy.train(training)
        torch.random.set_rng_state(rng)


def _probe_state(state: dict[str, Any]) -> dict[str, Any]:
    """The scaler's state forced into a regime where the factor cannot be 1: past warm-up,
    enabled, damping on (alpha >= 1), statistics (zero mean, unit second moment, beta > 0)
    that make every per-tensor noise ratio large, and a level far below any such ratio."""
    import torch

    config = dict(state["config"])
    config.update(
        warmup_steps=0,
        enabled=True,
        # beta = 0 would make the one-step variance zero, and R = 0 scales by 1.
        beta=max(config["beta"], 0.5),
        # A tiny alpha would round the factor to exactly 1 and prove nothing.
        alpha=max(config["alpha"], 1.0),
        min_scale=min(config["min_scale"], 0.5),
    )
    exp_avg = state["exp_avg"] or []

    def filled(value: float, like: torch.Tensor) -> torch.Tensor:
        # A broadcast scalar: the scaler's load makes the one copy of it.
        return torch.full((), value, dtype=like.dtype, device=like.device).expand_as(like)

    return {
        **state,
        "config": config,
        "step_count": 0,
        "level": 1e-12,
        "exp_avg": [filled(0.0, t) for t in exp_avg],
        "exp_avg_sq": [filled(1.0, t) for t in exp_avg],
    }


def _same_layout(a: Any, b: Any) -> bool:
    import torch

    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _reset_optimizer(optimizer: torch.optim.Optimizer, origin: dict[str, Any]) -> None:
    """Put ``optimizer`` back to ``origin`` (a deep copy of its ``state_dict()``), leaving
    ``origin`` as it was.

    Where the live state has the very entries of ``origin``, with tensors of the same
    layout, the values are copied into those tensors: that is what ``load_state_dict`` of a
    fresh copy would give, without a copy of every moment and with the state the update path
    keeps (its flat buffers, say) still in place. Otherwise a deep copy of ``origin`` is
    loaded.
    """
    import torch

    params = [param for group in optimizer.param_groups for param in group["params"]]
    saved, live = origin["state"], optimizer.state
    in_place = (
        len(optimizer.param_groups) == len(origin["param_groups"])
        and set(saved) <= set(range(len(params)))
        and len(live) == len(saved)
        and all(
            params[index] in live
            and live[params[index]].keys() == entry.keys()
            and all(
                _same_layout(live[params[index]][key], value)
                if isinstance(value, torch.Tensor)
                else not isinstance(live[params[index]][key], torch.Tensor)
                for key, value in entry.items()
            )
            for index, entry in saved.items()
        )
    )
    if not in_place:
        optimizer.load_state_dict(copy.deepcopy(origin))
        return
    with torch.no_grad():
        for index, entry in saved.items():
            state = live[params[index]]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    state[key].copy_(value)
                else:
                    state[key] = copy.deepcopy(value)
    for group, saved_group in zip(optimizer.param_groups, origin["param_groups"], strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


#: The probe's tolerance, per tensor: ||delta_s - s*delta_1|| <= REL*||delta_1|| + ABS.
PROBE_REL_TOLERANCE = 1e-5
PROBE_ABS_TOLERANCE = 1e-12


def _update_from_origin(
    model: Any,
    params: list[torch.Tensor],
    raw: list[torch.Tensor | None],
    origin: dict[str, Any],
    scale_of: Callable[[], float],
) -> float:
    """One update of ``model`` along its training path on the gradients ``raw``, from the
    optimizer state ``origin`` and with the parameters at zero: afterwards the parameters
    *are* the step. Returns the scale used.

    Stepping from the origin keeps the step free of the float32 rounding of
    ``theta + delta`` (which, at |theta| ~ 1 and a step of ~1e-3, alone exceeds the probe's
    1e-5 tolerance). Adam's step does not depend on theta.
    """
    import torch

    _reset_optimizer(model.policy.optimizer, origin)
    with torch.no_grad():
        for param, grad in zip(params, raw, strict=True):
            if grad is None:
                param.grad = None
            elif _same_layout(param.grad, grad):
                param.grad.copy_(grad)  # clipping scales it in place; ``raw`` stays as it was
            else:
                param.grad = grad.clone()
            param.zero_()
    scale = scale_of()
    model._optimizer_step(_scaler(model), scale)
    return scale


def _step_norms(
    scaled: torch.Tensor, unit: torch.Tensor, factor: float
) -> tuple[float, float, float]:
    """``(||scaled - factor*unit||, ||unit||, ||scaled||)`` of one tensor's two steps.

    ``unit`` is the caller's own copy and is overwritten: no temporary of a tensor's size is
    made. In float32 the product and difference round by about 1e-7 relative, two orders
    below the probe's tolerance.
    """
    import torch

    size = float(torch.linalg.vector_norm(unit))
    length = float(torch.linalg.vector_norm(scaled))
    error = float(torch.linalg.vector_norm(unit.mul_(-factor).add_(scaled)))
    return error, size, length


@VERIFY.check(
    "DPPO011",
    title="Scaler factor scales the optimizer's step",
    category="lifecycle",
    stage="model",
    summary="probe; all state restored",
    remedy="Relink the scaler with scaler.update_parameters(policy.parameters()) so that it "
    "watches the gradients the optimizer uses, and apply its factor with "
    "scaler.step(optimizer, scale) (the learning rate), not to .grad.",
)
def check_scale_reaches_step(ctx: CheckContext) -> CheckResult:
    """DPPO011: from a forced post-warm-up state, one probe update with the scaler's factor
    ``s`` moves the policy's parameters by ``s`` times the update with factor 1.

    A PPO-shaped loss on a synthetic batch gives the gradients. Two updates run along the
    model's own training path (:meth:`~dppo_ckpt.ppo.DistributionalPPO._optimizer_step`:
    clipping, then the scaler's step) from the same optimizer state: one with factor 1 and
    one with the factor ``compute_scale()`` returns, which must also leave the raw gradients
    untouched. Per tensor, ``||delta_s - s*delta_1|| <= 1e-5*||delta_1|| + 1e-12``. A factor
    that only multiplies ``.grad`` fails: Adam and the clipping divide it out again.

    During warm-up the factor is 1, which proves nothing; the probe therefore runs the scaler
    from a forced state (see :func:`_probe_state`). Everything is restored afterwards: the
    parameters, gradients, optimizer state, scaler state (bit for bit) and logger, the
    training mode and the torch RNG.
    """
    import torch

    spec = VERIFY["DPPO011"]
    model = ctx.model
    skip = _not_applicable(spec, model)
    if skip is not None:
        return skip
    scaler = _scaler(model)
    if scaler.parameters is None:
        return spec.failed("the scaler is not linked to any parameter: it watches nothing")
    params = _trainable(model)
    with _restored(model) as snapshot:
        scaler.logger = None
        scaler.load_state_dict(_probe_state(snapshot.scaler_state))
        for param in params:
            param.grad = None
        with torch.enable_grad():
            _probe_loss(model).backward()
        raw = [None if p.grad is None else p.grad.detach().clone() for p in params]
        tracked_with_grad = sum(t.grad is not None for t in scaler.parameters)
        # The backward pass left the optimizer as the snapshot has it: that is the origin.
        origin = snapshot.optimizer_state
        _update_from_origin(model, params, raw, origin, lambda: 1.0)
        unit = [p.detach().clone() for p in params]
        touched: list[int] = []

        def scale_of() -> float:
            factor = scaler.compute_scale()
            touched.extend(
                i
                for i, (p, g) in enumerate(zip(params, raw, strict=True))
                if g is not None and (p.grad is None or not torch.equal(p.grad, g))
            )
            return factor

        factor = _update_from_origin(model, params, raw, origin, scale_of)
        with_grad = [i for i, g in enumerate(raw) if g is not None]
        # The parameters hold the scaled step until the snapshot is restored.
        norms = {i: _step_norms(params[i].detach(), unit[i], factor) for i in with_grad}
    del unit
    if not with_grad:
        return spec.failed("the probe loss reached no parameter of the policy")
    if factor == 1.0:
        why = (
            "none of the scaler's tensors received a gradient: it tracks tensors the policy "
            "does not use"
            if tracked_with_grad == 0
            else "the scaler returned 1 in a forced post-warm-up regime"
        )
        return spec.failed(
            f"the factor cannot reach the step: {why}",
            factor=factor,
            tracked_with_grad=tracked_with_grad,
        )
    if touched:
        return spec.failed(
            f"compute_scale() changed {len(touched)}/{len(with_grad)} of the raw gradients; "
            "the factor belongs in the step size only",
            factor=factor,
            changed=len(touched),
        )
    wrong: list[int] = []
    worst = 0.0
    for i, (error, size, _) in norms.items():
        worst = max(worst, error / size if size > 0.0 else error)
        if error > PROBE_REL_TOLERANCE * size + PROBE_ABS_TOLERANCE:
            wrong.append(i)
    moved = sum(size > 0.0 for _, size, _ in norms.values())
    if wrong:
        steps = [norms[i][2] / norms[i][1] for i in wrong if norms[i][1] > 0.0]
        ratio = (
            f"; the step moved by {min(steps):.4g}..{max(steps):.4g} of the unscaled one"
            if steps
            else ""
        )
        return spec.failed(
            f"{len(wrong)}/{len(with_grad)} of the policy's tensors did not move by the factor "
            f"{factor:.6g} times the unscaled step (worst relative error {worst:.3g}){ratio}",
            factor=factor,
            wrong=len(wrong),
            worst_relative_error=worst,
        )
    return spec.passed(
        f"factor {factor:.6g} scaled the step of {len(with_grad)}/{len(params)} of the "
        f"policy's tensors ({moved} moved; worst relative error {worst:.2g}); parameters, "
        "optimizer, scaler and RNG restored",
        factor=factor,
        gradients=len(with_grad),
        worst_relative_error=worst,
    )


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


def model_state(model: Any, *, snapshot: bool = True) -> dict[str, Any]:
    """Parameters (and buffers), optimizer state and scaler state, for bit-exact comparison.

    :param snapshot: copy the tensors, so that the result still shows this state after the
        model changes; without it they are compared where they lie, for a state compared
        before anything can change it.
    """
    scaler = _scaler(model)
    live = {"policy": model.policy.state_dict(), "optimizer": model.policy.optimizer.state_dict()}
    state = state_fingerprint(live) if snapshot else _comparable(live, _TensorBits)
    # The scaler's state dict is a copy of its own already.
    state["scaler"] = None if scaler is None else _comparable(scaler.state_dict(), _TensorBits)
    return state


@VERIFY.check(
    "DPPO012",
    title="Save/load round trip is lossless",
    category="roundtrip",
    stage="roundtrip",
    summary="parameters, optimizer and scaler unchanged",
    remedy="Saving and loading changes the state: upgrade dppo-ckpt, or report the checkpoint "
    "and the versions it was written with.",
)
def check_round_trip(ctx: CheckContext) -> CheckResult:
    """DPPO012: save the loaded model, load it back, and compare policy parameters and
    buffers, optimizer state and scaler state bit for bit.

    The model in hand was loaded once already, through the allow-list (or with ``--trust``),
    so the bytes it saves pickle only what was accepted then: they are reloaded directly,
    from memory, without a second scan or a temporary file.
    """
    spec = VERIFY["DPPO012"]
    if ctx.archive is not None:
        # The round trip needs the loaded model only: the file's bytes, held whole since
        # DPPO001 for the load, are let go before it saves and loads a second copy.
        ctx.archive.close()
    model, env = ctx.model, ctx.env
    before = model_state(model)
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = type(model).load(buffer, env=env, device="cpu", tensorboard_log=None)
    del buffer
    difference = _first_difference(before, model_state(reloaded, snapshot=False))
    if difference is not None:
        return spec.failed(f"the state after save -> load differs at {difference}")
    unchanged = _first_difference(before, model_state(model, snapshot=False))
    if unchanged is not None:
        return spec.failed(f"saving changed the model's own state at {unchanged}")
    return spec.passed(
        "parameters, optimizer and scaler state identical after save -> load",
        compared=sorted(before),
    )
