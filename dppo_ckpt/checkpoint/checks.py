"""The verification checks behind ``dppo-ckpt verify``: one function each, each with a stable ID.

A checkpoint is untrusted input, so the checks run in two stages:

1. *static* checks (``DPPO001``-``DPPO006``) read the zip, the ``data`` JSON and the pickle
   opcodes. They import neither torch nor numpy and execute nothing from the file;
2. *load* checks (``DPPO007``-``DPPO012``) load the model with
   :func:`~dppo_ckpt.checkpoint.safe_pickle.safe_load` (allow-list unpickling only) and examine
   the live objects: the Variance Gradient Scaler and the optimizer must act on the policy's
   very parameter objects, the scaler's statistics must survive the load bit for bit, its
   scale must reach the gradients the optimizer uses, and a save/load round trip must change
   nothing. They live in :mod:`dppo_ckpt.checkpoint.model_checks`, imported only when needed.

A load check is skipped, with the reason, when ``static=True``, when the file was refused as
unsafe, or when the archive is unusable. Every exception inside a check becomes an ``error``
result with a one-line message: a check never raises.

=========  ==========  ==================================================================
ID         category    establishes
=========  ==========  ==================================================================
DPPO001    archive     the zip, ``data`` JSON, entries and pickles can be read (CRC ok)
DPPO002    archive     ``data``, ``policy.pth`` and ``policy.optimizer.pth`` are present
DPPO003    lifecycle   SB3 version and ``system_info.txt`` are recorded (and the numerics)
DPPO004    security    every pickled global is allow-listed, no code pickled by value
DPPO005    legacy      the scaler entry does not pickle ``_parameters`` (and the layout)
DPPO006    lifecycle   the file is a DistributionalPPO checkpoint (skipped otherwise)
DPPO007    archive     the model loads through the allow-list loader (security if refused)
DPPO008    lifecycle   the scaler tracks exactly the policy's parameter objects
DPPO009    lifecycle   the optimizer tracks exactly the policy's parameter objects
DPPO010    statistics  the scaler's statistics after load equal the stored ones, bit for bit
DPPO011    lifecycle   a probe update with the scaler's factor s moves the parameters s times as far
DPPO012    roundtrip   save -> load leaves parameters, optimizer and scaler state unchanged
=========  ==========  ==================================================================

Exit codes follow :func:`~dppo_ckpt.checkpoint.results.exit_code_for`: a failed ``security``
check gives 3, a failed ``archive`` check 2, any other failure or error 1.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from dppo_ckpt.checkpoint.allowlist import UserAllowList
from dppo_ckpt.checkpoint.archive import (
    CheckpointArchive,
    CheckpointError,
    open_checkpoint,
)
from dppo_ckpt.checkpoint.budgets import DEFAULT_BUDGETS, Budgets
from dppo_ckpt.checkpoint.contents import (
    SCALER_ENTRY,
    identify_algorithm,
    parse_system_info,
    policy_class_name,
    scaler_is_legacy,
    scaler_payload,
)
from dppo_ckpt.checkpoint.results import CheckResult, FileReport, Severity, Verdict
from dppo_ckpt.checkpoint.safe_pickle import (
    ALLOWED_GLOBALS,
    GlobalVerdict,
    PickleScanError,
    ScanReport,
    scan_checkpoint,
)

if TYPE_CHECKING:
    from dppo_ckpt.checkpoint.safe_pickle import ScanReport

__all__ = [
    "CHECKS",
    "REQUIRED_MEMBERS",
    "CheckSpec",
    "model_checks",
    "run_checks",
]

#: Members SB3's loader needs from a PPO-family checkpoint.
REQUIRED_MEMBERS: Final = ("data", "policy.pth", "policy.optimizer.pth")
_VERSION_MEMBERS: Final = ("_stable_baselines3_version", "system_info.txt")
MIGRATE_REMEDY: Final = "Run `dppo-ckpt migrate OLD.zip NEW.zip` to rewrite the scaler entry."
_STATIC_REASON: Final = "--static: load checks need torch and were not run"


@dataclass(frozen=True)
class CheckSpec:
    """What a check is: stable ID, one-line title, category, severity and default remedy.

    The helpers build the check's :class:`CheckResult` for each verdict; a remedy is attached
    to ``fail`` and ``error`` results only.
    """

    check_id: str
    title: str
    category: str
    severity: Severity
    remedy: str

    def result(
        self,
        verdict: Verdict,
        message: str,
        *,
        remedy: str | None = None,
        category: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> CheckResult:
        failed = verdict in (Verdict.FAIL, Verdict.ERROR)
        return CheckResult(
            check_id=self.check_id,
            title=self.title,
            verdict=verdict,
            message=_one_line(message),
            remedy=(remedy or self.remedy) if failed else None,
            category=category or self.category,
            severity=self.severity,
            details=dict(details or {}),
        )

    def passed(self, message: str, **details: Any) -> CheckResult:
        return self.result(Verdict.PASS, message, details=details)

    def failed(
        self,
        message: str,
        *,
        remedy: str | None = None,
        category: str | None = None,
        **details: Any,
    ) -> CheckResult:
        return self.result(Verdict.FAIL, message, remedy=remedy, category=category, details=details)

    def skipped(self, message: str, **details: Any) -> CheckResult:
        return self.result(Verdict.SKIP, message, details=details)

    def errored(self, message: str) -> CheckResult:
        return self.result(
            Verdict.ERROR,
            message,
            remedy="The check itself could not run; report it with the file if you can.",
        )


_ERROR, _WARNING = Severity.ERROR, Severity.WARNING

#: Every check, by ID. IDs are stable: a retired check keeps its number forever.
CHECKS: Final[dict[str, CheckSpec]] = {
    spec.check_id: spec
    for spec in (
        CheckSpec(
            "DPPO001",
            "Archive is sound",
            "archive",
            _ERROR,
            "The file is damaged or not a checkpoint: restore it from a good copy or save "
            "the model again.",
        ),
        CheckSpec(
            "DPPO002",
            "Required members present",
            "archive",
            _ERROR,
            "Save the model again with model.save(); a checkpoint needs data, policy.pth "
            "and policy.optimizer.pth.",
        ),
        CheckSpec(
            "DPPO003",
            "Library versions recorded",
            "lifecycle",
            _WARNING,
            "Save the model again with stable-baselines3's save(), which records the "
            "versions it was written with.",
        ),
        CheckSpec(
            "DPPO004",
            "Nothing unsafe inside",
            "security",
            _ERROR,
            "Do not load this file. If you wrote it yourself and trust it, rerun with "
            "--trust, then save it again without lambdas or custom classes.",
        ),
        CheckSpec("DPPO005", "Scaler entry is not legacy", "legacy", _WARNING, MIGRATE_REMEDY),
        CheckSpec(
            "DPPO006",
            "Is a DistributionalPPO checkpoint",
            "lifecycle",
            Severity.NOTE,
            "Save the model with DistributionalPPO to get the scaler and lifecycle checks.",
        ),
        CheckSpec(
            "DPPO007",
            "Model loads safely",
            "archive",
            _ERROR,
            "Inspect the file with `dppo-ckpt inspect`; restore it from a good copy or save "
            "the model again.",
        ),
        CheckSpec(
            "DPPO008",
            "Scaler tracks the policy's parameters",
            "lifecycle",
            _ERROR,
            "Upgrade dppo-ckpt: its DistributionalPPO relinks the scaler on load; call "
            "scaler.update_parameters(policy.parameters()) after rebuilding a policy.",
        ),
        CheckSpec(
            "DPPO009",
            "Optimizer tracks the policy's parameters",
            "lifecycle",
            _ERROR,
            "Rebuild the optimizer over policy.parameters() after the policy is (re)built, "
            "then relink the scaler.",
        ),
        CheckSpec(
            "DPPO010",
            "Scaler statistics survive the load",
            "statistics",
            _ERROR,
            "Upgrade dppo-ckpt: loading must restore the scaler's saved statistics with "
            "load_state_dict() instead of starting from zero.",
        ),
        CheckSpec(
            "DPPO011",
            "Scaler factor scales the optimizer's step",
            "lifecycle",
            _ERROR,
            "Relink the scaler with scaler.update_parameters(policy.parameters()) so that it "
            "watches the gradients the optimizer uses, and apply its factor with "
            "scaler.step(optimizer, scale) (the learning rate), not to .grad.",
        ),
        CheckSpec(
            "DPPO012",
            "Save/load round trip is lossless",
            "roundtrip",
            _ERROR,
            "Saving and loading changes the state: upgrade dppo-ckpt, or report the "
            "checkpoint and the versions it was written with.",
        ),
    )
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckpointError):
        return _one_line(str(exc))
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Shared state of one run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What the checks of one file share: the open archive, the scan, the loaded model."""

    @property
    def allow(self) -> Mapping[tuple[str, str], str]:
        """The built-in allow-list with the user's entries."""
        return self.user_allow.merged(ALLOWED_GLOBALS)

    path: str
    static: bool
    trust: bool
    quick: bool
    env: Any
    budgets: Budgets = DEFAULT_BUDGETS
    user_allow: UserAllowList = field(default_factory=UserAllowList)
    archive: CheckpointArchive | None = None
    unusable: str | None = None
    scan: ScanReport | None = None
    missing: tuple[str, ...] = ()
    refused: bool = False
    algorithm: str | None = None
    model: Any = None
    load_blocker: str | None = None
    load_warnings: list[str] = field(default_factory=list)


def _timed(spec: CheckSpec, fn: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; any exception becomes an ``error`` result with a one-line message."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:
        result = spec.errored(_describe(exc))
    return CheckResult(**{**result.__dict__, "duration_s": time.perf_counter() - start})


# ---------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------


def _drain(archive: Any, name: str) -> None:
    """Read a member to its end in bounded chunks (surfaces CRC errors and truncation)."""
    archive.check_member(name)


def check_archive_sound(ctx: _Context) -> CheckResult:
    """DPPO001: the zip opens within the limits, every member reads with a good CRC, ``data``
    is a JSON object with valid entries, every ``.pth`` is a torch archive and every pickle
    parses. On failure the file is unusable (exit 2)."""
    spec = CHECKS["DPPO001"]
    try:
        ctx.archive = open_checkpoint(ctx.path)
        archive = ctx.archive
        for name in archive.names():
            _drain(archive, name)
        # The scan parses `data`, decodes every entry and opens every torch archive: any of
        # them being unusable surfaces here as an ArchiveError.
        ctx.scan = scan_checkpoint(archive, allow=ctx.allow, budgets=ctx.budgets)
        archive.metadata  # noqa: B018  (validates dppo_ckpt.json when present)
    except CheckpointError as exc:
        details = {"member": exc.member} if getattr(exc, "member", None) else {}
        if isinstance(exc, PickleScanError) and exc.entry is not None:
            details["entry"] = exc.entry
        if isinstance(exc, PickleScanError) and any(not f.allowed for f in exc.findings):
            # An unsafe global read before the damage decides: DPPO004 refuses the file.
            ctx.scan = ScanReport(exc.findings)
            return spec.failed(_describe(exc), **details)
        ctx.unusable = _describe(exc)
        return spec.failed(ctx.unusable, **details)
    return spec.passed(
        f"{len(archive.members)} members read, {ctx.scan.pickles_scanned} pickles parsed",
        members=len(archive.members),
        pickles=ctx.scan.pickles_scanned,
    )


def check_required_members(ctx: _Context) -> CheckResult:
    """DPPO002: ``data``, ``policy.pth`` and ``policy.optimizer.pth`` are all present."""
    spec = CHECKS["DPPO002"]
    assert ctx.archive is not None
    ctx.missing = tuple(name for name in REQUIRED_MEMBERS if name not in ctx.archive)
    if ctx.missing:
        return spec.failed(
            f"missing member(s): {', '.join(ctx.missing)}",
            member=ctx.missing[0],
            missing=list(ctx.missing),
        )
    return spec.passed(f"{', '.join(REQUIRED_MEMBERS)} present")


def check_versions_recorded(ctx: _Context) -> CheckResult:
    """DPPO003: the SB3 version and the system info (torch, Python, ...) are recorded."""
    spec = CHECKS["DPPO003"]
    archive = ctx.archive
    assert archive is not None
    missing = [name for name in _VERSION_MEMBERS if name not in archive]
    if missing:
        return spec.failed(f"missing member(s): {', '.join(missing)}", member=missing[0])
    sb3 = archive.sb3_version or ""
    info = parse_system_info(archive.text_member("system_info.txt"))
    if not sb3:
        return spec.failed("_stable_baselines3_version is empty", member=_VERSION_MEMBERS[0])
    torch_version = info.get("PyTorch")
    python_version = info.get("Python")
    if not (torch_version and python_version):
        return spec.failed(
            "system_info.txt does not record the PyTorch and Python versions",
            member="system_info.txt",
        )
    metadata = archive.metadata
    numerics = metadata["numerics"] if metadata is not None else None
    recorded = (
        f"{numerics.get('numerics', 'unknown')} numerics recorded"
        if numerics is not None
        else "no numerics recorded"
    )
    return spec.passed(
        f"stable-baselines3 {sb3}, PyTorch {torch_version}, Python {python_version}; {recorded}",
        stable_baselines3=sb3,
        torch=torch_version,
        python=python_version,
        numerics=numerics,
    )


def check_nothing_unsafe(ctx: _Context) -> CheckResult:
    """DPPO004: every global of every pickle (entries, ``.pth`` pickles, nested tensor blobs)
    is on the allow-list and nothing is code pickled by value. Failure is exit 3."""
    spec = CHECKS["DPPO004"]
    assert ctx.scan is not None
    scan = ctx.scan
    refused = scan.refused
    extra: dict[str, Any] = {}
    used = ""
    if ctx.user_allow.pairs:
        # Listed in every report, so that a change adding a zip and an entry is visible.
        extra = {"extra_allow": ctx.user_allow.names, "allow_source": ctx.user_allow.source}
        source = ctx.user_allow.source or "--allow"
        used = f" (with extra allow entries {', '.join(ctx.user_allow.names)} from {source})"
    if not refused:
        return spec.passed(
            f"{len(scan.globals_referenced)} distinct globals in {scan.pickles_scanned} "
            f"pickles, all allow-listed{used}",
            **extra,
        )
    code_findings = [f for f in refused if f.verdict is GlobalVerdict.CODE_BY_VALUE]
    code = bool(code_findings)
    first = code_findings[0] if code else refused[0]
    names = sorted({f.global_name for f in refused})
    where = f"member {first.member!r}" + (f", entry {first.entry!r}" if first.entry else "")
    inside = f" ({' > '.join(first.path)})" if first.path else ""
    kind = "code pickled by value" if code else "globals off the allow-list"
    details = {
        **extra,
        "member": first.member,
        "refused": [
            {"global": f.global_name, "verdict": f.verdict.value, "member": f.member,
             "entry": f.entry, "path": list(f.path)}
            for f in refused
        ],
    }  # fmt: skip
    if first.entry is not None:
        details["entry"] = first.entry
    message = (
        f"{kind}: {first.global_name} in {where}{inside}"
        + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        + used
    )
    if ctx.trust:
        # The user vouches for the file; the finding is reported, not held against it.
        return spec.skipped(f"--trust: accepted {message}", **details)
    ctx.refused = True
    return spec.failed(message, **details)


def check_scaler_not_legacy(ctx: _Context) -> CheckResult:
    """DPPO005: the scaler entry holds none of the legacy state keys (``_parameters``, the
    stale-copy bug), read from the interpreter's model without unpickling. The message says
    the checkpoint layout: 1 (scaler pickled in ``data``, which ``migrate`` rewrites) or 2
    (its state dict is the tensor member ``vgs.pth``)."""
    from dppo_ckpt.checkpoint.contents import SCALER_MEMBER, checkpoint_layout

    spec = CHECKS["DPPO005"]
    archive = ctx.archive
    assert archive is not None
    layout = checkpoint_layout(archive)
    payload = scaler_payload(archive)
    if payload is None:
        if SCALER_MEMBER in archive:
            return spec.passed(
                f"layout {layout}: the scaler state is the tensor member {SCALER_MEMBER}, "
                "no pickled object",
                member=SCALER_MEMBER,
                layout=layout,
            )
        value = archive.data.get(SCALER_ENTRY, "absent")
        if layout >= 2 and archive.data.get("variance_gradient_scaling") is True:
            return spec.failed(
                f"layout {layout} with the scaler on, but no {SCALER_MEMBER}: its statistics "
                "are missing and a load would restart its warm-up",
                member=SCALER_MEMBER,
                layout=layout,
            )
        reason = "scaler is off (entry is null)" if value is None else "no scaler entry"
        if archive.data.get("variance_gradient_scaling") is False:
            reason = "scaler is off"
        return spec.skipped(f"{reason}; layout {layout}", layout=layout)
    if scaler_is_legacy(payload):
        return spec.failed(
            "the scaler entry holds legacy state (_parameters): a checkpoint of an earlier "
            f"version, whose scaler pickled its parameter objects (layout {layout})",
            member="data",
            entry=SCALER_ENTRY,
            layout=layout,
        )
    return spec.passed(
        f"layout {layout}: the scaler entry holds no parameter objects; `dppo-ckpt migrate` "
        f"rewrites it in layout 2 ({SCALER_MEMBER})",
        entry=SCALER_ENTRY,
        layout=layout,
    )


def check_is_distributional(ctx: _Context) -> CheckResult:
    """DPPO006: the file was written by DistributionalPPO; for anything else (plain SB3 PPO)
    the scaler checks do not apply and are skipped."""
    spec = CHECKS["DPPO006"]
    archive = ctx.archive
    assert archive is not None and ctx.scan is not None
    policy = policy_class_name(ctx.scan)
    ctx.algorithm = identify_algorithm(archive.data, policy)
    if ctx.algorithm == "DistributionalPPO":
        return spec.passed(f"DistributionalPPO with policy {policy}", policy_class=policy)
    what = ctx.algorithm or "an unknown algorithm"
    return spec.skipped(
        f"not a DistributionalPPO checkpoint ({what}, policy {policy}): only the generic "
        "checks apply",
        policy_class=policy,
        algorithm=ctx.algorithm,
    )


_STATIC_CHECKS: Final[tuple[tuple[str, Callable[[_Context], CheckResult]], ...]] = (
    ("DPPO002", check_required_members),
    ("DPPO003", check_versions_recorded),
    ("DPPO004", check_nothing_unsafe),
    ("DPPO005", check_scaler_not_legacy),
    ("DPPO006", check_is_distributional),
)
_LOAD_CHECK_IDS: Final = ("DPPO007", "DPPO008", "DPPO009", "DPPO010", "DPPO011", "DPPO012")


# ---------------------------------------------------------------------------------------------
# Load stage
# ---------------------------------------------------------------------------------------------


def _load(ctx: _Context) -> CheckResult:
    """DPPO007: load with the allow-list loader (``safe_load``); a refusal is exit 3, any
    other failure makes the file unusable (exit 2)."""
    from dppo_ckpt.checkpoint.safe_pickle import UnsafePickleError, safe_load

    spec = CHECKS["DPPO007"]
    assert ctx.archive is not None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx.model = safe_load(
                ctx.archive, env=ctx.env, device="cpu", trust=ctx.trust, budgets=ctx.budgets,
                allow=ctx.allow,
            )  # fmt: skip
    except UnsafePickleError as exc:
        ctx.load_blocker = "the loader refused the file as unsafe (DPPO007)"
        return spec.failed(
            _describe(exc),
            category="security",
            remedy=CHECKS["DPPO004"].remedy,
            member=exc.member,
            **({"entry": exc.entry} if exc.entry else {}),
        )
    except Exception as exc:
        ctx.load_blocker = "the model did not load (DPPO007)"
        return spec.failed(f"the model does not load: {_describe(exc)}")
    ctx.load_warnings = [_one_line(str(w.message)) for w in caught]
    model = ctx.model
    name = type(model).__name__
    params = sum(p.numel() for p in model.policy.parameters())
    how = (
        "with code from the file allowed to run (--trust)"
        if ctx.trust and ctx.scan is not None and ctx.scan.refused
        else "without running code from the file"
    )
    return spec.passed(
        f"{name} loaded {how} ({params} policy parameters)",
        algorithm=name,
        parameters=params,
        warnings=ctx.load_warnings,
    )


def _stored_scaler_state(ctx: _Context) -> dict[str, Any] | None:
    """The scaler state as stored in the file: layout 1's pickled scaler decoded with the
    allow-list unpickler, or layout 2's ``vgs.pth`` read with ``torch.load(weights_only=True)``
    (as SB3 reads it)."""
    import io

    from dppo_ckpt.checkpoint.contents import SCALER_MEMBER
    from dppo_ckpt.checkpoint.safe_pickle import SafeUnpickler

    assert ctx.archive is not None
    payload = scaler_payload(ctx.archive)
    if payload is None:
        if SCALER_MEMBER not in ctx.archive:
            return None
        import torch

        with ctx.archive.spool_member(SCALER_MEMBER) as stream:
            state = torch.load(stream, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{SCALER_MEMBER} holds a {type(state).__name__}, not a state dict")
        return state
    scaler = SafeUnpickler(io.BytesIO(payload), entry=SCALER_ENTRY).load()
    return scaler.state_dict()


def _load_checks(ctx: _Context) -> list[CheckResult]:
    from dppo_ckpt.checkpoint import model_checks as mc

    results = [_timed(CHECKS["DPPO007"], lambda: _load(ctx))]
    if ctx.model is None:
        reason = ctx.load_blocker or "the model did not load"
        return results + [CHECKS[i].skipped(f"skipped: {reason}") for i in _LOAD_CHECK_IDS[1:]]
    stored: dict[str, Any] | None = None
    stored_error: str | None = None
    if ctx.algorithm == "DistributionalPPO":
        try:
            stored = _stored_scaler_state(ctx)
        except Exception as exc:
            stored_error = _describe(exc)
    results += mc.model_checks(ctx.model, stored, stored_error=stored_error)
    if ctx.quick:
        results.append(CHECKS["DPPO012"].skipped("--quick: the round trip was not run"))
    else:
        results.append(
            _timed(
                CHECKS["DPPO012"],
                lambda: mc.check_round_trip(ctx.model, ctx.env, trust=ctx.trust, allow=ctx.allow),
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


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
    :return: the results of all twelve checks and the exit code they amount to; never raises
        for anything about the file.
    """
    ctx = _Context(
        path=os.fspath(path), static=static, trust=trust, quick=quick, env=env, budgets=budgets,
        user_allow=allow or UserAllowList(),
    )  # fmt: skip
    try:
        return FileReport.from_results(ctx.path, _run_all(ctx))
    finally:
        if ctx.archive is not None:
            ctx.archive.close()


def _run_all(ctx: _Context) -> list[CheckResult]:
    results = [_timed(CHECKS["DPPO001"], lambda: check_archive_sound(ctx))]
    if ctx.unusable is not None or ctx.archive is None or ctx.scan is None:
        reason = "skipped: the archive is unusable (DPPO001)"
        return results + [
            CHECKS[check_id].skipped(reason)
            for check_id in CHECKS
            if check_id != "DPPO001"  # fmt: skip
        ]
    for check_id, fn in _STATIC_CHECKS:
        results.append(_timed(CHECKS[check_id], lambda fn=fn: fn(ctx)))
    blocker = None
    if ctx.static:
        blocker = _STATIC_REASON
    elif ctx.refused:
        blocker = "skipped: refused as unsafe (DPPO004); nothing was loaded"
    elif ctx.missing:
        blocker = "skipped: required members are missing (DPPO002)"
    if blocker is not None:
        return results + [CHECKS[i].skipped(blocker) for i in _LOAD_CHECK_IDS]
    return results + _load_checks(ctx)


def model_checks(
    model: Any, stored_scaler_state: dict[str, Any] | None = None
) -> list[CheckResult]:
    """The identity, statistics and gradient-probe checks on an already loaded model
    (``DPPO008``-``DPPO011``). The probe leaves every state of the model as it found it.

    :param model: a loaded ``DistributionalPPO`` (other SB3 algorithms get ``DPPO009`` and
        skips).
    :param stored_scaler_state: the scaler's ``state_dict()`` as stored in the checkpoint;
        ``DPPO010`` is skipped without it.
    """
    from dppo_ckpt.checkpoint import model_checks as mc

    return mc.model_checks(model, stored_scaler_state)
