"""The check registry: one declaration per check, the run order, the README's tables, and
imports that point one way (registry <- check modules <- runners)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dppo_ckpt.checkpoint.checks import CHECKS, MODEL_CHECK_IDS, run_checks
from dppo_ckpt.checkpoint.registry import CYCLE, VERIFY, Registry, markdown_table, marked_table
from dppo_ckpt.checkpoint.results import Severity, Verdict
from dppo_ckpt.cycles import CYCLE_CHECKS
from tests._verdicts import fixture

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REGENERATE = "python -m dppo_ckpt.checkpoint.registry --write README.md"


def _run_module(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.checkpoint.registry", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip


# -- the README -------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", [VERIFY, CYCLE], ids=lambda r: r.name)
def test_readme_table_is_the_registrys(suite: Registry) -> None:
    table = marked_table(README.read_text("utf-8"), suite)
    assert table is not None, f"README.md has no table of {suite.name} checks; run `{REGENERATE}`"
    assert table == markdown_table(suite), (
        f"README.md's table of {suite.name} checks differs from the registry; "
        f"regenerate it with `{REGENERATE}`"
    )


def test_markdown_command_prints_the_registrys_tables() -> None:
    # Run as __main__, the module must still read the registry the checks declared into.
    for name, suite in (("verify", VERIFY), ("cycle", CYCLE)):
        run = _run_module("--markdown", name)
        assert run.returncode == 0, run.stderr
        assert run.stdout == markdown_table(suite)
        assert run.stderr == ""


def test_write_renders_a_stale_table_again(tmp_path: Path) -> None:
    text = README.read_text("utf-8")
    stale = text.replace("| DPPO004 | Nothing unsafe inside", "| DPPO004 | Nothing much inside")
    assert stale != text
    copy = tmp_path / "README.md"
    copy.write_text(stale, "utf-8")
    run = _run_module("--write", str(copy))
    assert run.returncode == 0, run.stderr
    assert "rendered again" in run.stdout
    assert copy.read_text("utf-8") == text
    again = _run_module("--write", str(copy))
    assert (again.returncode, again.stdout.strip()) == (0, f"{copy}: tables up to date")


def test_write_without_markers_is_a_one_line_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.md"
    plain.write_text("# no tables here\n", "utf-8")
    run = _run_module("--write", str(plain))
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "checks:verify" in run.stderr
    assert plain.read_text("utf-8") == "# no tables here\n"


def test_table_cells_come_from_the_declarations() -> None:
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown_table(VERIFY).splitlines()}
    # The exit code column follows the category's rule unless the check says more.
    assert rows["DPPO004"].endswith("| security | exit 3 |")
    assert rows["DPPO001"].endswith("| archive | exit 2 |")
    assert rows["DPPO009"].endswith("| lifecycle | exit 1 |")
    assert "`dppo-ckpt migrate OLD.zip NEW.zip`" in rows["DPPO005"]
    assert f"| {VERIFY['DPPO011'].title} ({VERIFY['DPPO011'].summary}) |" in rows["DPPO011"]


# -- declarations and order -------------------------------------------------------------------


def test_every_check_is_declared_once_with_its_function() -> None:
    assert list(CHECKS) == [f"DPPO{n:03d}" for n in range(1, 13)]
    assert list(CYCLE_CHECKS) == [f"CYC{n:03d}" for n in range(1, 9)]
    assert CHECKS is VERIFY and CYCLE_CHECKS is CYCLE
    for spec in [*VERIFY.values(), *CYCLE.values()]:
        assert callable(spec.fn), spec.check_id
        assert spec.title and spec.remedy, spec.check_id
    for spec in VERIFY.values():
        # The verify checks say in their docstring which ID they are.
        assert (spec.fn.__doc__ or "").startswith(f"{spec.check_id}:"), spec.check_id
    assert MODEL_CHECK_IDS == ("DPPO008", "DPPO009", "DPPO010", "DPPO011")


def test_the_report_runs_in_registry_order() -> None:
    report = run_checks(fixture("dppo_legacy.zip"), static=True)
    assert [r.check_id for r in report.results] == list(VERIFY)
    assert [r.title for r in report.results] == [spec.title for spec in VERIFY.values()]


def test_order_is_by_stage_then_id_whatever_the_declaration_order() -> None:
    suite = Registry("demo", "DEMO", ("first", "second"))

    def declare(check_id: str, stage: str) -> None:
        suite.check(check_id, title=check_id, category="lifecycle", remedy="r", stage=stage)(
            lambda: None
        )

    declare("DEMO003", "second")
    declare("DEMO002", "first")
    declare("DEMO004", "first")
    declare("DEMO001", "second")
    assert list(suite) == ["DEMO002", "DEMO004", "DEMO001", "DEMO003"]
    assert [spec.check_id for spec in suite.in_stage("second")] == ["DEMO001", "DEMO003"]


def test_the_decorator_returns_the_function_and_declares_it() -> None:
    suite = Registry("demo", "DEMO", ("only",))

    @suite.check(
        "DEMO001", title="Demo", category="legacy", remedy="Fix it.", stage="only",
        severity=Severity.WARNING, summary="a demo", on_failure="exit 9", passed="fine",
    )  # fmt: skip
    def demo(value: int) -> int:
        return value + 1

    spec = suite["DEMO001"]
    assert demo(1) == 2 and spec.fn is demo and spec(2) == 3
    assert (spec.category, spec.severity, spec.summary) == ("legacy", Severity.WARNING, "a demo")
    assert spec.options == {"passed": "fine"}
    failed = spec.failed("broken\nover two lines")
    assert (failed.verdict, failed.message, failed.remedy) == (
        Verdict.FAIL, "broken over two lines", "Fix it.",
    )  # fmt: skip
    assert spec.passed("ok").remedy is None


def test_run_turns_an_exception_into_an_error_result() -> None:
    suite = Registry("demo", "DEMO", ("only",))

    @suite.check("DEMO001", title="Demo", category="lifecycle", remedy="r", stage="only")
    def boom() -> None:
        raise KeyError("nowhere")

    result = suite["DEMO001"].run()
    assert result.verdict is Verdict.ERROR
    assert result.message == "KeyError: 'nowhere'"
    assert result.duration_s >= 0.0


@pytest.mark.parametrize(
    ("check_id", "stage", "category", "reason"),
    [
        ("OTHER001", "only", "lifecycle", "start with DEMO"),
        ("DEMO001", "nowhere", "lifecycle", "unknown stage"),
        ("DEMO001", "only", "made-up", "unknown category"),
    ],
)
def test_bad_declarations_are_refused(
    check_id: str, stage: str, category: str, reason: str
) -> None:
    suite = Registry("demo", "DEMO", ("only",))
    with pytest.raises(ValueError, match=reason):
        suite.check(check_id, title="t", category=category, remedy="r", stage=stage)(print)
    assert len(suite) == 0


def test_a_stage_can_require_options() -> None:
    suite = Registry("demo", "DEMO", ("only",), required={"only": ("passed",)})
    with pytest.raises(ValueError, match="DEMO001: a only check declares passed"):
        suite.check("DEMO001", title="t", category="cycle", remedy="r", stage="only")(print)
    suite.check("DEMO001", title="t", category="cycle", remedy="r", stage="only", passed="ok")(
        print
    )
    assert suite["DEMO001"].options == {"passed": "ok"}
    assert all("passed" in spec.options for spec in CYCLE.in_stage("cycle"))


def test_an_id_cannot_be_declared_twice() -> None:
    suite = Registry("demo", "DEMO", ("only",))
    declare = suite.check("DEMO001", title="t", category="lifecycle", remedy="r", stage="only")
    declare(print)
    with pytest.raises(ValueError, match="declared twice"):
        suite.check("DEMO001", title="u", category="lifecycle", remedy="r", stage="only")(repr)
    assert suite["DEMO001"].fn is print


# -- imports point one way --------------------------------------------------------------------


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imports_point_one_way() -> None:
    package = ROOT / "dppo_ckpt" / "checkpoint"
    runners = {"dppo_ckpt.checkpoint.checks", "dppo_ckpt.cycles"}
    check_modules = {"dppo_ckpt.checkpoint.static_checks", "dppo_ckpt.checkpoint.model_checks"}
    assert not _imported(package / "registry.py") & (runners | check_modules)
    assert not _imported(package / "context.py") & (runners | check_modules)
    for name in ("static_checks.py", "model_checks.py"):
        assert not _imported(package / name) & runners, name
    assert "dppo_ckpt.checkpoint.model_checks" not in _imported(package / "static_checks.py")

