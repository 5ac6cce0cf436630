"""The optimizer step of DistributionalPPO with fewer Python calls and the very same bits.

Gradient clipping, :func:`clip_grad_norm`: ``torch.nn.utils.clip_grad_norm_``'s own kernels
(``_foreach_norm``, the norm of the norms, the clamped coefficient, ``_foreach_mul_``) in its
own order, without its per-call grouping and dispatch layers, when every gradient is a plain
tensor on one device with one dtype; otherwise torch's function itself.

Adam, :func:`foreach_kernels`: steps through torch's multi-tensor ("foreach") implementation.

SB3 builds Adam without choosing an implementation (``foreach=None``), and torch then takes
the per-tensor Python loop on CPU: a dozen small torch calls for every parameter tensor of the
policy, on every minibatch. Adam's foreach implementation issues one call per operation for
all tensors. On CPU, torch has no fused foreach kernels: each ``torch._foreach_*`` op runs the
very per-tensor kernel of the loop, with the same scalars (step size, bias corrections, eps)
computed the same way, so the parameters and the optimizer state come out bit for bit as they
would (``tests/test_train_speed.py`` compares them). The choice is made for the step only and
undone after it, so a saved optimizer's configuration stays SB3's and checkpoints do not
change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils._foreach_utils import _has_foreach_support

__all__ = ["clip_grad_norm", "foreach_kernels"]

# Exactly these classes: a subclass may override the step, and other optimizers' foreach
# implementations were not checked to compute in the same order.
_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def _unchosen_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The param groups of a plain Adam/AdamW that leave the implementation to torch."""
    if type(optimizer) not in _ADAM_CLASSES:
        return []
    return [
        group
        for group in optimizer.param_groups
        if group.get("foreach", False) is None
        and not group.get("fused")
        and not group.get("differentiable")
        and not group.get("capturable")
        and not isinstance(group.get("lr"), torch.Tensor)
    ]


@contextlib.contextmanager
def foreach_kernels(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, ``optimizer.step()`` of a plain Adam/AdamW uses the foreach path.

    Only groups whose ``foreach`` is None (torch's choice) change, and they get None back
    afterwards, also when the step raises. Any other optimizer is left alone.
    """
    groups = _unchosen_groups(optimizer)
    for group in groups:
        group["foreach"] = True
    try:
        yield
    finally:
        for group in groups:
            group["foreach"] = None


def clip_grad_norm(parameters: Sequence[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` (L2 norm), bit for bit.

    Scales the gradients in place by ``min(max_norm / (total_norm + 1e-6), 1)``, where
    ``total_norm`` is the L2 norm of the per-tensor L2 norms, computed as torch computes it.
    """
    grads = [param.grad for param in parameters if param.grad is not None]
    if not grads:
        return
    device, dtype = grads[0].device, grads[0].dtype
    if not (
        all(grad.device == device and grad.dtype == dtype for grad in grads)
        and _has_foreach_support(grads, device)
    ):
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    with torch.no_grad():
        total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        clip_coef = float(max_norm) / (total_norm + 1e-6)
        torch._foreach_mul_(grads, torch.clamp(clip_coef, max=1.0))
