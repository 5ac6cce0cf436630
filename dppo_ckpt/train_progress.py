"""The progress line of ``dppo-ckpt train``: the run's phase, within 80 columns.

A run alternates two phases, and the line shows which one it is in::

    rollout ━━━━━━━━━━  8,192/102,400  1,234 fps  ret -812.3  vgs 0.912  0:01:10
    update  ━━━━━━━━━━  8,192/102,400  epoch 3/10  minibatch 12/64       0:01:10

The update phase is fed by ``DistributionalPPO.update_progress`` after every minibatch, so the
line moves while the model trains instead of freezing on the last rollout step. A Ctrl-C is
acknowledged by a watcher thread within a tenth of a second, whatever the main thread is
doing: the signal handler itself must not print (it may run while the console holds its lock).
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = [
    "ROLLOUT",
    "STOPPING",
    "UPDATE",
    "RunProgress",
    "acknowledgement",
    "rounded_total",
    "rounding_note",
]

ROLLOUT = "rollout"
UPDATE = "update"
STOPPING = "stopping"

# The line is laid out for 80 columns: phase, bar, one text column, time remaining.
_BAR_WIDTH = 10
# How often the update phase redraws, and how often the watcher looks for a Ctrl-C.
_UPDATE_REFRESH_S = 0.1
_WATCH_S = 0.05


# The columns around the text: the phase (8) and the time remaining (8, up to 99 hours), the
# bar, and the spaces between the four columns.
_FIXED_WIDTH = 8 + _BAR_WIDTH + 8 + 3


def _fit(parts: list[str], width: int) -> str:
    """``parts`` on one line of at most ``width`` characters: two spaces apart, else one, else
    the last parts left out (the first, the steps, always stays)."""
    for separator in ("  ", " "):
        text = separator.join(parts)
        if len(text) <= width:
            return text
    while len(parts) > 1 and len(" ".join(parts)) > width:
        parts = parts[:-1]
    return " ".join(parts)


class _Counter(Protocol):
    count: int


def acknowledgement(count: int, phase: str) -> str | None:
    """What the run says on the ``count``-th Ctrl-C during ``phase``.

    The first Ctrl-C stops at the next rollout boundary, the second at the next environment
    step (which, during an update, comes after it), the third aborts at once.
    """
    if count == 1 and phase == UPDATE:
        return (
            "Interrupt received: stopping at the end of this update, with a final "
            "checkpoint. Ctrl-C twice more aborts at once."
        )
    if count == 1:
        return (
            "Interrupt received: stopping after this rollout and its update, with a final "
            "checkpoint. Ctrl-C again to stop at the next step."
        )
    if count == 2 and phase == UPDATE:
        return (
            "Interrupt received again: an update cannot stop midway, so the run stops when "
            "it ends. Ctrl-C once more aborts at once."
        )
    if count == 2:
        return "Interrupt received again: stopping at the next step. Ctrl-C once more aborts."
    return None


def rounding_note(requested: int, total: int, start: int, n_steps: int, n_envs: int) -> str | None:
    """The line saying that the run trains more steps than asked for, if it does.

    ``learn`` collects whole rollouts of ``n_steps`` steps in each of ``n_envs``
    environments, so a run from ``start`` ends on the first rollout boundary at or past
    ``requested`` (a resumed run says where it starts on a line of its own).
    """
    if total == requested:
        return None
    envs = f"{n_envs} env{'s' if n_envs != 1 else ''}"
    rollouts = f"rollouts of {n_steps:,} steps x {envs}"
    return f"note: {requested:,} steps round up to {total:,} ({rollouts})"


def rounded_total(requested: int, start: int, rollout_size: int) -> int:
    """The step at which ``learn`` stops when asked for ``requested`` steps from ``start``."""
    remaining = max(requested - start, 0)
    return start + math.ceil(remaining / rollout_size) * rollout_size


def _progress(console: Console) -> Progress:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.fields[phase]:<8}"),
        BarColumn(bar_width=_BAR_WIDTH),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
        console=console,
    )


def _return_text(mean_return: float | None) -> str:
    if mean_return is None:
        return "-"
    # Four significant places at most: returns in the thousands would crowd the line.
    return f"{mean_return:,.0f}" if abs(mean_return) >= 100 else f"{mean_return:.1f}"


class RunProgress:
    """The progress line of one ``learn()`` call, and the acknowledgement of Ctrl-C.

    :param console: where the line is drawn
    :param total: the step the run ends at (the requested total rounded up to rollouts)
    :param completed: the step it starts at
    :param interrupt: counts the Ctrl-Cs (its ``count`` is read by the watcher thread)
    :param scale: the VGS scale to show before the first rollout
    """

    def __init__(
        self, console: Console, total: int, completed: int, interrupt: _Counter, scale: str
    ) -> None:
        self.console = console
        self.interrupt = interrupt
        self.phase = ROLLOUT
        self._total = total
        self._completed = completed
        self._stats = {"fps": "-", "ret": "-", "scale": scale}
        self._epochs = self._batches = 0
        self._epoch = self._batch = 0
        self._last_draw = 0.0
        self._progress = _progress(console)
        # Added now, drawn from __enter__ on: the line can be rendered before it goes live.
        self._task: TaskID = self._progress.add_task(
            ROLLOUT, total=total, completed=completed, phase=ROLLOUT, detail=self._detail()
        )
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._acknowledged = 0
        self._lock = threading.Lock()

    def __enter__(self) -> RunProgress:
        self._progress.__enter__()
        self._watcher = threading.Thread(target=self._watch, name="ctrl-c-watcher", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self._progress.__exit__(None, None, None)

    # -- what the training loop reports ------------------------------------------------

    def rollout(
        self, completed: int, fps: float, mean_return: float | None, scale: str
    ) -> None:
        """The rollout phase at step ``completed``, with the statistics so far."""
        if self.phase == UPDATE:
            self.phase = ROLLOUT
        self._show(completed, fps, mean_return, scale)

    def begin_update(self, completed: int, epochs: int, batches: int) -> None:
        """The update phase begins: ``epochs`` passes of ``batches`` minibatches each."""
        if self.phase != STOPPING:
            self.phase = UPDATE
        self._completed = completed
        self._epochs, self._batches = epochs, batches
        self._epoch, self._batch = 0, 0
        self._draw()

    def minibatch(self, epoch: int) -> None:
        """One minibatch of epoch ``epoch`` (from 0) was trained on.

        Called once per minibatch from ``DistributionalPPO.train``: it only counts, and draws
        at most ten times a second.
        """
        if epoch + 1 != self._epoch:
            self._epoch, self._batch = epoch + 1, 0
        self._batch += 1
        now = time.monotonic()
        if now - self._last_draw >= _UPDATE_REFRESH_S:
            self._last_draw = now
            self._draw()

    def stopping(
        self, completed: int, fps: float, mean_return: float | None, scale: str
    ) -> None:
        """The run stops at step ``completed``, where it saved its last checkpoint."""
        self.phase = STOPPING
        self._show(completed, fps, mean_return, scale)

    def _show(self, completed: int, fps: float, mean_return: float | None, scale: str) -> None:
        self._completed = completed
        self._stats = {"fps": f"{fps:,.0f}", "ret": _return_text(mean_return), "scale": scale}
        self._draw()

    # -- drawing ---------------------------------------------------------------------------

    def _detail(self) -> str:
        steps = f"{self._completed:,}/{self._total:,}"
        if self.phase == UPDATE:
            parts = [
                steps,
                f"epoch {self._epoch}/{self._epochs}",
                f"minibatch {self._batch}/{self._batches}",
            ]
        else:
            stats = self._stats
            parts = [steps, f"{stats['fps']} fps", f"ret {stats['ret']}", f"vgs {stats['scale']}"]
        return _fit(parts, self.console.width - _FIXED_WIDTH)

    def _draw(self) -> None:
        self._progress.update(
            self._task, completed=self._completed, phase=self.phase, detail=self._detail()
        )

    # -- Ctrl-C ----------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_S):
            self.acknowledge()

    def acknowledge(self) -> None:
        """Say what a new Ctrl-C does, once per Ctrl-C (from the watcher thread)."""
        with self._lock:
            count = self.interrupt.count
            if count <= self._acknowledged:
                return
            self._acknowledged = count
        message = acknowledgement(count, self.phase)
        if message is not None:
            # Wrapped at words: the line must fit the terminal like the bar above it.
            self.console.print(message, soft_wrap=False, highlight=False)
