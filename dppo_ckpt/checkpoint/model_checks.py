"""The checks that need a loaded model (and torch): identity, statistics, gradient probe,
round trip. Imported lazily by :mod:`dppo_ckpt.checkpoint.checks`, so that static
verification never imports torch.

Identity is checked with ``id()``: equal values prove nothing, since the original bug was a
scaler holding *copies* of the parameters that compared equal and were never updated.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from dppo_ckpt.checkpoint.checks import CHECKS, _timed
from dppo_ckpt.checkpoint.results import CheckResult

__all__ = [
    "check_optimizer_tracks_policy",
    "check_round_trip",
    "check_scale_reaches_step",
    "check_scaler_statistics",
    "check_scaler_tracks_policy",
    "model_checks",
]

_PROBE_BATCH = 8
_PROBE_SEED = 0


def _scaler(model: Any) -> Any:
    return model.__dict__.get("_variance_gradient_scaler")


def _is_distributional(model: Any) -> bool:
    from dppo_ckpt.ppo import DistributionalPPO

    return isinstance(model, DistributionalPPO)


def _not_applicable(check_id: str, model: Any) -> CheckResult | None:
    """A skip result when ``model`` has no scaler to check, else ``None``."""
    if not _is_distributional(model):
        return CHECKS[check_id].skipped(
            f"not a DistributionalPPO checkpoint ({type(model).__name__}): no scaler"
        )
    if _scaler(model) is None:
        return CHECKS[check_id].skipped("the scaler is off (variance_gradient_scaling=False)")
    return None


def _trainable(model: Any) -> list[torch.Tensor]:
    return [p for p in model.policy.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def check_scaler_tracks_policy(model: Any) -> CheckResult:
    """DPPO008: the scaler's tracked tensors are exactly the policy's trainable parameter
    objects (by ``id()``), in the same order."""
    spec = CHECKS["DPPO008"]
    skip = _not_applicable("DPPO008", model)
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


def check_optimizer_tracks_policy(model: Any) -> CheckResult:
    """DPPO009: the optimizer's parameter groups hold exactly the policy's trainable
    parameter objects (by ``id()``)."""
    spec = CHECKS["DPPO009"]
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


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_fingerprint(state: Any) -> Any:
    """A bit-exact comparable form of a nested state (tensors as dtype, shape and raw bytes;
    floats by their bits, so that NaN equals itself and -0.0 differs from 0.0)."""
    if isinstance(state, torch.Tensor):
        return ("tensor", str(state.dtype), tuple(state.shape), _tensor_bytes(state))
    if isinstance(state, dict):
        return {key: state_fingerprint(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [state_fingerprint(value) for value in state]
    if isinstance(state, float):
        return ("float", np.float64(state).tobytes())
    return state


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


def check_scaler_statistics(model: Any, stored_state: dict[str, Any] | None) -> CheckResult:
    """DPPO010: the loaded scaler's ``state_dict()`` equals the stored one bit for bit
    (configuration, step count, last scale and ratio, both moment buffers)."""
    spec = CHECKS["DPPO010"]
    skip = _not_applicable("DPPO010", model)
    if skip is not None:
        return skip
    if stored_state is None:
        return spec.skipped("no stored scaler state to compare with")
    live = _scaler(model).state_dict()
    difference = _first_difference(state_fingerprint(stored_state), state_fingerprint(live))
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


@contextmanager
def _restored(model: Any) -> Iterator[None]:
    """Restore, on exit, everything a probe update touches: the parameters (in place, so
    their identity is kept), their gradients, the optimizer's state and hyperparameters, the
    scaler's state and logger, the training mode and the torch RNG."""
    scaler = _scaler(model)
    policy = model.policy
    optimizer = policy.optimizer
    params = list(policy.parameters())
    values = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    state = scaler.state_dict()
    logger = scaler.logger
    training = policy.training
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, values, strict=True):
                param.copy_(value)
        optimizer.load_state_dict(optimizer_state)
        scaler.load_state_dict(state)
        scaler.logger = logger
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        policy.train(training)
        torch.random.set_rng_state(rng)


def _probe_state(state: dict[str, Any]) -> dict[str, Any]:
    """The scaler's state forced into a regime where the factor cannot be 1: past warm-up,
    enabled, damping on (alpha >= 1), statistics (zero mean, unit second moment, beta > 0)
    that make every per-tensor noise ratio large, and a level far below any such ratio."""
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
    return {
        **state,
        "config": config,
        "step_count": 0,
        "level": 1e-12,
        "exp_avg": [torch.zeros_like(t) for t in exp_avg],
        "exp_avg_sq": [torch.ones_like(t) for t in exp_avg],
    }


#: The probe's tolerance, per tensor: ||delta_s - s*delta_1|| <= REL*||delta_1|| + ABS.
PROBE_REL_TOLERANCE = 1e-5
PROBE_ABS_TOLERANCE = 1e-12


def _update_from_origin(
    model: Any,
    params: list[torch.Tensor],
    raw: list[torch.Tensor | None],
    optimizer_state: dict[str, Any],
    scale_of: Callable[[], float],
) -> tuple[list[torch.Tensor], float]:
    """One update of ``model`` along its training path on the gradients ``raw``, from the
    optimizer state ``optimizer_state`` and with the parameters at zero; the parameters after
    it (the step itself, in float64) and the scale used.

    Stepping from the origin makes the parameters after the step *be* the step, free of the
    float32 rounding of ``theta + delta`` (which, at |theta| ~ 1 and a step of ~1e-3, alone
    exceeds the probe's 1e-5 tolerance). Adam's step does not depend on theta.
    """
    optimizer = model.policy.optimizer
    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    with torch.no_grad():
        for param, grad in zip(params, raw, strict=True):
            param.grad = None if grad is None else grad.clone()
            param.zero_()
    scale = scale_of()
    model._optimizer_step(_scaler(model), scale)
    return [p.detach().double().clone() for p in params], scale


def check_scale_reaches_step(model: Any) -> CheckResult:
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
    spec = CHECKS["DPPO011"]
    skip = _not_applicable("DPPO011", model)
    if skip is not None:
        return skip
    scaler = _scaler(model)
    if scaler.parameters is None:
        return spec.failed("the scaler is not linked to any parameter: it watches nothing")
    params = _trainable(model)
    with _restored(model):
        scaler.logger = None
        scaler.load_state_dict(_probe_state(scaler.state_dict()))
        for param in params:
            param.grad = None
        with torch.enable_grad():
            _probe_loss(model).backward()
        raw = [None if p.grad is None else p.grad.detach().clone() for p in params]
        tracked_with_grad = sum(t.grad is not None for t in scaler.parameters)
        optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())
        unit, _ = _update_from_origin(model, params, raw, optimizer_state, lambda: 1.0)
        read: list[torch.Tensor | None] = []

        def scale_of() -> float:
            factor = scaler.compute_scale()
            read.extend(None if p.grad is None else p.grad.detach().clone() for p in params)
            return factor

        scaled, factor = _update_from_origin(model, params, raw, optimizer_state, scale_of)
    with_grad = [i for i, g in enumerate(raw) if g is not None]
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
    touched = [i for i in with_grad if not torch.equal(read[i], raw[i])]  # type: ignore[arg-type]
    if touched:
        return spec.failed(
            f"compute_scale() changed {len(touched)}/{len(with_grad)} of the raw gradients; "
            "the factor belongs in the step size only",
            factor=factor,
            changed=len(touched),
        )
    wrong: list[int] = []
    worst = 0.0
    for i in with_grad:
        error = float(torch.linalg.vector_norm(scaled[i] - factor * unit[i]))
        size = float(torch.linalg.vector_norm(unit[i]))
        worst = max(worst, error / size if size > 0.0 else error)
        if error > PROBE_REL_TOLERANCE * size + PROBE_ABS_TOLERANCE:
            wrong.append(i)
    moved = sum(float(torch.linalg.vector_norm(unit[i])) > 0.0 for i in with_grad)
    if wrong:
        steps = [
            float(torch.linalg.vector_norm(scaled[i])) / float(torch.linalg.vector_norm(unit[i]))
            for i in wrong
            if float(torch.linalg.vector_norm(unit[i])) > 0.0
        ]
        ratio = (
            f"; the step moved by {min(steps):.4g}..{max(steps):.4g} of the unscaled one"
            if (steps)
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


def model_state(model: Any) -> dict[str, Any]:
    """Parameters (and buffers), optimizer state and scaler state, for bit-exact comparison."""
    scaler = _scaler(model)
    return state_fingerprint(
        {
            "policy": model.policy.state_dict(),
            "optimizer": model.policy.optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
        }
    )


def check_round_trip(
    model: Any, env: Any = None, *, trust: bool = False, allow: Any = None
) -> CheckResult:
    """DPPO012: save to a temporary file, load it back with the allow-list loader, and
    compare policy parameters and buffers, optimizer state and scaler state bit for bit.

    :param trust: whether the model was loaded with ``--trust`` (kept for the callers: the
        reload is of this process's own bytes, so it needs neither the allow-list nor trust)
    :param allow: the allow-list the model was loaded with (likewise).
    """
    del trust, allow
    spec = CHECKS["DPPO012"]
    before = model_state(model)
    # The model in hand was loaded once already, through the allow-list (or with --trust), so
    # the bytes it saves pickle only what was accepted then: they are reloaded directly, from
    # memory, without a second scan or a temporary file.
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = type(model).load(buffer, env=env, device="cpu", tensorboard_log=None)
    del buffer
    difference = _first_difference(before, model_state(reloaded))
    if difference is not None:
        return spec.failed(f"the state after save -> load differs at {difference}")
    unchanged = _first_difference(before, model_state(model))
    if unchanged is not None:
        return spec.failed(f"saving changed the model's own state at {unchanged}")
    return spec.passed(
        "parameters, optimizer and scaler state identical after save -> load",
        compared=sorted(before),
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def model_checks(
    model: Any,
    stored_scaler_state: dict[str, Any] | None = None,
    *,
    stored_error: str | None = None,
) -> list[CheckResult]:
    """``DPPO008``-``DPPO011`` on a loaded model (see ``checks.model_checks``).

    :param stored_error: why the stored scaler state could not be decoded; ``DPPO010`` then
        errors with it.
    """

    def statistics() -> CheckResult:
        if stored_error is not None:
            return CHECKS["DPPO010"].errored(f"cannot decode the stored scaler: {stored_error}")
        return check_scaler_statistics(model, stored_scaler_state)

    plan: list[tuple[str, Callable[[], CheckResult]]] = [
        ("DPPO008", lambda: check_scaler_tracks_policy(model)),
        ("DPPO009", lambda: check_optimizer_tracks_policy(model)),
        ("DPPO010", statistics),
        ("DPPO011", lambda: check_scale_reaches_step(model)),
    ]
    return [_timed(CHECKS[check_id], fn) for check_id, fn in plan]
