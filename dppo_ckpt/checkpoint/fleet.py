"""``verify --ray``: the checks of many files fanned out as Ray tasks, on one machine or a cluster.

The reports are those of local ``verify``, file for file, in input order: each task runs
:func:`~dppo_ckpt.checkpoint.checks.run_checks` on one file, so the formats and the exit codes
do not change. What Ray changes is only where the work runs:

- every file gets its static checks (code-free, no torch) before any file is loaded, so a
  batch learns of its hostile files before anything of the batch reaches torch; a file they
  refuse as unsafe is never handed to a reader again (its report is local ``verify``'s, whose
  load checks skip a refused file);
- the load checks of a file run in a child of its Ray worker, as local ``verify`` runs them in
  a child of its own (:mod:`~dppo_ckpt.checkpoint.isolation`): a crash or an overrun is that
  file's verdict, worded the same way;
- a Ray worker that dies under a file, or that Ray kills for memory, is that file's result,
  exit 3, and is never retried: retrying a file that kills its reader only kills another one;
- any other failure of Ray under a file is that file's error (``DPPO001``), never a
  traceback, and the other files keep their reports;
- a lost node is not the file's doing: its files are retried once, on the nodes still alive,
  and a note says so.

Paths are sent, not bytes: on a cluster every node must see the files at the same path (a
shared file system). Ray is imported only here and only when ``--ray`` is given; without it the
command says which extra to install.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dppo_ckpt.checkpoint.budgets import Budgets
from dppo_ckpt.checkpoint.results import FileReport

__all__ = [
    "RAY_EXTRA_HINT",
    "FleetResult",
    "RayUnavailableError",
    "connect",
    "ray_available",
    "verify_on_ray",
]

#: How to get Ray, in every message that needs it.
RAY_EXTRA_HINT = "pip install 'dppo-ckpt[ray]'"


class RayUnavailableError(Exception):
    """Ray is not installed, or the cluster cannot be reached (exit 2)."""


def ray_available() -> bool:
    """Whether ``import ray`` can work, without importing it."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ``sys.modules["ray"] = None`` and the like
        return False


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        message = f"this needs Ray, which is not installed: {RAY_EXTRA_HINT}"
        raise RayUnavailableError(message) from None
    return ray


def _worker_environment() -> dict[str, str]:
    """Environment variables every Ray worker of this job starts with.

    The numerics mode must be set before a worker imports numpy, which Ray itself does, so it
    travels in the job's runtime environment rather than being applied inside a task.
    """
    from dppo_ckpt import numerics

    variables = {numerics.NUMERICS_ENV: numerics.current_mode()}
    if numerics.current_mode() == numerics.PORTABLE:
        variables.update(numerics.portable_environment())
    return variables


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at ``HOST:PORT``, or None (also for addresses Ray resolves itself,
    such as ``auto`` and ``ray://``). Ray would otherwise retry for minutes before it fails."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit() or not host:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def connect(address: str | None = None, *, num_cpus: int | None = None) -> float:
    """Join the Ray cluster at ``address``, or start a local one (the default).

    A session already open in this process is reused as it is, so that a program (or a test
    module) pays Ray's start-up once.

    :return: the seconds it took (0 when a session was reused)
    :raises RayUnavailableError: Ray is missing or the cluster cannot be reached
    """
    ray = _import_ray()
    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    problem = _unreachable(address) if address else None
    if problem is not None:
        raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {problem}")
    try:
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=True,
            runtime_env={"env_vars": _worker_environment()},
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        text = str(exc).strip().splitlines()
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise RayUnavailableError(f"cannot reach {where}: {text[0] if text else exc}") from None
    return time.perf_counter() - started


@dataclass
class FleetResult:
    """The reports of a ``verify --ray`` run, and what the run itself has to say."""

    reports: list[FileReport]
    seconds: float
    nodes: int
    cpus: int
    startup_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def files_per_second(self) -> float:
        return len(self.reports) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Tasks (run in Ray workers)


def _static_task(path: str, trust: bool, budgets: Budgets, allow: Any) -> FileReport:
    from dppo_ckpt.checkpoint.checks import run_checks

    return run_checks(path, static=True, trust=trust, budgets=budgets, allow=allow)


def _load_task(path: str, trust: bool, quick: bool, budgets: Budgets, allow: Any) -> FileReport:
    from dppo_ckpt.checkpoint.checks import run_checks
    from dppo_ckpt.checkpoint.isolation import crash_report, run_isolated

    check = functools.partial(
        run_checks, static=False, trust=trust, quick=quick, budgets=budgets, allow=allow
    )
    # As local verify: a little beyond the budget, so the child's own deadline speaks first.
    outcome = run_isolated(check, path, timeout=budgets.timeout + 5)
    return outcome.value if outcome.ok else crash_report(path, outcome, budgets.timeout)


# ---------------------------------------------------------------------------------------------
# The driver


def _worker_died(path: str) -> FileReport:
    from dppo_ckpt.checkpoint.checks import CHECKS

    reason = (
        "the Ray worker checking the file died while reading untrusted data: refused as unsafe "
        "(not retried)"
    )
    return FileReport.from_results(path, [CHECKS["DPPO007"].failed(reason)], unsafe=True)


def _out_of_memory(path: str, exc: BaseException) -> FileReport:
    """Ray's memory monitor killed the worker under the file: what it read grew until the node
    ran low on memory, which is a memory bomb's doing (exit 3), named as Ray words it."""
    from dppo_ckpt.checkpoint.checks import CHECKS

    reason = (
        "Ray killed the worker checking the file for memory while it read untrusted data "
        f"({_first_line(exc)}): refused as unsafe (not retried)"
    )
    return FileReport.from_results(path, [CHECKS["DPPO007"].failed(reason)], unsafe=True)


def _task_failed(path: str, why: str) -> FileReport:
    from dppo_ckpt.checkpoint.checks import CHECKS

    return FileReport.from_results(path, [CHECKS["DPPO001"].errored(why)])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _gather(
    ray: Any,
    paths: Sequence[str],
    submit: Callable[[str], Any],
    notes: list[str],
) -> tuple[list[FileReport], set[int]]:
    """Submit one task per path, then collect the reports in input order.

    A dead worker (crashed, or killed by Ray for memory) is the file's verdict; a lost node
    earns the file one more try; any other failure of Ray is that file's error. Whatever Ray
    raises for one file, the other files of the batch keep their own reports.

    :return: the reports, and the indices of the files whose worker died
    """
    from ray import exceptions

    lost_node = (exceptions.NodeDiedError, exceptions.LocalRayletDiedError)
    refs = [submit(path) for path in paths]
    reports: list[FileReport] = []
    died: set[int] = set()
    for index, (path, ref) in enumerate(zip(paths, refs, strict=True)):
        retried = False
        while True:
            try:
                reports.append(ray.get(ref))
            except lost_node as exc:
                if retried:
                    why = f"its Ray node was lost twice: {_first_line(exc)}"
                    reports.append(_task_failed(path, why))
                    notes.append(f"{path}: its Ray node was lost again on the retry; not checked")
                    break
                retried = True
                notes.append(f"{path}: its Ray node was lost; retried once on another node")
                ref = submit(path)
                continue
            except exceptions.WorkerCrashedError:
                reports.append(_worker_died(path))
                died.add(index)
            except exceptions.OutOfMemoryError as exc:
                reports.append(_out_of_memory(path, exc))
                died.add(index)
            except exceptions.RayTaskError as exc:  # the task raised: never for a file's content
                reports.append(_task_failed(path, f"the check task failed: {_first_line(exc)}"))
            except exceptions.RayError as exc:  # cancelled, object lost, system error, ...
                why = f"Ray could not run the check ({type(exc).__name__}): {_first_line(exc)}"
                reports.append(_task_failed(path, why))
            break
    return reports, died


def _cluster_size(ray: Any) -> tuple[int, int]:
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return len(nodes), cpus


def verify_on_ray(
    paths: Sequence[str],
    *,
    static: bool,
    trust: bool,
    quick: bool,
    budgets: Budgets,
    allow: Any,
    address: str | None = None,
) -> FleetResult:
    """Check every file on the Ray cluster; reports in input order.

    :raises RayUnavailableError: Ray is missing or the cluster cannot be reached
    """
    startup = connect(address)
    ray = _import_ray()
    started = time.perf_counter()
    # Workers are never retried by Ray itself: a lost node is retried here, once, by hand.
    static_remote = ray.remote(max_retries=0, num_cpus=1)(_static_task)
    load_remote = ray.remote(max_retries=0, num_cpus=1)(_load_task)
    reports, notes = _fan_out(
        ray,
        paths,
        lambda path: static_remote.remote(path, trust, budgets, allow),
        None if static else lambda path: load_remote.remote(path, trust, quick, budgets, allow),
    )
    seconds = time.perf_counter() - started
    nodes, cpus = _cluster_size(ray)
    return FleetResult(reports, seconds, nodes, cpus, startup_s=startup, notes=notes)


def _fan_out(
    ray: Any,
    paths: Sequence[str],
    submit_static: Callable[[str], Any],
    submit_load: Callable[[str], Any] | None,
) -> tuple[list[FileReport], list[str]]:
    """The static stage for every file, then (unless ``submit_load`` is None) the load stage
    for the files it leaves to load; the reports in input order, and the notes."""
    from dppo_ckpt.checkpoint.checks import refused_without_loading

    notes: list[str] = []
    reports, died = _gather(ray, paths, submit_static, notes)
    if submit_load is None:
        return reports, notes
    to_load = []
    for index, report in enumerate(reports):
        # A file whose static task killed its worker is not handed to another one; nor is one
        # the static checks refused: as in local verify, nothing of it is loaded.
        refused = None if index in died else refused_without_loading(report)
        if refused is not None:
            reports[index] = refused
        elif index not in died:
            to_load.append(index)
    loaded, _ = _gather(ray, [paths[i] for i in to_load], submit_load, notes)
    for index, report in zip(to_load, loaded, strict=True):
        reports[index] = report
    return reports, notes
