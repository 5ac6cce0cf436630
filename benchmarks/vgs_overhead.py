"""What the Variance Gradient Scaler costs per minibatch update, next to Adam.

Run from the repository root::

    python benchmarks/vgs_overhead.py [--reps 300]

An MLP of about 1M parameters (256-1024-640-256-1, tanh) on CPU with one thread, minibatch 64.
In the same run, with the variants interleaved (each repetition runs every variant once, in a
rotating order, so drift in machine load hits all alike), it times:

- ``compute_scale()`` alone (the statistics and the factor, past warm-up);
- ``Adam.step()`` alone, with ``foreach=True`` (the multi-tensor implementation), and also with
  the CPU default, which is the single-tensor loop;
- the whole minibatch update (zero_grad, forward, backward, [scaler], ``clip_grad_norm_``,
  Adam step) without and with the scaler.

It prints the median time of each (with its quartiles) and two ratios: scaler / foreach Adam
step (the scaler should cost no more than the optimizer step it precedes: target <= 1.0) and
update with / without the scaler.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dppo_ckpt.vgs import VarianceGradientScaler

SIZES = (256, 1024, 640, 256, 1)
BATCH = 64


def _mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=300, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed repetitions first")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _mlp()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    inputs, targets = torch.randn(BATCH, SIZES[0]), torch.randn(BATCH, SIZES[-1])
    adam = torch.optim.Adam(params, lr=1e-5, foreach=True)
    adam_default = torch.optim.Adam(params, lr=1e-5)  # CPU default: single-tensor loop
    scaler = VarianceGradientScaler(params, warmup_steps=0)

    def backward() -> None:
        adam.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(inputs), targets).backward()

    backward()
    saved_grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]

    def restore_grads() -> None:
        # Adam and the clipping act on the gradients in place; restoring them keeps every
        # repetition on the same, normal-range values.
        torch._foreach_copy_([p.grad for p in params], saved_grads)  # type: ignore[misc]

    def update(with_scaler: bool) -> None:
        backward()
        scale = scaler.compute_scale() if with_scaler else 1.0
        nn.utils.clip_grad_norm_(params, 0.5)
        if with_scaler:
            scaler.step(adam, scale)
        else:
            adam.step()

    # name -> (set-up outside the timer, timed work)
    variants: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "scaler.compute_scale()": (restore_grads, scaler.compute_scale),
        "Adam.step() foreach": (restore_grads, adam.step),
        "Adam.step() CPU default": (restore_grads, adam_default.step),
        "update without scaler": (lambda: None, lambda: update(False)),
        "update with scaler": (lambda: None, lambda: update(True)),
    }
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()
    try:
        for rep in range(args.warmup + args.reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                prepare, work = variants[name]
                prepare()
                start = time.perf_counter()
                work()
                elapsed = time.perf_counter() - start
                if rep >= args.warmup:
                    times[name].append(elapsed)
    finally:
        gc.enable()

    median = {name: statistics.median(values) for name, values in times.items()}
    quartiles = {name: statistics.quantiles(values, n=4) for name, values in times.items()}
    print(
        f"VGS overhead: MLP {'-'.join(map(str, SIZES))} ({n_params:,} parameters in "
        f"{len(params)} tensors), minibatch {BATCH}, CPU, {torch.get_num_threads()} thread, "
        f"torch {torch.__version__}; median of {args.reps} interleaved repetitions"
    )
    for name in names:
        low, _, high = quartiles[name]
        print(
            f"  {name:28s} {median[name] * 1e3:8.3f} ms"
            f"   (quartiles {low * 1e3:.3f} .. {high * 1e3:.3f})"
        )
    scaler_ratio = median["scaler.compute_scale()"] / median["Adam.step() foreach"]
    update_ratio = median["update with scaler"] / median["update without scaler"]
    print(f"  {'scaler / Adam step (foreach)':28s} {scaler_ratio:8.3f}   (target <= 1.0)")
    print(f"  {'update with / without scaler':28s} {update_ratio:8.3f}")


if __name__ == "__main__":
    main()
