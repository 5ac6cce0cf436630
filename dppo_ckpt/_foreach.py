"""Adam steps through torch's multi-tensor ("foreach") implementation, same bits, fewer calls.

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
from collections.abc import Iterator

import torch

__all__ = ["foreach_kernels"]

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
