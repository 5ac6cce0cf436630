"""Result types, exit-code precedence and every rendering of check results."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import jsonschema
import pytest
from rich.console import Console

from dppo_ckpt.checkpoint.report import (
    json_schema,
    render_table,
    summary_line,
    to_json,
    to_junit,
    to_sarif,
)
from dppo_ckpt.checkpoint.results import (
    CheckResult,
    FileReport,
    Severity,
    Verdict,
    exit_code_for,
    overall_exit_code,
)


def _result(
    check_id: str,
    verdict: Verdict,
    category: str = "lifecycle",
    *,
    severity: Severity = Severity.ERROR,
    details: dict | None = None,
    message: str | None = None,
    duration_s: float = 0.25,
) -> CheckResult:
    failing = verdict in (Verdict.FAIL, Verdict.ERROR)
    return CheckResult(
        check_id=check_id,
        title=f"title of {check_id}",
        verdict=verdict,
        message=message if message is not None else f"message of {check_id}",
        remedy=f"remedy of {check_id}." if failing else None,
        category=category,
        severity=severity,
        details=details or {},
        duration_s=duration_s,
    )


@pytest.fixture
def reports() -> list[FileReport]:
    """Two files: one clean (with a skip), one with a failure per kind and an error."""
    clean = FileReport.from_results(
        "ckpts/good.zip",
        [
            _result("DPPO001", Verdict.PASS, "archive"),
            _result("DPPO002", Verdict.PASS, "security"),
            _result("DPPO030", Verdict.SKIP, "cycle", severity=Severity.NOTE),
        ],
    )
    bad = FileReport.from_results(
        "ckpts/old.v1.zip",
        [
            _result("DPPO001", Verdict.PASS, "archive"),
            _result(
                "DPPO002",
                Verdict.FAIL,
                "security",
                details={"member": "data", "entry": "learning_rate", "global": "os.system"},
            ),
            _result(
                "DPPO010",
                Verdict.FAIL,
                "legacy",
                severity=Severity.WARNING,
                details={"member": "data"},
            ),
            _result("DPPO020", Verdict.FAIL, "statistics", details={"ratio": float("nan")}),
            _result("DPPO021", Verdict.ERROR, "lifecycle"),
            _result("DPPO003", Verdict.ERROR, "archive", severity=Severity.NOTE),
            _result("DPPO030", Verdict.SKIP, "cycle", severity=Severity.NOTE),
        ],
    )
    return [clean, bad]


# ---------------------------------------------------------------------------------------------
# Result types and exit codes


def test_check_result_accepts_string_values_and_rejects_unknown_category() -> None:
    result = CheckResult("X001", "t", "fail", "m", "r", "security", "warning")
    assert result.verdict is Verdict.FAIL
    assert result.severity is Severity.WARNING
    with pytest.raises(ValueError, match="category"):
        CheckResult("X001", "t", Verdict.PASS, "m", None, "nonsense", Severity.NOTE)
    with pytest.raises(ValueError):
        CheckResult("X001", "t", "maybe", "m", None, "archive", Severity.NOTE)


@pytest.mark.parametrize(
    ("results", "flags", "expected"),
    [
        ([], {}, 0),
        ([("pass", "security"), ("skip", "archive")], {}, 0),
        ([("fail", "statistics")], {}, 1),
        ([("error", "lifecycle")], {}, 1),
        # An errored security or archive check could not conclude anything: exit 1.
        ([("error", "security"), ("error", "archive")], {}, 1),
        ([("fail", "legacy"), ("fail", "archive")], {}, 2),
        ([("fail", "archive"), ("fail", "security")], {}, 3),
        ([("fail", "security")], {"unusable": True}, 3),
        ([("pass", "archive")], {"unusable": True}, 2),
        ([("fail", "cycle")], {"unusable": True}, 2),
        ([], {"unsafe": True}, 3),
    ],
)
def test_exit_code_for(results: list[tuple[str, str]], flags: dict, expected: int) -> None:
    checks = [_result(f"T{i:03d}", Verdict(v), c) for i, (v, c) in enumerate(results)]
    assert exit_code_for(checks, **flags) == expected


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([], 0),
        ([0, 0], 0),
        ([0, 1, 0], 1),
        ([1, 2], 2),
        ([2, 1], 2),
        ([3, 2, 1, 0], 3),
        ([0, 3], 3),
        ([2, 3, 2], 3),
    ],
)
def test_overall_exit_code_precedence(codes: list[int], expected: int) -> None:
    reports = [FileReport(f"f{i}.zip", [], code) for i, code in enumerate(codes)]
    assert overall_exit_code(reports) == expected


def test_overall_exit_code_rejects_unknown_codes() -> None:
    with pytest.raises(ValueError, match="unknown exit code"):
        overall_exit_code([FileReport("a.zip", [], 4)])


def test_file_reports_in_fixture_have_expected_codes(reports: list[FileReport]) -> None:
    assert [report.exit_code for report in reports] == [0, 3]


# ---------------------------------------------------------------------------------------------
# Summary line and table


def test_summary_line_format(reports: list[FileReport]) -> None:
    assert summary_line(reports) == "3 passed, 3 failed, 2 skipped, 2 errors"
    only_pass = [FileReport.from_results("a.zip", [_result("A001", Verdict.PASS)])]
    assert summary_line(only_pass) == "1 passed, 0 failed"
    with_error = [
        FileReport.from_results(
            "a.zip", [_result("A001", Verdict.ERROR), _result("A002", Verdict.FAIL)]
        )
    ]
    assert summary_line(with_error) == "0 passed, 1 failed, 1 errors"
    assert summary_line([]) == "0 passed, 0 failed"


def test_render_table_shows_ids_verdicts_remedies_and_summary(reports: list[FileReport]) -> None:
    console = Console(record=True, width=120, color_system=None)
    render_table(reports, console)
    text = console.export_text()
    for report in reports:
        assert report.path in text
        for result in report.results:
            assert result.check_id in text
            assert result.message in text
    for verdict in ("PASS", "FAIL", "SKIP", "ERROR"):
        assert verdict in text
    assert "remedy of DPPO002." in text
    assert "remedy of DPPO021." in text
    lines = text.rstrip("\n").splitlines()
    assert lines[-1] == "3 passed, 3 failed, 2 skipped, 2 errors"


def test_render_table_escapes_terminal_control_characters() -> None:
    hostile = "member \x1b[2J\x1b]0;owned\x07 name"
    report = FileReport.from_results(
        "a.zip", [_result("A001", Verdict.FAIL, "security", message=hostile)]
    )
    console = Console(record=True, width=120, color_system=None)
    render_table([report], console)
    text = console.export_text()
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2J" in text


# ---------------------------------------------------------------------------------------------
# JSON


def test_json_validates_against_shipped_schema(reports: list[FileReport]) -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"]
    assert schema["properties"]["schema_version"]["const"] == "1"
    document = json.loads(to_json(reports, tool_version="0.1.0", command="verify"))
    jsonschema.Draft202012Validator(schema).validate(document)
    assert document["schema_version"] == "1"
    assert document["tool"] == {"name": "dppo-ckpt", "version": "0.1.0"}
    assert document["command"] == "verify"
    assert document["summary"] == {"passed": 3, "failed": 3, "skipped": 2, "errors": 2}
    assert document["exit_code"] == 3
    assert [f["path"] for f in document["files"]] == ["ckpts/good.zip", "ckpts/old.v1.zip"]
    assert [f["exit_code"] for f in document["files"]] == [0, 3]
    bad = document["files"][1]["results"]
    assert [r["check_id"] for r in bad] == [r.check_id for r in reports[1].results]
    assert bad[1]["verdict"] == "fail" and bad[1]["remedy"] == "remedy of DPPO002."
    assert bad[1]["details"]["global"] == "os.system"
    # NaN is not JSON: it is spelled out instead of breaking strict parsers.
    assert bad[3]["details"]["ratio"] == "NaN"


def test_schema_rejects_documents_that_drift(reports: list[FileReport]) -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    document = json.loads(to_json(reports, tool_version="0.1.0", command="verify"))
    document["files"][0]["results"][0]["verdict"] = "passed"
    assert not validator.is_valid(document)
    document = json.loads(to_json(reports, tool_version="0.1.0", command="verify"))
    document["schema_version"] = "2"
    assert not validator.is_valid(document)
    document = json.loads(to_json(reports, tool_version="0.1.0", command="verify"))
    document["files"][0]["unexpected"] = True
    assert not validator.is_valid(document)


def test_schema_file_is_package_data() -> None:
    # The wheel ships every *.json under the package; the schema must sit there.
    from importlib import resources

    assert resources.files("dppo_ckpt.checkpoint").joinpath("report.schema.json").is_file()


# ---------------------------------------------------------------------------------------------
# JUnit XML


def test_junit_counts_and_cases(reports: list[FileReport]) -> None:
    root = ET.fromstring(to_junit(reports, suite_name="verify"))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures")) == ("10", "3")
    assert (root.get("errors"), root.get("skipped")) == ("2", "2")
    assert float(root.get("time")) == pytest.approx(2.5)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["ckpts/good.zip", "ckpts/old.v1.zip"]
    good, bad = suites
    assert [good.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["3", "0", "0", "1"]
    assert [bad.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["7", "3", "2", "1"]
    assert float(bad.get("time")) == pytest.approx(7 * 0.25)

    cases = bad.findall("testcase")
    assert len(cases) == 7
    assert {c.get("classname") for c in cases} == {"dppo-ckpt.verify.old_v1"}
    assert {c.get("classname") for c in good.findall("testcase")} == {"dppo-ckpt.verify.good"}
    assert cases[1].get("name") == "DPPO002 title of DPPO002"
    assert len(bad.findall("testcase/failure")) == 3
    assert len(bad.findall("testcase/error")) == 2
    assert len(bad.findall("testcase/skipped")) == 1
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    failure = cases[1].find("failure")
    assert failure.get("message") == "message of DPPO002"
    assert "remedy of DPPO002." in failure.text
    assert "remedy of DPPO021." in cases[4].find("error").text
    assert cases[6].find("skipped").get("message") == "message of DPPO030"


def test_junit_survives_hostile_text() -> None:
    message = 'name <&> "q" \x00\x1b\ufffe end'
    report = FileReport.from_results(
        "we<i>rd.zip", [_result("A001", Verdict.FAIL, "security", message=message)]
    )
    root = ET.fromstring(to_junit([report], suite_name="verify"))
    failure = root.find("testsuite/testcase/failure")
    assert failure.get("message") == 'name <&> "q" \\x00\\x1b\\ufffe end'
    assert root.find("testsuite").get("name") == "we<i>rd.zip"


# ---------------------------------------------------------------------------------------------
# SARIF


def test_sarif_structure_and_selected_results(reports: list[FileReport]) -> None:
    sarif = json.loads(to_sarif(reports, tool_version="0.1.0"))
    assert sarif["version"] == "2.1.0"
    assert "sarif" in sarif["$schema"]
    (run,) = sarif["runs"]
    driver = run["tool"]["driver"]
    assert (driver["name"], driver["version"]) == ("dppo-ckpt", "0.1.0")
    rules = driver["rules"]
    rule_ids = [rule["id"] for rule in rules]
    assert rule_ids == sorted(rule_ids)
    assert set(rule_ids) == {
        "DPPO001",
        "DPPO002",
        "DPPO003",
        "DPPO010",
        "DPPO020",
        "DPPO021",
        "DPPO030",
    }
    assert len(set(rule_ids)) == len(rule_ids)
    by_id = {rule["id"]: rule for rule in rules}
    assert by_id["DPPO002"]["shortDescription"]["text"] == "title of DPPO002"
    assert by_id["DPPO002"]["help"]["text"] == "remedy of DPPO002."
    assert by_id["DPPO002"]["name"]
    assert "help" not in by_id["DPPO001"]  # it never failed: no remedy to give

    # Only fail/error in security, legacy, archive: not statistics, lifecycle, cycle, passes.
    results = run["results"]
    assert sorted((r["ruleId"], r["properties"]["verdict"]) for r in results) == [
        ("DPPO002", "fail"),
        ("DPPO003", "error"),
        ("DPPO010", "fail"),
    ]
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        (location,) = result["locations"]
        assert location["physicalLocation"]["artifactLocation"]["uri"] == "ckpts/old.v1.zip"
        assert result["message"]["text"].startswith(f"message of {result['ruleId']}")
    levels = {r["ruleId"]: r["level"] for r in results}
    assert levels == {"DPPO002": "error", "DPPO003": "note", "DPPO010": "warning"}

    located = {r["ruleId"]: r["locations"][0].get("logicalLocations") for r in results}
    assert located["DPPO002"] == [
        {
            "name": "learning_rate",
            "fullyQualifiedName": "data::learning_rate",
            "kind": "member",
        }
    ]
    assert located["DPPO010"] == [
        {"name": "data", "fullyQualifiedName": "data", "kind": "resource"}
    ]
    assert located["DPPO003"] is None


def test_sarif_has_no_results_for_a_clean_file(reports: list[FileReport]) -> None:
    sarif = json.loads(to_sarif(reports[:1], tool_version="0.1.0"))
    assert sarif["runs"][0]["results"] == []
    assert {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]} == {
        "DPPO001",
        "DPPO002",
        "DPPO030",
    }


def test_sarif_uri_is_percent_encoded_relative_path() -> None:
    report = FileReport.from_results(
        "my runs/ckpt #1.zip", [_result("A001", Verdict.FAIL, "archive")]
    )
    sarif = json.loads(to_sarif([report], tool_version="0.1.0"))
    location = sarif["runs"][0]["results"][0]["locations"][0]
    assert location["physicalLocation"]["artifactLocation"]["uri"] == "my%20runs/ckpt%20%231.zip"


# ---------------------------------------------------------------------------------------------
# Import weight


def test_rendering_does_not_import_torch() -> None:
    code = (
        "import sys, dppo_ckpt.checkpoint.report, dppo_ckpt.checkpoint.results;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_inspect_reports_the_scalers_level_and_bound_shares() -> None:
    from dppo_ckpt.checkpoint.contents import inspect_checkpoint
    from fixtures.make_fixtures import FIXTURES_DIR

    vgs = inspect_checkpoint(FIXTURES_DIR / "dppo_quantile_vgs.zip")["vgs"]
    assert vgs["level"] is not None and vgs["level"] > 0
    assert vgs["config"]["min_scale"] <= vgs["scale_mean"] <= 1.0
    assert 0.0 <= vgs["at_min_share"] <= 1.0 and 0.0 <= vgs["at_one_share"] <= 1.0


# -- the one entry point of verify's and cycle's output ---------------------------------------


def test_render_gives_each_format_of_the_command(reports: list[FileReport]) -> None:
    from dppo_ckpt.checkpoint.report import render

    def text(fmt: str, command: str = "verify") -> str:
        return render(reports, fmt, command=command, tool_version="9.9")

    assert text("json") == to_json(reports, "9.9", "verify") + "\n"
    assert json.loads(text("json", "cycle"))["command"] == "cycle"
    assert text("junit", "cycle") == to_junit(reports, "cycle")
    assert text("sarif") == to_sarif(reports, "9.9") + "\n"
    table = text("table")
    assert "ckpts/old.v1.zip" in table and summary_line(reports) in table
    assert "\x1b" not in table and max(map(len, table.splitlines())) <= 120
    with pytest.raises(ValueError, match="unknown report format 'yaml'"):
        text("yaml")


def test_print_reports_writes_the_rendered_text(
    reports: list[FileReport], capsys: pytest.CaptureFixture[str]
) -> None:
    from dppo_ckpt.checkpoint.report import print_reports

    print_reports(reports, "junit", command="cycle", tool_version="9.9")
    assert capsys.readouterr().out == to_junit(reports, "cycle")


def test_unusable_lines_and_written_line_are_escaped() -> None:
    from dppo_ckpt.checkpoint.report import unusable_lines, written_line

    broken = FileReport.from_results(
        "x.zip", [_result("DPPO001", Verdict.FAIL, "archive", message="bad \x1b[31mname")]
    )
    fine = FileReport.from_results("y.zip", [_result("DPPO001", Verdict.PASS, "archive")])
    assert unusable_lines([fine, broken, fine]) == ["error: bad \\x1b[31mname"]
    line = written_line([fine], "out\x1b.json")
    assert line == f"{summary_line([fine])} (report written to out\\x1b.json)"


def test_inspection_json_is_ascii_and_total() -> None:
    from pathlib import Path

    from dppo_ckpt.checkpoint.report import inspection_to_json

    text = inspection_to_json({"member": "d\u00e4ta\x1b", "path": Path("a/b")})
    assert text.endswith("\n") and text.isascii()
    assert json.loads(text) == {"member": "d\u00e4ta\x1b", "path": "a/b"}
