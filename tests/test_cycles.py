"""`dppo-ckpt cycle`: passes on this package, fails by name on deliberately broken variants.

The broken variants live here, in the tests, never in the package: they patch the scaler or
the loader in-process, or in a `python -c` wrapper around the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dppo_ckpt.checkpoint.results import Verdict
from dppo_ckpt.cycles import CYCLE_CHECKS, CycleError, run_cycles
from dppo_ckpt.vgs import VarianceGradientScaler

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL_CHECK_IDS = ["DPPO008", "DPPO009", "DPPO010", "DPPO011"]
ALL_IDS = sorted(CYCLE_CHECKS) + MODEL_CHECK_IDS

# Patches `DistributionalPPO.load` so that the loaded scaler tracks detached copies of the
# parameters (the original bug), and stops the train step from relinking it.
SKIP_RELINK = """
import sys
import torch
from dppo_ckpt import ppo

_load = ppo.DistributionalPPO.load.__func__

def load(cls, *args, **kwargs):
    model = _load(cls, *args, **kwargs)
    scaler = model._variance_gradient_scaler
    scaler._parameters = [p.detach().clone().requires_grad_(True) for p in scaler._parameters]
    return model

ppo.DistributionalPPO.load = classmethod(load)
ppo.DistributionalPPO._check_parameter_links = lambda self: self._variance_gradient_scaler

from dppo_ckpt.cli import main
sys.argv = ["dppo-ckpt", *sys.argv[1:]]
main()
"""


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300
    )


def _cases(xml_text: str) -> tuple[ET.Element, dict[str, ET.Element]]:
    root = ET.fromstring(xml_text)
    cases = {case.get("name").split()[0]: case for case in root.iter("testcase")}
    return root, cases


def _by_id(report) -> dict[str, object]:
    return {result.check_id: result for result in report.results}


def test_cycle_passes_on_this_package_with_junit_report(tmp_path):
    result = _run(
        [
            sys.executable,
            "-m",
            "dppo_ckpt.cli",
            "cycle",
            "--cycles",
            "2",
            "--steps",
            "128",
            "--format",
            "junit",
            "--output",
            "cycle.xml",
        ],  # fmt: skip
        tmp_path,
    )
    report = (tmp_path / "cycle.xml").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + report
    assert result.stdout.startswith(f"{len(ALL_IDS)} passed, 0 failed")
    root, cases = _cases(report)
    assert sorted(cases) == ALL_IDS
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == (
        str(len(ALL_IDS)),
        "0",
        "0",
    )
    assert all(len(case) == 0 for case in cases.values())  # no failure, error or skip


def test_cycle_from_a_checkpoint(tmp_path):
    report = run_cycles(FIXTURES / "dppo_categorical_vgs.zip", cycles=1, steps=64)
    verdicts = {r.check_id: r.verdict for r in report.results}
    assert report.exit_code == 0, [(r.check_id, r.message) for r in report.results]
    assert sorted(verdicts) == ALL_IDS and set(verdicts.values()) == {Verdict.PASS}


def test_scaler_that_pickles_its_parameters_fails_cyc007(monkeypatch):
    def leaky_getstate(self):
        state = self.__dict__.copy()
        state.pop("_logger", None)
        return state  # keeps _parameters: the original bug

    monkeypatch.setattr(VarianceGradientScaler, "__getstate__", leaky_getstate)
    # Layout 2 never pickles the scaler (its state is vgs.pth), so the leak needs a save that
    # also puts the scaler object back into `data`, as layout 1 did.
    from dppo_ckpt.ppo import DistributionalPPO

    excluded = DistributionalPPO._excluded_save_params

    def pickle_the_scaler_too(self):
        return [name for name in excluded(self) if name != "_variance_gradient_scaler"]

    monkeypatch.setattr(DistributionalPPO, "_excluded_save_params", pickle_the_scaler_too)
    report = run_cycles(cycles=1, steps=128)
    results = _by_id(report)
    assert report.exit_code == 1
    assert results["CYC007"].verdict is Verdict.FAIL
    assert "_parameters" in results["CYC007"].message
    assert results["CYC007"].remedy


def test_factor_that_only_multiplies_grad_fails_the_gate(monkeypatch):
    def grad_only_step(self, optimizer, scale):
        # The planted regression: the factor reaches .grad, and Adam divides it out again.
        for param in self.parameters:
            if param.grad is not None:
                param.grad.mul_(scale)
        optimizer.step()

    monkeypatch.setattr(VarianceGradientScaler, "step", grad_only_step)
    report = run_cycles(cycles=1, steps=128)
    results = _by_id(report)
    assert report.exit_code == 1
    assert results["DPPO011"].verdict is Verdict.FAIL
    assert "did not move by the factor" in results["DPPO011"].message
    assert results["DPPO011"].remedy and "learning rate" in results["DPPO011"].remedy


def test_statistics_reset_on_load_fails_by_name(monkeypatch):
    original = VarianceGradientScaler.load_state_dict

    def forgetful_load_state_dict(self, state):
        original(self, state)
        self.reset_statistics()  # "fresh start" on load: warm-up skipped, statistics gone

    monkeypatch.setattr(VarianceGradientScaler, "load_state_dict", forgetful_load_state_dict)
    report = run_cycles(cycles=1, steps=128)
    failed = {r.check_id for r in report.results if r.verdict is Verdict.FAIL}
    assert report.exit_code == 1
    assert {"CYC002", "CYC005", "CYC008"} <= failed
    assert "CYC003" not in failed and "CYC006" not in failed


def test_cycle_cli_fails_naming_the_check_when_load_skips_relinking(tmp_path):
    wrapper = tmp_path / "broken_dppo_ckpt.py"
    wrapper.write_text(SKIP_RELINK)
    result = _run(
        [
            sys.executable,
            str(wrapper),
            "cycle",
            "--cycles",
            "1",
            "--steps",
            "128",
            "--format",
            "junit",
        ],  # fmt: skip
        tmp_path,
    )
    assert result.returncode == 1, result.stderr
    root, cases = _cases(result.stdout)
    failed = {check_id for check_id, case in cases.items() if case.find("failure") is not None}
    assert {"CYC006", "DPPO008"} <= failed
    assert int(root.get("failures")) == len(failed)
    assert int(root.get("tests")) == len(ALL_IDS)
    message = cases["CYC006"].find("failure").get("message")
    assert "scaler tracks 0/" in message


@pytest.mark.parametrize(
    ("fixture", "code", "expected"),
    [
        ("broken_not_a_zip.zip", 2, "not a zip archive"),
        ("hostile_data_entry.zip", 3, "refused as unsafe"),
        ("missing.zip", 2, "no such file"),
    ],
)
def test_unusable_or_unsafe_start_is_refused(fixture, code, expected):
    with pytest.raises(CycleError, match=expected) as caught:
        run_cycles(FIXTURES / fixture)
    assert caught.value.exit_code == code


def test_unsafe_start_exits_3_with_one_line(tmp_path):
    result = _run(
        [sys.executable, "-m", "dppo_ckpt.cli", "cycle", str(FIXTURES / "hostile_data_entry.zip")],
        tmp_path,
    )
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "io.open is not on the allow-list" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("MARKER_pwned*"))


def test_a_crashing_cycle_is_reported_as_errors_not_a_traceback(monkeypatch):
    from dppo_ckpt.ppo import DistributionalPPO

    def full_disk(self, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DistributionalPPO, "save", full_disk)
    report = run_cycles(cycles=1, steps=64)
    assert report.exit_code == 1
    assert sorted(r.check_id for r in report.results) == ALL_IDS
    assert {r.verdict for r in report.results} == {Verdict.ERROR}
    assert "cycle 1 stopped in save: OSError" in report.results[0].message
