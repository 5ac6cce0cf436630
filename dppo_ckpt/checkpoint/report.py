"""Rendering of check results: a rich table, JSON, JUnit XML and SARIF 2.1.0.

Rendering only: these functions never run a check and never decide an outcome beyond the
exit-code rule of :mod:`dppo_ckpt.checkpoint.results`. Every renderer takes the list of
:class:`~dppo_ckpt.checkpoint.results.FileReport` that a command produced. This is the one
module that renders what ``verify``, ``cycle``, ``inspect`` and ``migrate`` print, so that the
command line only parses options and maps outcomes to exit codes.

Messages can quote names taken from an untrusted file (zip members, pickled globals), so the
human-facing outputs (table, JUnit) show control and other non-printable characters as
escapes: a hostile name cannot drive the terminal or break the XML. The JSON outputs (JSON,
SARIF) keep the text exact, written as ASCII with escapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from enum import Enum
from importlib import resources
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from dppo_ckpt.checkpoint.results import (
    CheckResult,
    FileReport,
    Severity,
    Verdict,
    overall_exit_code,
    printable,
)

if TYPE_CHECKING:
    from rich.console import Console

    from dppo_ckpt.checkpoint.migrate import MigrationOutcome

__all__ = [
    "JSON_SCHEMA_VERSION",
    "REPORT_FORMATS",
    "SARIF_CATEGORIES",
    "TOOL_NAME",
    "inspection_to_json",
    "json_schema",
    "migration_to_json",
    "print_reports",
    "render",
    "render_inspection",
    "render_migration",
    "render_table",
    "summary_line",
    "to_json",
    "to_junit",
    "to_sarif",
    "unusable_lines",
    "written_line",
]

TOOL_NAME = "dppo-ckpt"

#: Version of the JSON report format; bumped whenever a field is added, removed or changed.
JSON_SCHEMA_VERSION = "1"

#: Categories whose failures become SARIF results. Code-scanning dashboards track what is wrong
#: with a file (unsafe content, legacy layout, a broken archive), not how a training run fared.
SARIF_CATEGORIES: frozenset[str] = frozenset({"security", "legacy", "archive"})

_SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SARIF_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.NOTE: "note"}
_VERDICT_STYLE = {
    Verdict.PASS: "bold green",
    Verdict.FAIL: "bold red",
    Verdict.SKIP: "yellow",
    Verdict.ERROR: "bold magenta",
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that :func:`to_json` output follows, as shipped."""
    text = resources.files("dppo_ckpt.checkpoint").joinpath("report.schema.json").read_text("utf-8")
    return json.loads(text)


def _counts(reports: Sequence[FileReport]) -> dict[str, int]:
    counts = dict.fromkeys(Verdict, 0)
    for report in reports:
        for result in report.results:
            counts[result.verdict] += 1
    return {
        "passed": counts[Verdict.PASS],
        "failed": counts[Verdict.FAIL],
        "skipped": counts[Verdict.SKIP],
        "errors": counts[Verdict.ERROR],
    }


def summary_line(reports: Sequence[FileReport]) -> str:
    """Totals over every result of every file, e.g. ``"12 passed, 1 failed, 2 skipped"``.

    Always ``"N passed, N failed"``; ``", N skipped"`` and then ``", N errors"`` are appended
    only when nonzero. The words do not change with the number, so the line is easy to parse.
    """
    counts = _counts(reports)
    line = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["skipped"]:
        line += f", {counts['skipped']} skipped"
    if counts["errors"]:
        line += f", {counts['errors']} errors"
    return line


def fleet_summary_line(
    files: int, seconds: float, nodes: int, cpus: int, startup_s: float = 0.0
) -> str:
    """The throughput of ``verify --ray``, e.g. ``"200 files in 3.1 s (64.5 files/s) on 1 Ray
    node, 2 CPUs; Ray start-up 4.2 s"``. Start-up is apart: a cluster pays it once."""
    rate = files / seconds if seconds > 0 else 0.0
    line = (
        f"{files} file{'s' if files != 1 else ''} in {seconds:.2f} s ({rate:.1f} files/s) "
        f"on {nodes} Ray node{'s' if nodes != 1 else ''}, {cpus} CPUs"
    )
    if startup_s > 0:
        line += f"; Ray start-up {startup_s:.2f} s"
    return line


def written_line(reports: Sequence[FileReport], output: str | PurePath) -> str:
    """What a command says on the terminal after writing its report to ``output``."""
    return f"{summary_line(reports)} (report written to {printable(output)})"


def unusable_lines(reports: Sequence[FileReport]) -> list[str]:
    """``error: REASON``, one line per file that could not be used (its DPPO001 did not
    pass): the reason on stderr, where scripts look for errors, whatever the format."""
    lines = []
    for report in reports:
        first = report.results[0] if report.results else None
        if first is not None and first.check_id == "DPPO001" and first.verdict is not Verdict.PASS:
            lines.append(f"error: {printable(first.message)}")
    return lines


# ---------------------------------------------------------------------------------------------
# Every format of verify and cycle

#: The formats of the check reports; ``cycle`` offers all but SARIF.
REPORT_FORMATS: Final = ("table", "json", "junit", "sarif")


def render(reports: Sequence[FileReport], fmt: str, *, command: str, tool_version: str) -> str:
    """The reports of ``command`` (``"verify"``, ``"cycle"``) as text in one of
    :data:`REPORT_FORMATS`; the table as it is written to a file (120 columns, no colour).

    :raises ValueError: an unknown format
    """
    if fmt == "json":
        return to_json(reports, tool_version, command) + "\n"
    if fmt == "junit":
        return to_junit(reports, command)
    if fmt == "sarif":
        return to_sarif(reports, tool_version) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown report format {fmt!r}; expected one of {REPORT_FORMATS}")
    import io

    from rich.console import Console

    buffer = io.StringIO()
    render_table(reports, Console(file=buffer, width=120, color_system=None))
    return buffer.getvalue()


def print_reports(
    reports: Sequence[FileReport], fmt: str, *, command: str, tool_version: str
) -> None:
    """Show the reports on standard output: the table through rich (the terminal's width and
    colours), any other format as :func:`render` gives it."""
    if fmt == "table":
        from rich.console import Console

        render_table(reports, Console())
        return
    sys.stdout.write(render(reports, fmt, command=command, tool_version=tool_version))


# ---------------------------------------------------------------------------------------------
# Terminal table


def render_table(reports: Sequence[FileReport], console: Console) -> None:
    """Print one table per file (ID, check, verdict, message), then the summary line.

    The remedy of a failed or errored check is printed under its message. The summary line
    (:func:`summary_line`) comes last, alone on its line.
    """
    from rich.table import Table
    from rich.text import Text

    for report in reports:
        results = report.results
        if _unusable(report):
            # One row says why; the skipped checks add nothing a reader needs here. JSON,
            # JUnit and SARIF keep every check, so CI test cases stay stable.
            results = results[:1]
        caption = "\n".join([f"exit code {report.exit_code}", *map(printable, report.notes)])
        table = Table(
            title=Text(printable(report.path), style="bold"),
            caption=caption,
            title_justify="left",
            caption_justify="left",
        )
        table.add_column("ID", no_wrap=True)
        table.add_column("Check")
        table.add_column("Verdict", no_wrap=True)
        table.add_column("Message")
        for result in results:
            message = Text(printable(_without_path(result.message, report.path)))
            if result.remedy and result.verdict in (Verdict.FAIL, Verdict.ERROR):
                message.append("\n")
                message.append(f"-> {printable(result.remedy)}", style="italic cyan")
            table.add_row(
                Text(printable(result.check_id)),
                Text(printable(result.title)),
                Text(result.verdict.value.upper(), style=_VERDICT_STYLE[result.verdict]),
                message,
            )
        console.print(table)
    failing = [r for r in reports if r.exit_code]
    if failing and len(reports) > 1:
        named = ", ".join(f"{printable(r.path)} (exit {r.exit_code})" for r in failing)
        console.print(Text(f"not good: {named}"), soft_wrap=True)
    # soft_wrap: the summary line must stay one line, whatever the console width.
    console.print(Text(summary_line(reports)), soft_wrap=True)


def _unusable(report: FileReport) -> bool:
    """The file could not be used: DPPO001 did not pass and every other check was skipped."""
    first, rest = report.results[:1], report.results[1:]
    return (
        bool(first)
        and first[0].verdict in (Verdict.FAIL, Verdict.ERROR)
        and all(r.verdict is Verdict.SKIP for r in rest)
    )


def _without_path(message: str, path: str) -> str:
    """The message without a leading ``PATH:`` (the table's title already names the file)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# ---------------------------------------------------------------------------------------------
# JSON


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of ``value``: non-finite floats become strings, arrays become lists."""
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, PurePath):
        return str(value)
    if callable(getattr(value, "tolist", None)):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def _result_to_dict(result: CheckResult) -> dict[str, Any]:
    duration = result.duration_s
    return {
        "check_id": result.check_id,
        "title": result.title,
        "verdict": result.verdict.value,
        "message": result.message,
        "remedy": result.remedy,
        "category": result.category,
        "severity": result.severity.value,
        "details": _jsonable(dict(result.details)),
        "duration_s": float(duration) if math.isfinite(duration) and duration >= 0 else 0.0,
    }


def to_json(reports: Sequence[FileReport], tool_version: str, command: str) -> str:
    """The reports as a JSON document following ``report.schema.json`` (version 1).

    Top level: ``schema_version``, ``tool`` {name, version}, ``command``, ``files``
    [{path, exit_code, results: [...]}], ``summary`` {passed, failed, skipped, errors} and
    ``exit_code`` (see :func:`~dppo_ckpt.checkpoint.results.overall_exit_code`). Every field
    is described in the schema, available as :func:`json_schema`.

    :param reports: one report per input file
    :param tool_version: the dppo-ckpt version writing the report
    :param command: the command that produced the reports, e.g. ``"verify"``
    """
    reports = list(reports)
    document = {
        "schema_version": JSON_SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": tool_version},
        "command": command,
        "files": [
            {
                "path": report.path,
                "exit_code": report.exit_code,
                "results": [_result_to_dict(result) for result in report.results],
            }
            for report in reports
        ],
        "summary": _counts(reports),
        "exit_code": overall_exit_code(reports),
    }
    # ASCII with escapes: names from hostile files may hold lone surrogates that no UTF-8
    # stream accepts.
    return json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# JUnit XML


def _seconds(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) and value >= 0 else "0.000"


def _with_remedy(result: CheckResult) -> str:
    text = printable(result.message)
    if result.remedy:
        text += f"\nRemedy: {printable(result.remedy)}"
    return text


def to_junit(reports: Sequence[FileReport], suite_name: str) -> str:
    """The reports as JUnit XML, for CI systems that show test results.

    A ``<testsuites>`` root holds one ``<testsuite>`` per file (named by its path), with one
    ``<testcase classname="dppo-ckpt.<suite_name>.<file stem>" name="<ID> <title>">`` per
    check. A failed check carries ``<failure>``, a check that could not run ``<error>`` (both
    with the message as attribute and the remedy in the text), a skipped one ``<skipped>``.
    Dots in the file stem become underscores, since CI tools split class names on dots.

    :param reports: one report per input file
    :param suite_name: the command or job name, e.g. ``"verify"``
    """
    reports = list(reports)
    root = ET.Element("testsuites", name=f"{TOOL_NAME}.{suite_name}")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for report in reports:
        stem = printable(Path(report.path).stem).replace(".", "_")
        classname = f"{TOOL_NAME}.{suite_name}.{stem}"
        counts = _counts([report])
        suite_time = sum(r.duration_s for r in report.results if math.isfinite(r.duration_s))
        suite = ET.SubElement(
            root,
            "testsuite",
            name=printable(report.path),
            tests=str(len(report.results)),
            failures=str(counts["failed"]),
            errors=str(counts["errors"]),
            skipped=str(counts["skipped"]),
            time=_seconds(suite_time),
        )
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="path", value=printable(report.path))
        ET.SubElement(properties, "property", name="exit_code", value=str(report.exit_code))
        for note in report.notes:
            ET.SubElement(properties, "property", name="note", value=printable(note))
        for result in report.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=classname,
                name=printable(f"{result.check_id} {result.title}"),
                time=_seconds(result.duration_s),
            )
            if result.verdict in (Verdict.FAIL, Verdict.ERROR):
                tag = "failure" if result.verdict is Verdict.FAIL else "error"
                outcome = ET.SubElement(
                    case, tag, message=printable(result.message), type=result.category
                )
                outcome.text = _with_remedy(result)
            elif result.verdict is Verdict.SKIP:
                ET.SubElement(case, "skipped", message=printable(result.message))
        totals["tests"] += len(report.results)
        totals["failures"] += counts["failed"]
        totals["errors"] += counts["errors"]
        totals["skipped"] += counts["skipped"]
        total_time += suite_time
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", _seconds(total_time))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# ---------------------------------------------------------------------------------------------
# SARIF 2.1.0


def _rule_name(title: str) -> str:
    """A SARIF rule name from a title: "VGS tracks live params" -> "VgsTracksLiveParams"."""
    words = "".join(char if char.isalnum() else " " for char in title).split()
    return "".join(word[:1].upper() + word[1:].lower() for word in words) or "Check"


def _artifact_uri(path: str) -> str:
    # Relative paths stay relative (dashboards resolve them against the repository root);
    # surrogateescape keeps undecodable file names intact as their original bytes.
    pure = PurePath(path)
    if pure.is_absolute():
        return "file://" + quote(pure.as_posix(), safe="/", errors="surrogateescape")
    return quote(pure.as_posix(), safe="/", errors="surrogateescape")


def _logical_location(details: dict[str, Any]) -> dict[str, Any] | None:
    """Where inside the zip a finding is: member (zip member) and/or entry (``data`` key)."""
    member = details.get("member")
    entry = details.get("entry")
    if member is None and entry is None:
        return None
    if entry is None:
        return {"name": str(member), "fullyQualifiedName": str(member), "kind": "resource"}
    qualified = f"{member}::{entry}" if member is not None else str(entry)
    return {"name": str(entry), "fullyQualifiedName": qualified, "kind": "member"}


def _sarif_result(report: FileReport, result: CheckResult, rule_index: int) -> dict[str, Any]:
    text = result.message if not result.remedy else f"{result.message} Remedy: {result.remedy}"
    location: dict[str, Any] = {
        "physicalLocation": {"artifactLocation": {"uri": _artifact_uri(report.path)}}
    }
    logical = _logical_location(result.details)
    if logical is not None:
        location["logicalLocations"] = [logical]
    # Stable across runs, so a dashboard recognises the same finding in the same place.
    fingerprint = hashlib.sha256(
        "\0".join(
            [
                result.check_id,
                report.path,
                str(result.details.get("member", "")),
                str(result.details.get("entry", "")),
            ]
        ).encode("utf-8", "surrogateescape")
    ).hexdigest()
    return {
        "ruleId": result.check_id,
        "ruleIndex": rule_index,
        "kind": "fail",
        "level": _SARIF_LEVEL[result.severity],
        "message": {"text": text},
        "locations": [location],
        "partialFingerprints": {"dppoCkptFinding/v1": fingerprint},
        "properties": {
            "verdict": result.verdict.value,
            "category": result.category,
            "details": _jsonable(dict(result.details)),
        },
    }


def to_sarif(reports: Sequence[FileReport], tool_version: str) -> str:
    """The reports as SARIF 2.1.0, for code-scanning dashboards.

    One run whose tool driver lists one rule per check ID that appears in the reports (id,
    name, ``shortDescription`` = title, ``help`` = remedy, the category as tag). Results are
    only the failed or errored checks in :data:`SARIF_CATEGORIES`, at the level of their
    severity, located at the file (``physicalLocation``, the path as given) and, when the
    check's details name one, at the zip ``member`` and ``data`` ``entry``
    (``logicalLocations``; ``"member::entry"`` as fully qualified name).

    :param reports: one report per input file
    :param tool_version: the dppo-ckpt version writing the report
    """
    reports = list(reports)
    rules: dict[str, dict[str, Any]] = {}
    for report in reports:
        for result in report.results:
            rule = rules.setdefault(
                result.check_id,
                {
                    "id": result.check_id,
                    "name": _rule_name(result.title),
                    "shortDescription": {"text": result.title},
                    "defaultConfiguration": {"level": _SARIF_LEVEL[result.severity]},
                    "properties": {"tags": [result.category], "category": result.category},
                },
            )
            # A passing result carries no remedy; take it from any result of the check.
            if "help" not in rule and result.remedy:
                rule["help"] = {"text": result.remedy}
    rule_ids = sorted(rules)
    rule_index = {rule_id: index for index, rule_id in enumerate(rule_ids)}
    results = [
        _sarif_result(report, result, rule_index[result.check_id])
        for report in reports
        for result in report.results
        if result.verdict in (Verdict.FAIL, Verdict.ERROR) and result.category in SARIF_CATEGORIES
    ]
    document = {
        "$schema": _SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL_NAME,
                        "version": tool_version,
                        "rules": [rules[rule_id] for rule_id in rule_ids],
                    }
                },
                "invocations": [
                    {"executionSuccessful": True, "exitCode": overall_exit_code(reports)}
                ],
                "results": results,
            }
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# inspect


def inspection_to_json(info: dict[str, Any]) -> str:
    """``inspect``'s JSON: what :func:`~dppo_ckpt.checkpoint.contents.inspect_checkpoint`
    found, as ASCII (every string from the file escaped), anything else as its ``str()``."""
    return json.dumps(info, indent=2, ensure_ascii=True, default=str) + "\n"


def render_inspection(info: dict[str, Any], console: Console) -> None:
    """``inspect``'s tables: members, versions, hyperparameters, scaler, numerics, globals."""
    from rich.table import Table
    from rich.text import Text

    def table(title: str, *columns: str) -> Table:
        out = Table(title=Text(title, style="bold"), title_justify="left")
        for column in columns:
            out.add_column(column)
        return out

    def row(out: Table, *values: Any) -> None:
        out.add_row(*(Text(printable(v)) for v in values))

    console.print(Text(printable(info["path"]), style="bold"))
    members = table("Members", "Name", "Size", "Stored", "Compression")
    for m in info["members"]:
        row(members, m["name"], m["size"], m["compressed_size"], m["compression"])
    console.print(members)
    overview = table("Checkpoint", "Field", "Value")
    for key, value in info["versions"].items():
        row(overview, f"{key} version", value if value is not None else "not recorded")
    row(overview, "algorithm", info["algorithm"] or "unknown")
    row(overview, "policy class", info["policy_class"] or "unknown")
    layout = info.get("layout", 1)
    scaler_on = info["vgs"] is not None
    to_2 = " (scaler pickled in data: `dppo-ckpt migrate` rewrites it in layout 2)"
    row(overview, "checkpoint layout", f"{layout}{to_2 if layout == 1 and scaler_on else ''}")
    row(overview, "legacy scaler entry", "yes: run `dppo-ckpt migrate`" if info["legacy"] else "no")
    row(overview, "all globals allow-listed", "yes" if info["safe"] else "NO")
    console.print(overview)
    hyper = table("Hyperparameters (plain JSON values of data)", "Key", "Value")
    for key, value in info["hyperparameters"].items():
        text = repr(value)
        row(hyper, key, text if len(text) <= 80 else text[:77] + "...")
    for key, kind in info["pickled_entries"].items():
        # The class a pickled class entry names, not the metaclass SB3 records as its type.
        shown = info["policy_class"] if key == "policy_class" and info["policy_class"] else kind
        row(hyper, key, f"pickled {shown or ''}".strip())
    console.print(hyper)
    vgs = info["vgs"]
    scaler = table("Variance Gradient Scaler", "Field", "Value")
    if vgs is None:
        row(scaler, "scaler", "none (off, or not a DistributionalPPO checkpoint)")
    elif "error" in vgs:
        row(scaler, "scaler", f"cannot decode: {vgs['error']}")
    else:
        version = vgs["state_version"]
        old = " (before the running level: `dppo-ckpt migrate` rewrites it)"
        row(scaler, "state format", f"{version}{old if version == 1 else ''}")
        for key, value in vgs["config"].items():
            row(scaler, key, value)
        for key in ("step_count", "scaling_factor", "noise_ratio", "level"):
            row(scaler, key, vgs[key])
        row(scaler, "updates after warm-up", vgs["updates_after_warmup"])
        for key, label in (
            ("at_min_share", "share at min_scale"),
            ("at_one_share", "share at 1"),
            ("scale_mean", "mean factor"),
        ):
            value = vgs[key]
            row(scaler, label, "n/a" if value is None else f"{value:.3f}")
        for key in ("tensors", "elements"):
            row(scaler, key, vgs[key])
    console.print(scaler)
    numerics = table("Numerics (what bit-for-bit results depend on)", "Field", "Value")
    if info["numerics"] is None:
        row(numerics, "fingerprint", "not recorded (plain SB3, or dppo-ckpt < 0.2)")
    else:
        for key, value in info["numerics"].items():
            row(numerics, key, value)
    console.print(numerics)
    globals_table = Table(title=Text("Globals referenced", style="bold"), title_justify="left")
    globals_table.add_column("Global", overflow="fold")
    globals_table.add_column("Verdict", no_wrap=True)
    globals_table.add_column("Uses", justify="right", no_wrap=True)
    globals_table.add_column("Where", overflow="fold")
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for g in info["globals"]:
        grouped.setdefault((g["global"], g["verdict"]), []).append(g)
    # Refused globals first, so they are never lost among the allowed ones.
    for (name, verdict), places in sorted(grouped.items(), key=lambda kv: kv[0][1] == "allowed"):
        wheres = []
        for g in places:
            where = g["member"] + (f" / {g['entry']}" if g["entry"] else "")
            wheres.append(where + "".join(f" > {p}" for p in g["path"]))
        unique = list(dict.fromkeys(wheres))
        shown = ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")
        style = "green" if verdict == "allowed" else "bold red"
        globals_table.add_row(
            Text(printable(name)),
            Text(verdict, style=style),
            str(sum(g.get("count", 1) for g in places)),
            Text(printable(shown)),
        )
    console.print(globals_table)


# ---------------------------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------------------------

_STATUS_STYLE: Final = {
    "migrated": "green",
    "already current": "green",
    "would migrate": "yellow",
    "failed": "red",
    "unusable": "red",
    "refused": "bold red",
}


def render_migration(outcomes: Sequence[MigrationOutcome], console: Any) -> None:
    """A summary table (input, output, status, what changed) and a count line."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="dppo-ckpt migrate", title_justify="left")
    table.add_column("Input", overflow="fold")
    table.add_column("Output", overflow="fold")
    table.add_column("Status", no_wrap=True)
    table.add_column("Exit", no_wrap=True)
    table.add_column("Details")
    for o in outcomes:
        details = o.message + (f"\nbackup: {o.backup}" if o.backup and o.exit_code == 0 else "")
        table.add_row(
            Text(printable(o.source)),
            Text(printable(o.destination or "-")),
            Text(o.status, style=_STATUS_STYLE.get(o.status, "")),
            str(o.exit_code),
            Text("\n".join(printable(line) for line in details.split("\n"))),
        )
    console.print(table)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    console.print(Text(", ".join(f"{n} {status}" for status, n in counts.items())), soft_wrap=True)


def migration_to_json(outcomes: Sequence[MigrationOutcome], exit_code: int, version: str) -> str:
    """The outcomes as JSON: ``{"tool", "version", "command", "exit_code", "files": [...]}``."""
    return json.dumps(
        {
            "tool": "dppo-ckpt",
            "version": version,
            "command": "migrate",
            "exit_code": exit_code,
            "files": [o.to_dict() for o in outcomes],
        },
        indent=2,
    )


# ---------------------------------------------------------------------------------------------
# Sweeps


def _metric_text(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:,.4g}"
    return "-" if value is None else str(value)


def render_sweep(result: Any, console: Console) -> None:
    """The results table of ``sweep`` (a :class:`~dppo_ckpt.sweep.SweepResult`): a row per
    trial with its drawn values and figures, the best trial marked, then a totals line."""
    from rich.table import Table
    from rich.text import Text

    keys = sorted({key for row in result.rows for key in row.config})
    table = Table(title=f"sweep results ({result.metric}, {result.mode})", title_justify="left")
    for column in ["trial", "status", *keys, "return", "eval return", "VGS scale",
                   "VGS mean factor", "restarts"]:  # fmt: skip
        # Folded, never cut short: a log file is 80 columns wide and a value must stay whole.
        table.add_column(column, no_wrap=column == "trial", overflow="fold")
    for row in result.rows:
        mark = " *" if row.trial_id == result.best else ""
        table.add_row(
            Text(printable(row.trial_id) + mark),
            Text(row.status, style="bold red" if row.status == "ERROR" else "bold green"),
            *(Text(printable(_metric_text(row.config.get(key)))) for key in keys),
            _metric_text(row.metrics.get("return")),
            _metric_text(row.metrics.get("eval_return")),
            _metric_text(row.metrics.get("vgs_scale")),
            _metric_text(row.metrics.get("vgs_mean_factor")),
            str(row.restarts),
        )
    console.print(table)
    for row in result.rows:
        if row.error:
            console.print(Text(f"{printable(row.trial_id)} failed: {printable(row.error)}"),
                          soft_wrap=True)  # fmt: skip
    done = len(result.rows) - result.failed
    line = f"{done} done, {result.failed} failed in {result.wall_time_s:,.1f} s"
    if result.best is not None:
        line += f"; best {printable(result.best)} (marked *)"
    console.print(Text(line), soft_wrap=True)


def sweep_to_json(result: Any, tool_version: str) -> str:
    """The results of ``sweep`` as JSON: ``tool``, ``metric``, ``mode``, ``best``, ``folder``,
    ``wall_time_s`` and ``trials`` [{trial_id, status, config, metrics, run_dir,
    last_checkpoint, restarts, error, exit_code}]; non-finite figures become strings."""
    document = {
        "tool": {"name": TOOL_NAME, "version": tool_version},
        "command": "sweep",
        "metric": result.metric,
        "mode": result.mode,
        "best": result.best,
        "folder": str(result.folder),
        "wall_time_s": result.wall_time_s,
        "trials": [
            {
                "trial_id": row.trial_id,
                "status": row.status,
                "config": _jsonable(row.config),
                "metrics": _jsonable(row.metrics),
                "run_dir": row.run_dir,
                "last_checkpoint": row.last_checkpoint,
                "restarts": row.restarts,
                "error": row.error,
                "exit_code": row.exit_code,
            }
            for row in result.rows
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False)
