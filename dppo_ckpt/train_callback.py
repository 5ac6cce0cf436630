"""The callback of ``dppo-ckpt train``: checkpoints at rollout boundaries, progress, Ctrl-C.

Imported only once the numerics are chosen: it loads stable-baselines3 (and so torch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stable_baselines3.common.callbacks import BaseCallback

from dppo_ckpt.rng import capture_rng_state

if TYPE_CHECKING:
    from dppo_ckpt.ppo import DistributionalPPO
    from dppo_ckpt.train_progress import RunProgress

__all__ = ["TrainingCallback", "mean_return", "scale_text"]

# How often the rollout phase redraws the line.
_REFRESH_S = 0.2


class _Writer(Protocol):
    def write(self, model: DistributionalPPO, rng_state: dict[str, Any] | None) -> Path: ...


class _Interrupt(Protocol):
    @property
    def requested(self) -> bool: ...

    @property
    def immediate(self) -> bool: ...


def mean_return(model: DistributionalPPO) -> float | None:
    """The mean return of the episodes in the model's episode buffer, if any ended yet."""
    buffer = model.ep_info_buffer
    if not buffer:
        return None
    return float(sum(info["r"] for info in buffer) / len(buffer))


def scale_text(model: DistributionalPPO) -> str:
    """The scaler's current factor, for the progress line."""
    scaler = model._variance_gradient_scaler
    return "off" if scaler is None else f"{scaler.scaling_factor:.3f}"


class TrainingCallback(BaseCallback):
    """Saves at rollout boundaries, feeds the progress line and honours Ctrl-C.

    A rollout boundary is the start of a rollout: the previous update is complete and nothing
    of the next iteration has happened yet, except that gSDE draws fresh exploration noise just
    before (``policy.reset_noise``). The generators are therefore recorded right before that
    draw and stored in the checkpoint instead of the current ones, so that a resumed run draws
    the same noise again.

    :param run: writes a checkpoint of the model (and its environments) and lists it
    :param every: checkpoint interval in steps, taken at the next rollout boundary
    :param progress: the progress line; its ``minibatch`` becomes the model's update hook
    :param interrupt: the Ctrl-C count: the first stops at the next boundary, the second at
        the next step
    :param on_checkpoint: called with each checkpoint written (verifies it)
    """

    def __init__(
        self,
        run: _Writer,
        every: int,
        progress: RunProgress,
        interrupt: _Interrupt,
        on_checkpoint: Callable[[Path, DistributionalPPO], None],
    ) -> None:
        super().__init__(verbose=0)
        self.run = run
        self.every = every
        self.progress = progress
        self.interrupt = interrupt
        self.on_checkpoint = on_checkpoint
        self.last_saved = -1
        self.halt = False
        self._rng_before_noise: dict[str, Any] | None = None
        self._last_refresh = 0.0

    def _on_training_start(self) -> None:
        self.last_saved = self.model.num_timesteps
        policy = self.model.policy
        reset_noise = policy.reset_noise

        def recording_reset_noise(*args: Any, **kwargs: Any) -> Any:
            self._rng_before_noise = capture_rng_state(self.model.action_space)
            return reset_noise(*args, **kwargs)

        # Instance attributes: the policy is saved as a state dict, and the model leaves its
        # progress hook out of every save.
        policy.reset_noise = recording_reset_noise
        self.model.update_progress = self.progress.minibatch

    def _on_training_end(self) -> None:
        self.detach()
        self._refresh(force=True)

    def detach(self) -> None:
        """Take the recording ``reset_noise`` and the progress hook off the model again."""
        model = self.__dict__.get("model")  # unset when learn() failed before starting
        if model is None:
            return
        model.policy.__dict__.pop("reset_noise", None)
        model.__dict__.pop("update_progress", None)

    def _on_rollout_start(self) -> None:
        model = self.model
        due = model.num_timesteps - self.last_saved >= self.every
        if (due or self.interrupt.requested) and model.num_timesteps != self.last_saved:
            rng = self._rng_before_noise if model.use_sde else None
            self.save(rng)
        if self.interrupt.requested:
            self.halt = True
        self._refresh(force=True)

    def _on_rollout_end(self) -> None:
        model = self.model
        batches = math.ceil(model.n_steps * model.n_envs / model.batch_size)
        self.progress.begin_update(model.num_timesteps, model.n_epochs, batches)

    def save(self, rng_state: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint of the model now (with ``rng_state`` as its generators)."""
        path = self.run.write(self.model, rng_state)
        self.last_saved = self.model.num_timesteps
        self.on_checkpoint(path, self.model)
        return path

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < _REFRESH_S:
            return
        self._last_refresh = now
        model = self.model
        elapsed = max(time.time_ns() - model.start_time, 1) / 1e9
        fps = (model.num_timesteps - model._num_timesteps_at_start) / elapsed
        stats = (fps, mean_return(model), scale_text(model))
        if self.halt:
            # After a first Ctrl-C the run takes one more step that the final checkpoint
            # rightly lacks; the line shows where the run stopped.
            self.progress.stopping(self.last_saved, *stats)
        else:
            self.progress.rollout(model.num_timesteps, *stats)

    def _on_step(self) -> bool:
        self._refresh()
        return not (self.halt or self.interrupt.immediate)
