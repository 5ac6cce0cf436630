"""Run the load checks of untrusted files in child processes, one file per child.

Loading hands the file's tensors and arrays to torch, numpy and SB3. The materialiser
validates what it builds, but a crash in native code must still cost one verdict, never the
batch: each file is checked in its own child, and a child that dies by a signal gives that
file exit 3 with the signal named. A child stopped by the wall-time budget gives exit 2,
naming the budget. Nothing is retried.

Children are forked from a fork server that imported torch once, so a file costs a fork, not
an interpreter start and a torch import.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

from dppo_ckpt.checkpoint.results import FileReport

__all__ = [
    "ChildOutcome",
    "crash_report",
    "prestart",
    "probe_load",
    "run_isolated",
    "run_many_isolated",
]

DEFAULT_TIMEOUT: Final = 120.0
# torch imports its compiler stack (torch._dynamo, about a second) on the first call of
# Optimizer.load_state_dict, which every SB3 load makes: once in the server, not once per file.
_PRELOAD: Final = [
    "torch",
    "torch._dynamo",
    "stable_baselines3",
    "dppo_ckpt.ppo",
    "dppo_ckpt.checkpoint.checks",
]
_context: Any = None


def _fork_server() -> Any:
    """The fork-server context, with torch preloaded (started on first use)."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _context = context
    return _context


def prestart() -> None:
    """Start the fork server now, without waiting for it: its torch import then overlaps
    whatever the caller does before its first child (parsing the command line, reading its
    configuration). A server that is never used exits with the caller."""
    import multiprocessing.forkserver

    _fork_server()
    # Only a head start: a server that cannot start now is started, or fails with its own
    # one-line reason, when the first child is needed.
    with contextlib.suppress(Exception):
        multiprocessing.forkserver.ensure_running()


@dataclass(frozen=True)
class ChildOutcome:
    """How a child ended: its return value, or why there is none.

    :param value: what the function returned (when ``ok``).
    :param signal_name: the signal that killed the child (``"SIGSEGV"``), or None.
    :param timed_out: the child ran past its deadline and was killed.
    :param error: a one-line description when the child failed in another way.
    """

    value: Any = None
    signal_name: str | None = None
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.signal_name is None and not self.timed_out and self.error is None


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        value = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        conn.send(("ok", value))
    finally:
        conn.close()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class _Running:
    """One child: its process, the parent's end of its pipe and its deadline."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> None:
        context = _fork_server()
        self.conn, child_end = context.Pipe(duplex=False)
        self.process = context.Process(target=_child, args=(child_end, fn, args), daemon=True)
        self.process.start()
        child_end.close()
        self.deadline = time.monotonic() + timeout
        self.message: tuple[str, Any] | None = None

    def handles(self) -> list[Any]:
        """What to wait on for news of this child: its pipe, until a message came, and its
        exit."""
        if self.message is None:
            return [self.conn, self.process.sentinel]
        return [self.process.sentinel]

    def poll(self) -> ChildOutcome | None:
        """The outcome once the child has ended (or overrun its deadline), else None."""
        if self.message is None and self.conn.poll():
            try:
                self.message = self.conn.recv()
            except (EOFError, OSError):
                self.message = ("eof", None)
        if self.process.is_alive():
            if time.monotonic() <= self.deadline:
                return None
            self.process.kill()
            self.process.join()
            self.conn.close()
            return ChildOutcome(timed_out=True)
        self.process.join()
        if self.message is None and self.conn.poll():
            try:
                self.message = self.conn.recv()
            except (EOFError, OSError):
                self.message = None
        self.conn.close()
        code = self.process.exitcode or 0
        if code < 0:
            return ChildOutcome(signal_name=_signal_name(code))
        if self.message is None or self.message[0] == "eof":
            return ChildOutcome(error=f"the check process exited with code {code} and no result")
        kind, value = self.message
        return ChildOutcome(value=value) if kind == "ok" else ChildOutcome(error=str(value))


def run_many_isolated(
    fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, jobs: int, timeout: float
) -> list[ChildOutcome]:
    """Call ``fn(*args)`` for every ``args`` in its own child, ``jobs`` at a time.

    :return: the outcomes, in the order of ``calls``.
    """
    outcomes: list[ChildOutcome | None] = [None] * len(calls)
    pending = list(enumerate(calls))[::-1]
    running: dict[int, _Running] = {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            index, args = pending.pop()
            running[index] = _Running(fn, args, timeout)
        for index, child in list(running.items()):
            outcome = child.poll()
            if outcome is not None:
                outcomes[index] = outcome
                del running[index]
        if running:
            # Woken by a result or an exit at once; the timeout only paces the deadlines.
            waited = [handle for child in running.values() for handle in child.handles()]
            multiprocessing.connection.wait(waited, timeout=0.05)
    return [outcome for outcome in outcomes if outcome is not None]


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float) -> ChildOutcome:
    """Call ``fn(*args)`` in a child process; see :func:`run_many_isolated`."""
    return run_many_isolated(fn, [args], jobs=1, timeout=timeout)[0]


def crash_report(path: str, outcome: ChildOutcome, timeout: float) -> FileReport:
    """The report of a file whose check child did not return a report."""
    from dppo_ckpt.checkpoint.checks import CHECKS

    if outcome.timed_out:
        reason = (
            f"budget timeout exceeded: checking the file took longer than {timeout:g} s "
            "(raise --timeout for a file you know to be large)"
        )
        return FileReport.from_results(path, [CHECKS["DPPO001"].failed(reason)], unusable=True)
    if outcome.signal_name is not None:
        reason = (
            f"the load check process died by {outcome.signal_name} while loading untrusted "
            "data: refused as unsafe"
        )
        return FileReport.from_results(path, [CHECKS["DPPO007"].failed(reason)], unsafe=True)
    return FileReport.from_results(
        path, [CHECKS["DPPO001"].errored(f"the check process failed: {outcome.error}")]
    )


def _probe_load(path: str, trust: bool, allow: Any) -> None:
    from dppo_ckpt.checkpoint.safe_pickle import ALLOWED_GLOBALS, safe_load

    # Errors are the caller's to report with its own wording, from its own load; the child
    # only shows that loading this file does not bring the process down.
    with contextlib.suppress(Exception):
        safe_load(path, trust=trust, allow=allow or ALLOWED_GLOBALS)


def probe_load(
    path: str, *, trust: bool, allow: Any = None, timeout: float = DEFAULT_TIMEOUT
) -> tuple[int, str] | None:
    """Load ``path`` once in a child before the caller loads it in its own process.

    ``train --resume`` and ``cycle MODEL`` go on to train the model they load, so they load
    it themselves; this probe makes a crash or a hang cost the child, not the caller.

    :param allow: the allow-list the caller loads with (built-in plus the user's entries).
    :return: ``(exit code, one-line reason)`` when the child died or overran, else None.
    """
    outcome = run_isolated(_probe_load, path, trust, allow and dict(allow), timeout=timeout)
    if outcome.signal_name is not None:
        return 3, (
            f"{path}: loading it killed the check process by {outcome.signal_name}: "
            "refused as unsafe"
        )
    if outcome.timed_out:
        return 2, f"{path}: budget timeout exceeded: loading took longer than {timeout:g} s"
    return None
