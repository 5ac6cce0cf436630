"""Adam's step on flat buffers, bit for bit the step of torch's multi-tensor Adam.

On CPU, every ``torch._foreach_*`` op of Adam's multi-tensor implementation runs one kernel
per parameter tensor, so a step over the dozen small tensors of an MLP policy is some sixty
kernel calls. Here the moments ``exp_avg`` and ``exp_avg_sq`` live in two flat buffers, and
the optimizer's state holds views of them shaped like the parameters: the element-wise
updates of the moments and of the denominator are one kernel each over all tensors. Only the
step counters and the final ``param += step_size * exp_avg / denom`` still go tensor by
tensor (the parameters are the policy's own tensors), through the very foreach calls torch
makes.

Same bits: every operation is element-wise and gets the very scalars torch computes
(``1 - beta1``, ``beta2``, ``1 - beta2``, the bias corrections from each tensor's own step
counter, ``-lr / bc1``, ``sqrt(bc2)``, ``eps``), in torch's order, so each element is
computed by the same kernel from the same operands (``tests/test_train_speed.py`` compares
the parameters and the state with torch's step). The flat path is taken only for the
configuration SB3 builds (one plain Adam param group, no weight decay, no AMSGrad, no
maximize, a float learning rate, float32 or float64 tensors of one dtype on one device, every
parameter with a gradient and an initialised state, no step hooks); anything else is
``optimizer.step()``.

Checkpoints: ``optimizer.state_dict()`` returns the moments as tensors of their own (cloned
from the views, by a state-dict hook), so a saved optimizer is byte for byte what torch
saves, and no one sees the flat buffers. A loaded state (new tensors) is flattened again at
the next step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.optim import optimizer as _optimizer_module

__all__ = ["flat_adam"]


class _Flat:
    """The flat moments of one optimizer and the views its state holds."""

    def __init__(self, params: list[torch.Tensor], state: dict[Any, dict[str, Any]]) -> None:
        self.params = params
        with torch.no_grad():
            self.exp_avg = _flatten_dense_tensors([state[p]["exp_avg"] for p in params])
            self.exp_avg_sq = _flatten_dense_tensors([state[p]["exp_avg_sq"] for p in params])
            self.denom = torch.empty_like(self.exp_avg_sq)
            # The gradients' flat copy, made anew every step into the same memory: a buffer
            # of this size would otherwise be mapped afresh (and page-faulted) each time.
            self.gradient = torch.empty_like(self.exp_avg)
        self.exp_avgs = list(_unflatten_dense_tensors(self.exp_avg, params))
        self.exp_avg_sqs = list(_unflatten_dense_tensors(self.exp_avg_sq, params))
        self.denoms = list(_unflatten_dense_tensors(self.denom, params))
        self.gradients = list(_unflatten_dense_tensors(self.gradient, params))
        for param, exp_avg, exp_avg_sq in zip(
            params, self.exp_avgs, self.exp_avg_sqs, strict=True
        ):
            state[param]["exp_avg"] = exp_avg
            state[param]["exp_avg_sq"] = exp_avg_sq
        self.steps = [state[p]["step"] for p in params]

    def current(self, params: list[torch.Tensor], state: dict[Any, dict[str, Any]]) -> bool:
        """Whether the optimizer's state still holds these views for these parameters."""
        if len(params) != len(self.params):
            return False
        for param, mine, exp_avg, exp_avg_sq, step in zip(
            params, self.params, self.exp_avgs, self.exp_avg_sqs, self.steps, strict=True
        ):
            entry = state.get(param)
            if (
                param is not mine
                or entry is None
                or entry.get("exp_avg") is not exp_avg
                or entry.get("exp_avg_sq") is not exp_avg_sq
                or entry.get("step") is not step
            ):
                return False
        return True


# One entry per optimizer, dropped with it; never pickled (optimizers pickle their state only).
_FLAT: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Flat] = weakref.WeakKeyDictionary()


def _own_tensors(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """State-dict hook: the moments as tensors of their own, as torch's state dict has them
    (a view would save the whole flat buffer)."""
    packed = {}
    for index, entry in state_dict["state"].items():
        entry = dict(entry)  # the state's own dict otherwise
        for key in ("exp_avg", "exp_avg_sq"):
            value = entry.get(key)
            if (
                isinstance(value, torch.Tensor)
                and value.untyped_storage().nbytes() != value.numel() * value.element_size()
            ):
                entry[key] = value.clone()
        packed[index] = entry
    return {**state_dict, "state": packed}


def _plain_group(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The one param group of a plain Adam in the configuration the flat step supports."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    lr, (beta1, beta2) = group["lr"], group["betas"]
    if (
        group.get("foreach") not in (None, True)
        or group.get("fused")
        or group.get("differentiable")
        or group.get("capturable")
        or group.get("amsgrad")
        or group.get("maximize")
        or group.get("decoupled_weight_decay")
        or group.get("weight_decay") != 0
        or not all(type(x) is float for x in (lr, beta1, beta2, group["eps"]))
    ):
        return None
    return group


def _hooks_registered(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any step hook would run around ``optimizer.step()``."""
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or _optimizer_module._global_optimizer_pre_hooks
        or _optimizer_module._global_optimizer_post_hooks
    )


def _flat_for(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> _Flat | None:
    """The flat moments of ``optimizer`` over ``params``, made when needed; None when the
    state cannot be flat (uninitialised, several dtypes or devices, non-float tensors)."""
    state = optimizer.state
    flat = _FLAT.get(optimizer)
    if flat is not None and flat.current(params, state):
        return flat
    first = params[0]
    for param in params:
        entry = state.get(param)
        if not entry or not all(key in entry for key in ("step", "exp_avg", "exp_avg_sq")):
            return None
        step = entry["step"]
        if not (isinstance(step, torch.Tensor) and step.device.type == "cpu" and step.dim() == 0):
            return None
        for tensor in (param, entry["exp_avg"], entry["exp_avg_sq"]):
            if (
                tensor.dtype != first.dtype
                or tensor.device != first.device
                or tensor.layout != torch.strided
                or tensor.shape != param.shape
                # Half precision: a flat mul_ by beta2 rounds unlike torch's foreach mul.
                or tensor.dtype not in (torch.float32, torch.float64)
            ):
                return None
    if optimizer not in _FLAT:  # its first flat state: from now on it may hold views
        optimizer.register_state_dict_post_hook(_own_tensors)
    flat = _FLAT[optimizer] = _Flat(params, state)
    return flat


def _step(optimizer: torch.optim.Optimizer) -> bool:
    """One Adam step on flat buffers, as torch's multi-tensor step; False (and nothing done)
    when this optimizer's configuration or state is not one the flat step supports."""
    group = _plain_group(optimizer)
    if group is None or _hooks_registered(optimizer):
        return False
    params = group["params"]
    if not params or any(param.grad is None for param in params):
        return False
    grads = [param.grad for param in params]
    first = params[0]
    if any(
        grad.dtype != first.dtype
        or grad.device != first.device
        or grad.layout != torch.strided
        or grad.is_complex()
        for grad in grads
    ):
        return False
    flat = _flat_for(optimizer, params)
    if flat is None:
        return False
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    with torch.no_grad():
        # torch's own increment of the counters (a wrapped 1.0, alpha=1.0: the same overload).
        torch._foreach_add_(flat.steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        torch._foreach_copy_(flat.gradients, grads)
        gradient = flat.gradient
        flat.exp_avg.lerp_(gradient, 1 - beta1)
        flat.exp_avg_sq.mul_(beta2)
        flat.exp_avg_sq.addcmul_(gradient, gradient, value=1 - beta2)
        counts = [step.item() for step in flat.steps]
        torch.sqrt(flat.exp_avg_sq, out=flat.denom)
        if any(count != counts[0] for count in counts):
            # Counters that diverged (a parameter once stepped without a gradient): the
            # bias corrections differ per tensor, which torch's per-tensor scalars handle.
            bias_corrections2 = [(1 - beta2**count) ** 0.5 for count in counts]
            torch._foreach_div_(flat.denoms, bias_corrections2)
        else:
            flat.denom.div_((1 - beta2 ** counts[0]) ** 0.5)
        flat.denom.add_(eps)
        step_sizes = [(lr / (1 - beta1**count)) * -1 for count in counts]
        torch._foreach_addcdiv_(params, flat.exp_avgs, flat.denoms, step_sizes)
    return True


@contextlib.contextmanager
def flat_adam(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, ``optimizer.step()`` of a plain Adam steps on flat buffers (see the
    module docstring); every other configuration steps as ``optimizer.step()`` does."""
    original = optimizer.step
    shadowed = "step" in vars(optimizer)

    def step(closure: Any = None) -> Any:
        if closure is None and _step(optimizer):
            return None
        return original(closure)

    optimizer.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        if shadowed:
            optimizer.step = original  # type: ignore[method-assign]
        else:
            del optimizer.step
