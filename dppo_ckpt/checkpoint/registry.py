"""The check registry: every check of ``verify`` and ``cycle``, declared once, with its function.

A check is a function declared with its registry's :meth:`Registry.check` decorator, which
records what the check is: its stable ID, one-line title, category, severity, default remedy,
the stage it runs in and a short summary for the README. The runners take their run order from
the registry, and the README's tables of checks are rendered from it
(``python -m dppo_ckpt.checkpoint.registry --write README.md``), so a check cannot be added,
renamed or retitled in one place and forgotten in another.

Dependencies point one way: this module knows nothing of the checks; the check modules
(:mod:`~dppo_ckpt.checkpoint.static_checks`, :mod:`~dppo_ckpt.checkpoint.model_checks`,
:mod:`dppo_ckpt.cycles`) declare their checks into it, and the runners
(:mod:`~dppo_ckpt.checkpoint.checks`, :mod:`dppo_ckpt.cycles`) read it.

IDs are stable: a retired check keeps its number forever, and a number is never reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from dppo_ckpt.checkpoint.archive import CheckpointError
from dppo_ckpt.checkpoint.results import (
    CATEGORIES,
    CheckResult,
    Severity,
    Verdict,
    exit_code_for,
)

__all__ = [
    "CYCLE",
    "VERIFY",
    "CheckSpec",
    "Registry",
    "describe",
    "main",
    "markdown_table",
    "marked_table",
    "one_line",
    "update_markdown",
]

_F = TypeVar("_F", bound=Callable[..., Any])

_ERROR_REMEDY: Final = "The check itself could not run; report it with the file if you can."


def one_line(text: object) -> str:
    """``text`` with every run of whitespace, newlines included, as one space."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """An exception as one line: a checkpoint's own reason as it is, anything else prefixed
    with its type (``"ValueError: ..."``), since the type is then part of the news."""
    text = one_line(str(exc))
    if isinstance(exc, CheckpointError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class CheckSpec:
    """What a check is: stable ID, one-line title, category, severity and default remedy, the
    stage it runs in, and the function that runs it.

    The helpers build the check's :class:`CheckResult` for each verdict; a remedy is attached
    to ``fail`` and ``error`` results only.

    :param summary: what the check looks at, in a few words, shown after the title in the
        README's table
    :param on_failure: the README's "on failure" column, when the exit code of a failed
        result of this category does not say it all
    :param options: what the suite's runner needs to know beyond this (for example the line a
        cycle check reports when it passed)
    """

    check_id: str
    title: str
    category: str
    severity: Severity
    remedy: str
    stage: str = ""
    summary: str = ""
    on_failure: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    fn: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

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
            message=one_line(message),
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
        return self.result(Verdict.ERROR, message, remedy=_ERROR_REMEDY)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the check's function as it is (exceptions included)."""
        if self.fn is None:
            raise TypeError(f"{self.check_id} has no function to run")
        return self.fn(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> CheckResult:
        """Call the check's function, timed; any exception becomes an ``error`` result with a
        one-line message, so that a check never raises."""
        start = time.perf_counter()
        try:
            result = self(*args, **kwargs)
        except Exception as exc:
            result = self.errored(describe(exc))
        return replace(result, duration_s=time.perf_counter() - start)


class Registry(Mapping[str, CheckSpec]):
    """The checks of one suite, by ID, in run order: by stage, then by ID.

    Ordering by stage rather than by import order keeps the run order the same whichever
    check module happens to be imported first.

    :param name: the suite (``"verify"``, ``"cycle"``), as the README's markers name it
    :param prefix: what every ID of the suite starts with
    :param stages: the suite's stages, in the order they run
    :param required: per stage, the options its checks must declare for the runner
    """

    def __init__(
        self,
        name: str,
        prefix: str,
        stages: Sequence[str],
        required: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.stages: tuple[str, ...] = tuple(stages)
        self.required = {stage: tuple(names) for stage, names in (required or {}).items()}
        self._specs: dict[str, CheckSpec] = {}
        self._ordered: tuple[str, ...] = ()

    def __getitem__(self, check_id: str) -> CheckSpec:
        return self._specs[check_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._specs)

    def in_stage(self, stage: str) -> list[CheckSpec]:
        """The checks of one stage, in run order."""
        return [spec for spec in self.values() if spec.stage == stage]

    def register(self, spec: CheckSpec) -> CheckSpec:
        """Add ``spec``; a second check under a taken ID is a programming error."""
        if not spec.check_id.startswith(self.prefix) or spec.check_id == self.prefix:
            raise ValueError(f"{spec.check_id!r}: {self.name} check IDs start with {self.prefix}")
        if spec.stage not in self.stages:
            raise ValueError(
                f"{spec.check_id}: unknown stage {spec.stage!r}; expected one of {self.stages}"
            )
        if spec.category not in CATEGORIES:
            raise ValueError(f"{spec.check_id}: unknown category {spec.category!r}")
        missing = [name for name in self.required.get(spec.stage, ()) if name not in spec.options]
        if missing:
            raise ValueError(f"{spec.check_id}: a {spec.stage} check declares {', '.join(missing)}")
        taken = self._specs.get(spec.check_id)
        if taken is not None and _qualified(taken.fn) != _qualified(spec.fn):
            raise ValueError(
                f"{spec.check_id} is declared twice: by {_qualified(taken.fn)} and "
                f"{_qualified(spec.fn)}"
            )
        self._specs[spec.check_id] = spec
        rank = {stage: index for index, stage in enumerate(self.stages)}
        self._ordered = tuple(
            sorted(self._specs, key=lambda i: (rank[self._specs[i].stage], i))
        )
        return spec

    def check(
        self,
        check_id: str,
        *,
        title: str,
        category: str,
        remedy: str,
        stage: str,
        severity: Severity = Severity.ERROR,
        summary: str = "",
        on_failure: str | None = None,
        **options: Any,
    ) -> Callable[[_F], _F]:
        """Declare the decorated function as the check ``check_id``; the function is returned
        unchanged, and its :class:`CheckSpec` is ``registry[check_id]``."""

        def declare(fn: _F) -> _F:
            self.register(
                CheckSpec(
                    check_id, title, category, Severity(severity), remedy, stage=stage,
                    summary=summary, on_failure=on_failure, options=dict(options), fn=fn,
                )
            )  # fmt: skip
            return fn

        return declare


def _qualified(fn: Callable[..., Any] | None) -> str:
    return "nothing" if fn is None else f"{fn.__module__}.{fn.__qualname__}"


#: The checks of ``dppo-ckpt verify``: archive (DPPO001, which opens the file), static (no
#: torch, nothing executed), load (the allow-list loader), model (the loaded model), roundtrip.
VERIFY: Final = Registry("verify", "DPPO", ("archive", "static", "load", "model", "roundtrip"))

#: The invariants of ``dppo-ckpt cycle``: *cycle* ones are called after every cycle's load with
#: what it saved and loaded; *reference* ones once, against an uninterrupted run (CYC008).
CYCLE: Final = Registry("cycle", "CYC", ("cycle", "reference"), required={"cycle": ("passed",)})

#: The modules that declare checks; importing them fills the registries (none imports torch).
_CHECK_MODULES: Final = ("dppo_ckpt.checkpoint.checks", "dppo_ckpt.cycles")


# ---------------------------------------------------------------------------------------------
# The README's tables


def _on_failure(spec: CheckSpec) -> str:
    if spec.on_failure is not None:
        return spec.on_failure
    # The exit code a failure of this category gives, by the one rule every command uses.
    return f"exit {exit_code_for([spec.failed('failed')])}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(registry: Registry) -> str:
    """The Markdown table of a suite's checks, in run order: ID, check (title and summary),
    category, what a failure means. The README holds this very text."""
    rows = ["| ID | Check | Category | On failure |", "|----|-------|----------|------------|"]
    for spec in registry.values():
        check = spec.title + (f" ({spec.summary})" if spec.summary else "")
        cells = (spec.check_id, check, spec.category, _on_failure(spec))
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- checks:{name} (generated from the registry; edit the checks, not this table) -->",
        f"<!-- /checks:{name} -->",
    )


def marked_table(text: str, registry: Registry) -> str | None:
    """The table between the suite's markers in ``text``, or ``None`` without the markers."""
    begin, end = _markers(registry.name)
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        return None
    return text[start + len(begin) : stop].strip("\n") + "\n"


def update_markdown(text: str, registries: Sequence[Registry]) -> str:
    """``text`` with the table between each suite's markers rendered again from the registry.

    :raises ValueError: a suite's markers are missing
    """
    for registry in registries:
        begin, end = _markers(registry.name)
        current = marked_table(text, registry)
        if current is None:
            raise ValueError(f"no {begin} ... {end} block for the {registry.name} checks")
        start = text.index(begin) + len(begin)
        stop = text.index(end, start)
        text = text[:start] + "\n" + markdown_table(registry) + text[stop:]
    return text


def _load_all() -> tuple[Registry, ...]:
    """Both registries, filled. Taken from the imported module, not from this namespace: run
    with ``python -m``, this file is ``__main__``, and the check modules declare into
    ``dppo_ckpt.checkpoint.registry``."""
    import importlib

    for module in _CHECK_MODULES:
        importlib.import_module(module)
    this = importlib.import_module("dppo_ckpt.checkpoint.registry")
    return this.VERIFY, this.CYCLE


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dppo_ckpt.checkpoint.registry --markdown [verify|cycle]`` prints a suite's
    table; ``--write README.md`` renders the tables inside that file's markers again."""
    parser = argparse.ArgumentParser(
        prog="python -m dppo_ckpt.checkpoint.registry",
        description="Render the tables of checks from the registry.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--markdown", nargs="?", const="verify", choices=("verify", "cycle"),
        help="print the Markdown table of one suite (default verify)",
    )  # fmt: skip
    group.add_argument(
        "--write", type=Path, metavar="FILE", help="rewrite the marked tables inside FILE"
    )
    args = parser.parse_args(argv)
    registries = _load_all()
    if args.markdown is not None:
        sys.stdout.write(markdown_table(next(r for r in registries if r.name == args.markdown)))
        return 0
    path: Path = args.write
    try:
        text = path.read_text("utf-8")
        updated = update_markdown(text, registries)
        if updated != text:
            path.write_text(updated, "utf-8")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"error: {path}: {reason}", file=sys.stderr)
        return 2
    print(f"{path}: {'tables rendered again' if updated != text else 'tables up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
