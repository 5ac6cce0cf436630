"""`dppo-ckpt verify` and `dppo-ckpt inspect` through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from dppo_ckpt.checkpoint.checks import CHECKS
from dppo_ckpt.checkpoint.report import json_schema
from dppo_ckpt.cli import app
from tests._verdicts import EXPECTED, fixture, markers


def dppo_ckpt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the command line in ``cwd`` (a scratch folder where markers would appear)."""
    return subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(autouse=True)
def _no_payload_ran(tmp_path: Path) -> object:
    yield
    assert markers(tmp_path) == []


def _no_traceback(run: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in run.stderr + run.stdout


# -- verdicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_static_exit_codes(name: str, tmp_path: Path) -> None:
    run = dppo_ckpt("verify", "--static", str(fixture(name)), cwd=tmp_path)
    _no_traceback(run)
    assert run.returncode == EXPECTED[name][0], run.stdout + run.stderr
    assert (
        run.stdout.rstrip().splitlines()[-1].startswith(tuple(f"{n} passed, " for n in range(13)))
    )


def test_full_run_over_every_fixture(tmp_path: Path) -> None:
    names = sorted(EXPECTED)
    out = tmp_path / "report.json"
    run = dppo_ckpt(
        "verify",
        "--quick",
        "-f",
        "json",
        "-o",
        str(out),
        *map(str, map(fixture, names)),
        cwd=tmp_path,
    )
    _no_traceback(run)
    assert run.returncode == 3  # the worst outcome wins: some fixtures are hostile
    document = json.loads(out.read_text())
    jsonschema.validate(document, json_schema())
    assert document["exit_code"] == 3
    for name, entry in zip(names, document["files"], strict=True):
        code, failing = EXPECTED[name]
        assert entry["path"] == str(fixture(name))
        assert entry["exit_code"] == code, name
        failed = {r["check_id"] for r in entry["results"] if r["verdict"] in ("fail", "error")}
        assert failed == set(failing), name
    assert run.stdout.strip().endswith(f"(report written to {out})")


def test_each_exit_code_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process: the exit codes of the interpreter are covered above and below; here
    # each verdict alone decides the code, and one process spares three torch imports.
    monkeypatch.chdir(tmp_path)
    for name, code in [
        ("dppo_quantile_vgs.zip", 0),
        ("dppo_legacy.zip", 1),
        ("broken_truncated.zip", 2),
        ("hostile_policy_pth.zip", 3),
    ]:
        run = CliRunner().invoke(app, ["verify", "--quick", str(fixture(name))])
        assert run.exception is None or isinstance(run.exception, SystemExit), run.exc_info
        assert "Traceback" not in run.stdout + run.stderr
        assert run.exit_code == code, name


def test_table_shows_ids_remedy_and_summary(tmp_path: Path) -> None:
    run = dppo_ckpt("verify", "--static", str(fixture("dppo_legacy.zip")), cwd=tmp_path)
    assert run.returncode == 1
    for check_id in CHECKS:
        assert check_id in run.stdout
    assert "dppo-ckpt migrate" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1] == "5 passed, 1 failed, 6 skipped"


def test_missing_and_not_a_checkpoint_exit_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.zip").write_text("hello")
    for name, reason in [("missing.zip", "no such file"), ("notes.zip", "not a zip archive")]:
        run = dppo_ckpt("verify", name, cwd=tmp_path)
        _no_traceback(run)
        assert run.returncode == 2
        assert run.stderr.strip() == f"error: {name}: {reason}"


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (["verify"], ["verify", "--format", "xml", "x.zip"], ["verify", "-j", "0", "x"]):
        run = dppo_ckpt(*args, cwd=tmp_path)
        _no_traceback(run)
        assert run.returncode == 2, args


# -- formats ----------------------------------------------------------------------------------


def test_json_to_stdout_validates(tmp_path: Path) -> None:
    paths = [str(fixture("dppo_legacy.zip")), str(fixture("hostile_nested_blob.zip"))]
    run = dppo_ckpt("verify", "--static", "-f", "json", *paths, cwd=tmp_path)
    document = json.loads(run.stdout)
    jsonschema.validate(document, json_schema())
    assert [f["exit_code"] for f in document["files"]] == [1, 3]
    assert run.returncode == document["exit_code"] == 3


def test_junit_counts(tmp_path: Path) -> None:
    paths = [str(fixture(n)) for n in ("dppo_legacy.zip", "hostile_data_entry.zip")]
    run = dppo_ckpt("verify", "--static", "-f", "junit", *paths, cwd=tmp_path)
    assert run.returncode == 3
    root = ET.fromstring(run.stdout.encode())
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("24", "2", "0")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == paths
    assert [(s.get("failures"), s.get("skipped")) for s in suites] == [("1", "6"), ("1", "6")]
    failure = suites[1].find("testcase/failure")
    assert failure is not None and failure.get("type") == "security"


def test_sarif_lists_security_finding(tmp_path: Path) -> None:
    path = str(fixture("hostile_optimizer_pth.zip"))
    run = dppo_ckpt("verify", "--static", "-f", "sarif", path, cwd=tmp_path)
    document = json.loads(run.stdout)
    results = document["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["DPPO004"]
    logical = results[0]["locations"][0]["logicalLocations"][0]
    assert logical["name"] == "policy.optimizer.pth"


def test_output_is_written_atomically(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "verify.xml"
    out.parent.mkdir()
    out.write_text("old")
    run = dppo_ckpt(
        "verify",
        "--static",
        "-f",
        "junit",
        "-o",
        str(out),
        str(fixture("sb3_ppo.zip")),
        cwd=tmp_path,
    )
    assert run.returncode == 0
    ET.fromstring(out.read_bytes())
    assert sorted(p.name for p in out.parent.iterdir()) == ["verify.xml"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    unwritable = dppo_ckpt("verify", "--static", "-o", "no/such/dir/r.txt", "x.zip", cwd=tmp_path)
    _no_traceback(unwritable)
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr


def test_jobs_keep_input_order(tmp_path: Path) -> None:
    names = ["broken_bitflip.zip", "dppo_vgs_off.zip", "dppo_legacy.zip"]
    run = dppo_ckpt(
        "verify",
        "--quick",
        "-j",
        "2",
        "-f",
        "json",
        *[str(fixture(n)) for n in names],
        cwd=tmp_path,
    )
    _no_traceback(run)
    document = json.loads(run.stdout)
    assert [f["path"] for f in document["files"]] == [str(fixture(n)) for n in names]
    assert [f["exit_code"] for f in document["files"]] == [2, 0, 1]
    assert run.returncode == 2


# -- inspect ----------------------------------------------------------------------------------


def _inspect_json(name: str, cwd: Path) -> dict:
    run = dppo_ckpt("inspect", "-f", "json", str(fixture(name)), cwd=cwd)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_inspect_describes_a_checkpoint(tmp_path: Path) -> None:
    info = _inspect_json("dppo_quantile_vgs.zip", tmp_path)
    assert [m["name"] for m in info["members"]][:1] == ["data"]
    assert info["algorithm"] == "DistributionalPPO"
    assert info["policy_class"] == "dppo_ckpt.policy.CustomActorCriticPolicy"
    assert info["versions"]["stable_baselines3"] == "2.9.2"
    assert info["versions"]["torch"] and info["versions"]["python"]
    assert info["hyperparameters"]["n_steps"] == 64
    assert info["vgs"]["step_count"] == 8
    assert info["vgs"]["config"]["warmup_steps"] == 3
    assert info["vgs"]["tensors"] == 13 and info["vgs"]["elements"] == 1234
    vgs = info["vgs"]
    assert vgs["state_version"] == 2 and "level_beta" in vgs["config"]
    assert vgs["level"] > 0 and vgs["updates_after_warmup"] == 5  # 8 updates, warm-up 3
    assert 0 <= vgs["at_min_share"] <= 1 and 0 <= vgs["at_one_share"] <= 1
    assert 0 < vgs["scale_mean"] <= 1
    assert info["legacy"] is False and info["safe"] is True
    # Layout 2: the scaler's state dict is the tensor member vgs.pth, no pickled object.
    assert info["layout"] == 2 and any(m["name"] == "vgs.pth" for m in info["members"])
    in_vgs = {g["global"] for g in info["globals"] if g["member"] == "vgs.pth"}
    assert in_vgs == {
        "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "collections.OrderedDict"
    }
    assert "dppo_ckpt.vgs.VarianceGradientScaler" not in {g["global"] for g in info["globals"]}


def test_inspect_describes_both_layouts_alike(tmp_path: Path) -> None:
    two = _inspect_json("dppo_quantile_vgs.zip", tmp_path)
    one = _inspect_json("dppo_layout1.zip", tmp_path)
    assert one["layout"] == 1 and "vgs.pth" not in [m["name"] for m in one["members"]]
    assert {"dppo_ckpt.vgs.VarianceGradientScaler", "torch.storage._load_from_bytes"} <= {
        g["global"] for g in one["globals"]
    }
    # The same seeded run in either layout: the same scaler, described the same way.
    assert {k: v for k, v in one["vgs"].items() if k != "class"} == {
        k: v for k, v in two["vgs"].items() if k != "class"
    }


def test_inspect_legacy_plain_and_hostile(tmp_path: Path) -> None:
    legacy = _inspect_json("dppo_legacy.zip", tmp_path)
    assert legacy["legacy"] is True
    assert legacy["vgs"]["state_version"] == 1 and "variance_cap" in legacy["vgs"]["config"]
    assert legacy["vgs"]["level"] is None and legacy["vgs"]["at_min_share"] is None
    plain = _inspect_json("sb3_ppo.zip", tmp_path)
    assert (plain["algorithm"], plain["vgs"]) == ("PPO", None)
    for name in ("hostile_data_entry.zip", "hostile_code_by_value.zip", "hostile_nested_blob.zip"):
        info = _inspect_json(name, tmp_path)
        assert info["safe"] is False
        assert any(g["verdict"] != "allowed" for g in info["globals"]), name


def test_inspect_table_and_broken_files(tmp_path: Path) -> None:
    run = dppo_ckpt("inspect", str(fixture("hostile_policy_pth.zip")), cwd=tmp_path)
    assert run.returncode == 0
    assert "io.open" in run.stdout and "not allowed" in run.stdout
    table = dppo_ckpt("inspect", str(fixture("dppo_quantile_vgs.zip")), cwd=tmp_path).stdout
    for row in ("level", "share at min_scale", "share at 1", "mean factor"):
        assert row in table, row
    legacy = dppo_ckpt("inspect", str(fixture("dppo_legacy.zip")), cwd=tmp_path).stdout
    assert "migrate" in legacy and "n/a" in legacy
    broken = dppo_ckpt("inspect", str(fixture("broken_dotdot.zip")), cwd=tmp_path)
    _no_traceback(broken)
    assert broken.returncode == 2 and "'..'" in broken.stderr


def test_inspect_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from dppo_ckpt.cli import app\n"
        "for name in sys.argv[1:]:\n"
        "    app(['inspect', '-f', 'json', name], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    names = ["dppo_quantile_vgs.zip", "dppo_legacy.zip", "hostile_nested_blob.zip"]
    run = subprocess.run(
        [sys.executable, "-c", code, *[str(fixture(n)) for n in names]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
