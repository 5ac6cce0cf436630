"""The runner behind ``dppo-ckpt verify``: every check of the registry, in its order, on a file.

The checks are declared, each with its stable ID, title, category and remedy, in
:data:`~dppo_ckpt.checkpoint.registry.VERIFY` (the README's table of checks is rendered from
it). They run in stages, and a stage runs only when the ones before it allow:

1. *archive* (``DPPO001``) opens the zip and scans every pickle; when the archive is unusable,
   every other check is skipped with that reason;
2. *static* (``DPPO002``-``DPPO006``, :mod:`~dppo_ckpt.checkpoint.static_checks`) read the
   zip, the ``data`` JSON and the scan. They import neither torch nor numpy and execute
   nothing from the file;
3. *load* (``DPPO007``, :mod:`~dppo_ckpt.checkpoint.model_checks`) loads the model with
   :func:`~dppo_ckpt.checkpoint.safe_pickle.safe_load` (allow-list unpickling only); it is
   skipped, with the reason, with ``static=True``, when the file was refused as unsafe, or
   when required members are missing;
4. *model* (``DPPO008``-``DPPO011``) examine the loaded model: the Variance Gradient Scaler
   and the optimizer must act on the policy's very parameter objects, the scaler's statistics
   must survive the load bit for bit, and its scale must reach the gradients the optimizer
   uses; skipped when the model did not load;
5. *roundtrip* (``DPPO012``): a save/load round trip must change nothing; skipped with
   ``quick=True`` as well.

Every exception inside a check becomes an ``error`` result with a one-line message: a check
never raises. Exit codes follow :func:`~dppo_ckpt.checkpoint.results.exit_code_for`: a failed
``security`` check gives 3, a failed ``archive`` check 2, any other failure or error 1.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Final

# Importing the check modules declares their checks into the registry.
from dppo_ckpt.checkpoint import model_checks as _model_checks  # noqa: F401
from dppo_ckpt.checkpoint import static_checks as _static_checks  # noqa: F401
from dppo_ckpt.checkpoint.allowlist import UserAllowList
from dppo_ckpt.checkpoint.budgets import DEFAULT_BUDGETS, Budgets
from dppo_ckpt.checkpoint.context import CheckContext
from dppo_ckpt.checkpoint.registry import VERIFY, CheckSpec, Registry
from dppo_ckpt.checkpoint.results import CheckResult, FileReport, Verdict
from dppo_ckpt.checkpoint.static_checks import MIGRATE_REMEDY, REQUIRED_MEMBERS

__all__ = [
    "CHECKS",
    "MIGRATE_REMEDY",
    "MODEL_CHECK_IDS",
    "REQUIRED_MEMBERS",
    "CheckSpec",
    "model_checks",
    "refused_without_loading",
    "run_checks",
]

#: Every check of ``verify``, by ID, in run order.
CHECKS: Final[Registry] = VERIFY

#: The checks of a loaded model (:func:`model_checks`), in run order.
MODEL_CHECK_IDS: Final = tuple(spec.check_id for spec in VERIFY.in_stage("model"))

_STATIC_REASON: Final = "--static: load checks need torch and were not run"
_REFUSED_REASON: Final = "skipped: refused as unsafe (DPPO004); nothing was loaded"


def run_checks(
    path: str | os.PathLike[str],
    *,
    static: bool = False,
    trust: bool = False,
    quick: bool = False,
    env: Any = None,
    budgets: Budgets = DEFAULT_BUDGETS,
    allow: UserAllowList | None = None,
) -> FileReport:
    """Run every check on one checkpoint file.

    :param path: the checkpoint (kept as given in the report).
    :param static: run only the static checks; torch is not imported and the load checks are
        skipped with the reason ``--static``.
    :param trust: accept globals off the allow-list (the file may run code when loaded).
    :param quick: skip the save/load round trip (``DPPO012``).
    :param env: environment handed to the loader (as in SB3's ``load``).
    :param budgets: what reading and loading the file may cost.
    :param allow: the user's extra allow entries (``--allow``, ``[tool.dppo-ckpt] allow``).
    :return: one result per check of the registry, in its order, and the exit code they
        amount to; never raises for anything about the file.
    """
    ctx = CheckContext(
        path=os.fspath(path), static=static, trust=trust, quick=quick, env=env, budgets=budgets,
        user_allow=allow or UserAllowList(),
    )  # fmt: skip
    try:
        return FileReport.from_results(ctx.path, _run_all(ctx))
    finally:
        if ctx.archive is not None:
            ctx.archive.close()


def refused_without_loading(static_report: FileReport) -> FileReport | None:
    """The full report of a file that its static checks refused as unsafe, without running
    anything again; None when the static checks did not refuse it.

    A refused file is never loaded (its load checks are skipped as refused), so the report
    :func:`run_checks` would give it is its static report with the reason of those skips
    changed. Taking it from there spares handing hostile bytes to another reader, which is
    what the static stage of ``verify --ray`` is for.
    """
    refused = any(
        result.check_id in CHECKS and CHECKS[result.check_id].category == "security"
        and CHECKS[result.check_id].stage == "static" and result.verdict is Verdict.FAIL
        for result in static_report.results
    )  # fmt: skip
    if not refused:
        return None
    results = [
        CHECKS[result.check_id].skipped(_REFUSED_REASON)
        if result.verdict is Verdict.SKIP and result.message == _STATIC_REASON
        else result
        for result in static_report.results
    ]
    return replace(static_report, results=results)


def _run_all(ctx: CheckContext) -> list[CheckResult]:
    results = []
    for spec in CHECKS.values():
        reason = _skip_reason(spec, ctx)
        results.append(spec.run(ctx) if reason is None else spec.skipped(reason))
    return results


def _skip_reason(spec: CheckSpec, ctx: CheckContext) -> str | None:
    """Why ``spec`` cannot run after what the checks before it found, or ``None``."""
    if spec.stage == "archive":
        return None
    if ctx.unusable is not None or ctx.archive is None or ctx.scan is None:
        return "skipped: the archive is unusable (DPPO001)"
    if spec.stage == "static":
        return None
    if ctx.static:
        return _STATIC_REASON
    if ctx.refused:
        return _REFUSED_REASON
    if ctx.missing:
        return "skipped: required members are missing (DPPO002)"
    if spec.stage == "load":
        return None
    if ctx.model is None:
        return f"skipped: {ctx.load_blocker or 'the model did not load'}"
    if spec.stage == "roundtrip" and ctx.quick:
        return "--quick: the round trip was not run"
    return None


def model_checks(
    model: Any, stored_scaler_state: dict[str, Any] | None = None
) -> list[CheckResult]:
    """The identity, statistics and gradient-probe checks on an already loaded model
    (the registry's *model* stage, ``DPPO008``-``DPPO011``). The probe leaves every state of
    the model as it found it.

    :param model: a loaded ``DistributionalPPO`` (other SB3 algorithms get ``DPPO009`` and
        skips).
    :param stored_scaler_state: the scaler's ``state_dict()`` as stored in the checkpoint;
        ``DPPO010`` is skipped without it.
    """
    ctx = CheckContext(model=model, stored_scaler=stored_scaler_state)
    return [spec.run(ctx) for spec in CHECKS.in_stage("model")]
