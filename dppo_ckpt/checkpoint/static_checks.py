"""The static checks of ``dppo-ckpt verify`` (``DPPO001``-``DPPO006``): one function each.

They read the zip, the ``data`` JSON and the pickles through the code-free interpreter, and
import neither torch nor numpy: nothing from the file is executed. DPPO001 opens and scans
the archive for the checks after it; the others read what it found.

Each function is declared with its ID, title, category and remedy in
:data:`~dppo_ckpt.checkpoint.registry.VERIFY`, which gives the run order.
"""

from __future__ import annotations

from typing import Any, Final

from dppo_ckpt.checkpoint.archive import CheckpointError, open_checkpoint
from dppo_ckpt.checkpoint.contents import (
    SCALER_ENTRY,
    identify_algorithm,
    parse_system_info,
    policy_class_name,
    scaler_is_legacy,
    scaler_payload,
)
from dppo_ckpt.checkpoint.context import CheckContext
from dppo_ckpt.checkpoint.registry import VERIFY, describe
from dppo_ckpt.checkpoint.results import CheckResult, Severity
from dppo_ckpt.checkpoint.safe_pickle import (
    GlobalVerdict,
    PickleScanError,
    ScanReport,
    scan_checkpoint,
)

__all__ = [
    "MIGRATE_REMEDY",
    "REQUIRED_MEMBERS",
    "UNSAFE_REMEDY",
    "check_archive_sound",
    "check_is_distributional",
    "check_nothing_unsafe",
    "check_required_members",
    "check_scaler_not_legacy",
    "check_versions_recorded",
]

#: Members SB3's loader needs from a PPO-family checkpoint.
REQUIRED_MEMBERS: Final = ("data", "policy.pth", "policy.optimizer.pth")
_VERSION_MEMBERS: Final = ("_stable_baselines3_version", "system_info.txt")
MIGRATE_REMEDY: Final = "Run `dppo-ckpt migrate OLD.zip NEW.zip` to rewrite the scaler entry."
#: The remedy of a file refused as unsafe, statically (DPPO004) or by the loader (DPPO007).
UNSAFE_REMEDY: Final = (
    "Do not load this file. If you wrote it yourself and trust it, rerun with --trust, then "
    "save it again without lambdas or custom classes."
)


@VERIFY.check(
    "DPPO001",
    title="Archive is sound",
    category="archive",
    stage="archive",
    summary="zip limits, CRC, JSON, pickles parse",
    remedy="The file is damaged or not a checkpoint: restore it from a good copy or save the "
    "model again.",
)
def check_archive_sound(ctx: CheckContext) -> CheckResult:
    """DPPO001: the zip opens within the limits, every member reads with a good CRC, ``data``
    is a JSON object with valid entries, every ``.pth`` is a torch archive and every pickle
    parses. On failure the file is unusable (exit 2)."""
    spec = VERIFY["DPPO001"]
    try:
        # The load checks read the file whole anyway: reading it once, here, makes every
        # check, static or not, judge the very bytes that are loaded.
        ctx.archive = open_checkpoint(ctx.path, in_memory=not ctx.static)
        archive = ctx.archive
        archive.check_members(archive.names())
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
            return spec.failed(describe(exc), **details)
        ctx.unusable = describe(exc)
        return spec.failed(ctx.unusable, **details)
    return spec.passed(
        f"{len(archive.members)} members read, {ctx.scan.pickles_scanned} pickles parsed",
        members=len(archive.members),
        pickles=ctx.scan.pickles_scanned,
    )


@VERIFY.check(
    "DPPO002",
    title="Required members present",
    category="archive",
    stage="static",
    summary="`data`, `policy.pth`, `policy.optimizer.pth`",
    remedy="Save the model again with model.save(); a checkpoint needs data, policy.pth and "
    "policy.optimizer.pth.",
)
def check_required_members(ctx: CheckContext) -> CheckResult:
    """DPPO002: ``data``, ``policy.pth`` and ``policy.optimizer.pth`` are all present."""
    spec = VERIFY["DPPO002"]
    assert ctx.archive is not None
    ctx.missing = tuple(name for name in REQUIRED_MEMBERS if name not in ctx.archive)
    if ctx.missing:
        return spec.failed(
            f"missing member(s): {', '.join(ctx.missing)}",
            member=ctx.missing[0],
            missing=list(ctx.missing),
        )
    return spec.passed(f"{', '.join(REQUIRED_MEMBERS)} present")


@VERIFY.check(
    "DPPO003",
    title="Library versions recorded",
    category="lifecycle",
    severity=Severity.WARNING,
    stage="static",
    summary="`_stable_baselines3_version`, `system_info.txt`",
    remedy="Save the model again with stable-baselines3's save(), which records the versions "
    "it was written with.",
)
def check_versions_recorded(ctx: CheckContext) -> CheckResult:
    """DPPO003: the SB3 version and the system info (torch, Python, ...) are recorded."""
    spec = VERIFY["DPPO003"]
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


@VERIFY.check(
    "DPPO004",
    title="Nothing unsafe inside",
    category="security",
    stage="static",
    summary="every global allow-listed, no code by value, no `BUILD` that patches a class or "
    "crafts a numpy dtype",
    remedy=UNSAFE_REMEDY,
)
def check_nothing_unsafe(ctx: CheckContext) -> CheckResult:
    """DPPO004: every global of every pickle (entries, ``.pth`` pickles, nested tensor blobs)
    is on the allow-list and nothing is code pickled by value. Failure is exit 3."""
    spec = VERIFY["DPPO004"]
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


@VERIFY.check(
    "DPPO005",
    title="Scaler entry is not legacy",
    category="legacy",
    severity=Severity.WARNING,
    stage="static",
    summary="no `_parameters`, `_logger` or load-time flag in its state: the one rule every "
    "reader applies",
    on_failure="exit 1; run `dppo-ckpt migrate OLD.zip NEW.zip`",
    remedy=MIGRATE_REMEDY,
)
def check_scaler_not_legacy(ctx: CheckContext) -> CheckResult:
    """DPPO005: the scaler entry holds none of the legacy state keys (``_parameters``, the
    stale-copy bug), read from the interpreter's model without unpickling. The message says
    the checkpoint layout: 1 (scaler pickled in ``data``, which ``migrate`` rewrites) or 2
    (its state dict is the tensor member ``vgs.pth``)."""
    from dppo_ckpt.checkpoint.contents import SCALER_MEMBER, checkpoint_layout

    spec = VERIFY["DPPO005"]
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


@VERIFY.check(
    "DPPO006",
    title="Is a DistributionalPPO checkpoint",
    category="lifecycle",
    severity=Severity.NOTE,
    stage="static",
    summary="plain SB3 PPO: skipped, generic checks only",
    on_failure="skip",
    remedy="Save the model with DistributionalPPO to get the scaler and lifecycle checks.",
)
def check_is_distributional(ctx: CheckContext) -> CheckResult:
    """DPPO006: the file was written by DistributionalPPO; for anything else (plain SB3 PPO)
    the scaler checks do not apply and are skipped."""
    spec = VERIFY["DPPO006"]
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
