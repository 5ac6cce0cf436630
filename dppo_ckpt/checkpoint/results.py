"""The result types shared by every check, and the exit-code rule of every command.

A check yields one :class:`CheckResult`; the results for one checkpoint form a
:class:`FileReport`. Rendering them (table, JSON, JUnit XML, SARIF) lives in
:mod:`dppo_ckpt.checkpoint.report`, so that checking and presenting stay apart.

Exit codes, the same for every command:

====  ==========================================================================
0     all good
1     a check failed (or could not run)
2     the input could not be used: missing, not a checkpoint, unreadable
3     refused as unsafe: the checkpoint would run code or load a forbidden global
====  ==========================================================================

This module imports nothing heavy (no torch), so the static tools start fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "CATEGORIES",
    "EXIT_CHECK_FAILED",
    "EXIT_OK",
    "EXIT_UNSAFE",
    "EXIT_UNUSABLE",
    "CheckResult",
    "FileReport",
    "Severity",
    "Verdict",
    "exit_code_for",
    "overall_exit_code",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_UNUSABLE = 2
EXIT_UNSAFE = 3

# Which exit code wins when several files end differently, worst first. It coincides with the
# numeric order today, but it is a ranking of meanings, not of numbers: a code added later
# takes its place here by what it means.
_EXIT_CODE_PRECEDENCE: tuple[int, ...] = (EXIT_UNSAFE, EXIT_UNUSABLE, EXIT_CHECK_FAILED, EXIT_OK)

#: The check categories. "security" failures mean the file is refused as unsafe (exit 3) and
#: "archive" failures mean the input could not be used (exit 2); every other category fails
#: with exit 1.
CATEGORIES: frozenset[str] = frozenset(
    {"archive", "security", "legacy", "lifecycle", "statistics", "roundtrip", "cycle"}
)


class Verdict(str, Enum):
    """The outcome of one check.

    ``ERROR`` means the check itself could not run to a conclusion (an unexpected exception,
    a missing prerequisite); it is not a finding about the checkpoint.
    """

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"


class Severity(str, Enum):
    """How serious a failure of the check is; the SARIF ``level`` of its findings."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class CheckResult:
    """The result of one check on one checkpoint.

    :param check_id: stable identifier, e.g. ``"DPPO001"``; never reused for another check
    :param title: what the check establishes, one line
    :param verdict: pass, fail, skip or error
    :param message: what was found, one line
    :param remedy: on fail or error, a sentence saying what to do next; ``None`` otherwise
    :param category: one of :data:`CATEGORIES`; decides the exit code of a failure
    :param severity: how serious a failure is (the SARIF level)
    :param details: JSON-able extras; ``"member"`` (zip member) and ``"entry"`` (key of the
        ``data`` JSON) locate a finding inside the archive
    :param duration_s: wall time the check took, in seconds
    """

    check_id: str
    title: str
    verdict: Verdict
    message: str
    remedy: str | None
    category: str
    severity: Severity
    details: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        # Accept the plain string values too ("fail", "warning"), so results read back from
        # JSON round-trip; anything else is a programming error caught here, not at rendering.
        object.__setattr__(self, "verdict", Verdict(self.verdict))
        object.__setattr__(self, "severity", Severity(self.severity))
        if not self.check_id:
            raise ValueError("check_id must not be empty")
        if self.category not in CATEGORIES:
            raise ValueError(
                f"unknown category {self.category!r}; expected one of {sorted(CATEGORIES)}"
            )


@dataclass
class FileReport:
    """All results for one checkpoint file, and the exit code they amount to.

    :param path: the file as the user named it (kept relative when it was given relative)
    :param results: one :class:`CheckResult` per check, in the order they ran
    :param exit_code: 0 ok, 1 a check failed, 2 unusable input, 3 refused as unsafe;
        normally :func:`exit_code_for` of ``results``
    :param notes: lines about the whole run that a reviewer must see beside the verdicts,
        for example the extra allow entries the file was loaded with
    """

    path: str
    results: list[CheckResult]
    exit_code: int
    notes: tuple[str, ...] = ()

    @classmethod
    def from_results(
        cls,
        path: str,
        results: Iterable[CheckResult],
        *,
        unusable: bool = False,
        unsafe: bool = False,
        notes: Iterable[str] = (),
    ) -> FileReport:
        """Build a report whose exit code is :func:`exit_code_for` of the results."""
        results = list(results)
        code = exit_code_for(results, unusable=unusable, unsafe=unsafe)
        return cls(path, results, code, tuple(notes))


def exit_code_for(
    results: Iterable[CheckResult], *, unusable: bool = False, unsafe: bool = False
) -> int:
    """The exit code of one file from its check results.

    The first rule that applies wins:

    3. ``unsafe`` is set, or a check in the ``"security"`` category failed (refused as unsafe);
    2. ``unusable`` is set, or a check in the ``"archive"`` category failed (the input could
       not be used: not a zip, over the limits, no ``data`` member);
    1. any other check failed, or any check ended in :attr:`Verdict.ERROR`;
    0. otherwise (skipped checks never fail a file).

    A check that errored gives 1 whatever its category: it could not run, so it says nothing
    certain about the file, yet the file was not shown good either.

    :param results: the check results of one file
    :param unusable: the input could not be used even before any check ran (e.g. missing)
    :param unsafe: the input was refused as unsafe outside any check
    :return: 0, 1, 2 or 3
    """
    failed_categories: set[str] = set()
    errored = False
    for result in results:
        if result.verdict is Verdict.FAIL:
            failed_categories.add(result.category)
        elif result.verdict is Verdict.ERROR:
            errored = True
    if unsafe or "security" in failed_categories:
        return EXIT_UNSAFE
    if unusable or "archive" in failed_categories:
        return EXIT_UNUSABLE
    if failed_categories or errored:
        return EXIT_CHECK_FAILED
    return EXIT_OK


def overall_exit_code(reports: Iterable[FileReport]) -> int:
    """The exit code of a command over several files: the worst outcome wins.

    Precedence, worst first: 3 (unsafe) > 2 (unusable) > 1 (check failed) > 0 (ok). A run
    over one unsafe and one broken file therefore exits 3: being refused as unsafe is the
    more urgent news. No files at all gives 0; commands reject an empty file list themselves.

    :raises ValueError: a report holds an exit code outside 0..3
    """
    codes = set()
    for report in reports:
        if report.exit_code not in _EXIT_CODE_PRECEDENCE:
            raise ValueError(f"{report.path}: unknown exit code {report.exit_code!r}")
        codes.add(report.exit_code)
    return next((code for code in _EXIT_CODE_PRECEDENCE if code in codes), EXIT_OK)


def printable(value: object) -> str:
    """``value`` as text safe for a terminal or XML: non-printable characters (ESC, NUL,
    newlines, bidi overrides) shown as escapes. Every renderer passes paths and strings from
    files through this; a hostile name cannot drive the terminal."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape", "backslashreplace").decode()
        for char in text
    )
