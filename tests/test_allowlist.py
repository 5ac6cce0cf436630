"""The user's allow-list: exact pairs only, never code, listed in every report."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from rich.console import Console

from dppo_ckpt.checkpoint.allowlist import AllowListError, user_allow_list
from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.checkpoint.report import render_table, to_json, to_junit
from tests._models import make_model
from tests.zoo_schedules import SimpleLinearSchedule

ROOT = Path(__file__).resolve().parents[1]
ZOO = "tests.zoo_schedules.SimpleLinearSchedule"


@pytest.fixture(scope="module")
def zoo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zoo") / "zoo.zip"
    make_model(learning_rate=SimpleLinearSchedule(1e-3, 1e-4)).save(path)
    return path


def _codes(report) -> dict[str, str]:
    return {r.check_id: r.verdict.value for r in report.results}


def test_a_zoo_schedule_is_refused_without_allow_and_passes_with_it(
    zoo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above a scratch folder
    refused = run_checks(zoo_checkpoint, quick=True, allow=user_allow_list())
    assert refused.exit_code == 3
    assert ZOO in next(r.message for r in refused.results if r.check_id == "DPPO004")
    allowed = run_checks(zoo_checkpoint, quick=True, allow=user_allow_list([ZOO]))
    assert allowed.exit_code == 0, [(r.check_id, r.message) for r in allowed.results]
    dppo004 = next(r for r in allowed.results if r.check_id == "DPPO004")
    assert dppo004.details["extra_allow"] == [ZOO]
    assert ZOO in dppo004.message


@pytest.mark.parametrize(
    "entry",
    ["tests.zoo_schedules.Simple", "tests.SimpleLinearSchedule",
     "tests.zoo_schedules.SimpleLinearScheduleX"],
)  # fmt: skip
def test_allow_never_admits_a_pair_it_does_not_name(
    zoo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    monkeypatch.chdir(tmp_path)
    report = run_checks(zoo_checkpoint, static=True, allow=user_allow_list([entry]))
    assert report.exit_code == 3


@pytest.mark.parametrize(
    "entry", ["os.system", "builtins.eval", "subprocess.Popen", "importlib.import_module",
              "pkgutil.resolve_name", "numpy.*", "mymod", "a.b.__reduce__",
              "json.__main__.X", "pkg.__init__.Name"],
)  # fmt: skip
def test_code_running_or_malformed_entries_are_an_error_of_their_own(entry: str) -> None:
    with pytest.raises(AllowListError):
        user_allow_list([entry])


def test_reading_the_list_imports_nothing_it_names(
    zoo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that announces its import: naming it in the list must not run it.
    (tmp_path / "announcer.py").write_text(
        "import pathlib\npathlib.Path('IMPORTED').touch()\nclass Thing:\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    allow = user_allow_list(["announcer.Thing"])
    report = run_checks(zoo_checkpoint, static=True, allow=allow)
    assert report.exit_code == 3  # the zoo schedule is still not allowed
    assert not (tmp_path / "IMPORTED").exists()
    assert "announcer" not in sys.modules


def _pickled_value(module: str, name: str) -> bytes:
    """A protocol-2 pickle whose value is the global ``module.name`` itself."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


@pytest.mark.parametrize(
    "entry",
    # a function, a module, and a class of a code module re-exported elsewhere
    ["time.sleep", "json.decoder", "tests._hostile.Path"],
)
def test_an_entry_that_is_not_a_class_is_refused_where_the_file_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    from tests._hostile import BASE, _serialized

    monkeypatch.chdir(tmp_path)
    module, _, name = entry.rpartition(".")
    path = tmp_path / "schedule.zip"
    with zipfile.ZipFile(BASE) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == "data":
                doc = json.loads(body)
                doc["learning_rate"] = _serialized(_pickled_value(module, name))
                body = json.dumps(doc).encode()
            dst.writestr(info, body)
    allow = user_allow_list([entry])
    report = run_checks(path, quick=True, allow=allow)
    assert report.exit_code == 3, [(r.check_id, r.message) for r in report.results]
    dppo007 = next(r for r in report.results if r.check_id == "DPPO007")
    assert "not a class" in dppo007.message or "run or reach code" in dppo007.message


def test_the_nearest_pyproject_list_is_used_and_named_in_the_report(
    zoo_checkpoint: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text(f'[tool.dppo-ckpt]\nallow = ["{ZOO}"]\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "verify", "--quick", "-f", "json",
         str(zoo_checkpoint)],
        capture_output=True, text=True, cwd=project / "sub", env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    results = json.loads(run.stdout)["files"][0]["results"]
    dppo004 = next(r for r in results if r["check_id"] == "DPPO004")
    assert dppo004["details"]["allow_source"] == str(project / "pyproject.toml")
    bad = project / "pyproject.toml"
    bad.write_text('[tool.dppo-ckpt]\nallow = ["os.system"]\n')
    run = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "verify", "--static", str(zoo_checkpoint)],
        capture_output=True, text=True, cwd=project, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 2 and "os.system" in run.stderr
    assert "Traceback" not in run.stderr


def test_cycle_loads_a_zoo_checkpoint_with_allow_and_refuses_it_without(
    zoo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dppo_ckpt.cycles import CycleError, run_cycles

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CycleError) as refused:
        run_cycles(zoo_checkpoint, cycles=1, steps=64, allow=user_allow_list())
    assert refused.value.exit_code == 3 and ZOO in str(refused.value)
    report = run_cycles(zoo_checkpoint, cycles=1, steps=64, allow=user_allow_list([ZOO]))
    assert report.path == str(zoo_checkpoint)
    assert "refused" not in " ".join(r.message for r in report.results)
    # Every format names the extra entries the start was loaded with.
    assert report.notes == (f"extra allow entries {ZOO} from --allow",)
    assert all(r.details["extra_allow"] == [ZOO] for r in report.results)
    buffer = io.StringIO()
    render_table([report], Console(file=buffer, width=80, color_system=None))
    assert f"extra allow entries {ZOO}" in " ".join(buffer.getvalue().split())
    assert f'name="note" value="extra allow entries {ZOO} from --allow"' in to_junit(
        [report], "cycle"
    )
    document = json.loads(to_json([report], "0", "cycle"))
    assert document["files"][0]["results"][0]["details"]["extra_allow"] == [ZOO]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"activation_fn": __import__("torch").nn.GELU},
        {"activation_fn": __import__("torch").nn.LeakyReLU},
        {"optimizer_class": __import__("torch").optim.AdamW},
    ],
)
def test_sb3_and_torch_classes_given_as_policy_kwargs_pass(
    kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.zip"
    make_model(policy_kwargs=kwargs).save(path)
    report = run_checks(path, quick=True, allow=user_allow_list())
    assert report.exit_code == 0, [(r.check_id, r.message) for r in report.results if r.message]
