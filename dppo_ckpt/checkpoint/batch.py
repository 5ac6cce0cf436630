"""``verify`` over many files: where each file's checks run, and what the run has to say.

Locally, static checks run in this process (no torch) and load checks one file per child
process (:mod:`~dppo_ckpt.checkpoint.isolation`), so a crash is that file's verdict; with
``ray``, the same checks run as Ray tasks (:mod:`~dppo_ckpt.checkpoint.fleet`). Either way the
reports are one per file, in input order, and the command line only prints them and maps
them to its exit code.

Nothing heavy is imported here: ``verify --static`` (the pre-commit hook) goes through this
module and must stay free of torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dppo_ckpt.checkpoint.allowlist import UserAllowList
    from dppo_ckpt.checkpoint.budgets import Budgets
    from dppo_ckpt.checkpoint.results import FileReport

__all__ = ["BatchResult", "verify_files", "verify_locally"]


@dataclass
class BatchResult:
    """The reports of a ``verify`` run, and the lines it has for stderr (Ray's notes and
    throughput; none for a local run)."""

    reports: list[FileReport]
    messages: list[str] = field(default_factory=list)


def verify_locally(
    paths: Sequence[str],
    *,
    static: bool,
    trust: bool,
    quick: bool,
    jobs: int,
    isolate: bool,
    budgets: Budgets,
    allow: UserAllowList,
) -> list[FileReport]:
    """Run the checks on every file on this machine; input order.

    Static checks run here (no torch). Load checks run one file per child process unless
    ``isolate`` is off (and always under ``jobs > 1``), so a crash is that file's verdict.
    """
    from dppo_ckpt.checkpoint.checks import run_checks

    check = functools.partial(
        run_checks, static=static, trust=trust, quick=quick, budgets=budgets, allow=allow
    )
    if static or (not isolate and jobs <= 1):
        return [check(path) for path in paths]
    from dppo_ckpt.checkpoint.isolation import crash_report, run_many_isolated

    # A little beyond the budget, so the child's own deadline speaks first where it can.
    outcomes = run_many_isolated(
        check, [(path,) for path in paths], jobs=jobs, timeout=budgets.timeout + 5
    )
    return [
        outcome.value if outcome.ok else crash_report(path, outcome, budgets.timeout)
        for path, outcome in zip(paths, outcomes, strict=True)
    ]


def verify_files(
    paths: Sequence[str],
    *,
    static: bool,
    trust: bool,
    quick: bool,
    budgets: Budgets,
    allow: UserAllowList,
    jobs: int = 1,
    isolate: bool = True,
    ray: bool = False,
    address: str | None = None,
) -> BatchResult:
    """``verify`` on every file: locally, or as Ray tasks with ``ray`` (on the cluster at
    ``address``, or a new local one). ``jobs`` and ``isolate`` are for local runs: Ray runs
    one task per file, and loads each file in a child of its worker.

    :raises ~dppo_ckpt.checkpoint.fleet.RayUnavailableError: with ``ray``, Ray is missing or
        the cluster cannot be reached
    """
    if not ray:
        reports = verify_locally(
            paths, static=static, trust=trust, quick=quick, jobs=jobs, isolate=isolate,
            budgets=budgets, allow=allow,
        )  # fmt: skip
        return BatchResult(reports)
    from dppo_ckpt.checkpoint import fleet
    from dppo_ckpt.checkpoint.report import fleet_summary_line
    from dppo_ckpt.checkpoint.results import printable

    result = fleet.verify_on_ray(
        paths, static=static, trust=trust, quick=quick, budgets=budgets, allow=allow,
        address=address,
    )  # fmt: skip
    messages = [f"note: {printable(note)}" for note in result.notes]
    messages.append(
        fleet_summary_line(
            len(result.reports), result.seconds, result.nodes, result.cpus, result.startup_s
        )
    )
    return BatchResult(result.reports, messages)
