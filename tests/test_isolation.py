"""Load checks run one file per child: a crash or an overrun is that file's verdict only."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from dppo_ckpt.checkpoint.isolation import crash_report, run_isolated, run_many_isolated
from fixtures.make_fixtures import FIXTURES_DIR
from tests._crash import check_or_crash

GOOD = FIXTURES_DIR / "dppo_quantile_vgs.zip"


def _reports(paths: list[str], jobs: int, timeout: float = 300.0) -> list:
    check = functools.partial(check_or_crash, quick=True)
    outcomes = run_many_isolated(check, [(p,) for p in paths], jobs=jobs, timeout=timeout)
    return [
        o.value if o.ok else crash_report(p, o, timeout)
        for p, o in zip(paths, outcomes, strict=True)
    ]


def test_one_crashing_file_among_good_ones_keeps_every_verdict(tmp_path: Path) -> None:
    paths = []
    for name in ("good1.zip", "crash.zip", "good2.zip", "good3.zip"):
        shutil.copy(GOOD, tmp_path / name)
        paths.append(str(tmp_path / name))
    reports = _reports(paths, jobs=2)
    assert [r.path for r in reports] == paths
    assert [r.exit_code for r in reports] == [0, 3, 0, 0]
    crashed = reports[1].results[0]
    assert crashed.check_id == "DPPO007"
    assert "SIGSEGV" in crashed.message and "\n" not in crashed.message


def test_a_child_past_its_deadline_is_stopped_and_names_the_budget(tmp_path: Path) -> None:
    shutil.copy(GOOD, tmp_path / "hang.zip")
    (report,) = _reports([str(tmp_path / "hang.zip")], jobs=1, timeout=3.0)
    assert report.exit_code == 2
    assert "budget timeout exceeded" in report.results[0].message


def test_a_failing_function_reports_its_error_in_one_line() -> None:
    outcome = run_isolated(int, "not a number", timeout=60.0)
    assert not outcome.ok and outcome.signal_name is None
    assert "ValueError" in (outcome.error or "")


def test_the_load_probe_passes_good_and_refused_files_back_to_the_caller() -> None:
    from dppo_ckpt.checkpoint.isolation import probe_load

    # Only a crash or an overrun is the probe's to report; refusals are the caller's own.
    assert probe_load(str(GOOD), trust=False) is None
    assert probe_load(str(FIXTURES_DIR / "hostile_data_entry.zip"), trust=False) is None


def test_a_prestarted_fork_server_is_the_one_children_come_from() -> None:
    import multiprocessing.forkserver
    import os

    from dppo_ckpt.checkpoint.isolation import prestart

    prestart()
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    assert server is not None
    outcome = run_isolated(os.getppid, timeout=120.0)
    assert outcome.ok and outcome.value == server
    prestart()  # a second call keeps the running server
    assert multiprocessing.forkserver._forkserver._forkserver_pid == server
