"""Checkpoint layout 2: the scaler's state is a torch-saved parameter (``vgs.pth``), the layout
is recorded in ``dppo_ckpt.json``, and unknown future layouts are refused in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch as th

from dppo_ckpt import DistributionalPPO
from dppo_ckpt.checkpoint.checks import run_checks
from dppo_ckpt.checkpoint.metadata import LAYOUT_VERSION, LayoutError
from fixtures.make_fixtures import FIXTURES_DIR, rewrite_zip
from tests._models import make_env, make_model, scaler_state_bytes

LAYOUT_2 = FIXTURES_DIR / "dppo_quantile_vgs.zip"
LAYOUT_1 = FIXTURES_DIR / "dppo_layout1.zip"


def _with_layout(src: Path, dst: Path, layout: int, requires: str | None) -> Path:
    with zipfile.ZipFile(src) as archive:
        document = json.loads(archive.read("dppo_ckpt.json"))
    document["layout"] = layout
    if requires is None:
        document.pop("requires", None)
    else:
        document["requires"] = requires
    rewrite_zip(src, dst, replace={"dppo_ckpt.json": json.dumps(document).encode()})
    return dst


def test_the_fixture_is_layout_2_and_data_keeps_only_configuration():
    with zipfile.ZipFile(LAYOUT_2) as archive:
        data = json.loads(archive.read("data"))
        metadata = json.loads(archive.read("dppo_ckpt.json"))
        state = th.load(io.BytesIO(archive.read("vgs.pth")), weights_only=True)
    assert metadata["layout"] == LAYOUT_VERSION == 2
    assert "_variance_gradient_scaler" not in data
    assert {"vgs_beta", "vgs_alpha", "vgs_warmup_steps", "vgs_kwargs"} <= set(data)
    assert state["step_count"] == 8 and len(state["exp_avg"]) == 13


def test_layout_2_loads_with_a_plain_load_and_equals_layout_1_bit_for_bit():
    env = make_env()
    two = DistributionalPPO.load(LAYOUT_2, env=env, device="cpu")
    one = DistributionalPPO.load(LAYOUT_1, env=env, device="cpu")
    assert scaler_state_bytes(two) == scaler_state_bytes(one)
    scaler = two._variance_gradient_scaler
    assert [id(p) for p in scaler.parameters] == [id(p) for p in two.policy.parameters()]


def test_set_parameters_carries_the_scaler_state_without_restarting_warm_up():
    env = make_env()
    source = make_model(env)
    source.learn(256)
    assert source._variance_gradient_scaler.step_count > source.vgs_warmup_steps
    target = make_model(env, seed=123)
    assert target._variance_gradient_scaler.step_count == 0
    target.set_parameters(source.get_parameters())
    scaler = target._variance_gradient_scaler
    assert scaler.step_count == source._variance_gradient_scaler.step_count
    assert scaler_state_bytes(target) == scaler_state_bytes(source)
    # Still the target's own scaler, linked to the target's own parameters.
    assert [id(p) for p in scaler.parameters] == [id(p) for p in target.policy.parameters()]


def test_set_parameters_from_a_file_and_its_exact_match_rules(tmp_path):
    env = make_env()
    source = make_model(env)
    source.learn(128)
    source.save(tmp_path / "model.zip")
    target = make_model(env, seed=7)
    target.set_parameters(tmp_path / "model.zip", device="cpu")
    assert scaler_state_bytes(target) == scaler_state_bytes(source)
    params = source.get_parameters()
    del params["vgs"]
    with pytest.raises(ValueError, match="do not match"):
        target.set_parameters(params)
    off = make_model(env, variance_gradient_scaling=False)
    with pytest.raises(ValueError, match="scaler is off"):
        off.set_parameters(source.get_parameters())
    off.set_parameters(source.get_parameters(), exact_match=False)  # the scaler state ignored


def test_a_future_layout_is_refused_in_one_line_naming_the_release(tmp_path):
    future = _with_layout(LAYOUT_2, tmp_path / "future.zip", 3, "dppo-ckpt>=9.1")
    with pytest.raises(LayoutError) as info:
        DistributionalPPO.load(future, env=make_env())
    message = str(info.value)
    assert "\n" not in message
    assert "layout 3" in message and "dppo-ckpt>=9.1" in message
    bare = _with_layout(LAYOUT_2, tmp_path / "bare.zip", 3, None)
    with pytest.raises(LayoutError, match="needs a dppo-ckpt that reads layout 3"):
        DistributionalPPO.load(bare, env=make_env())


def test_verify_inspect_and_migrate_refuse_a_future_layout_as_unusable(tmp_path):
    future = _with_layout(LAYOUT_2, tmp_path / "future.zip", 3, "dppo-ckpt>=9.1")
    report = run_checks(future, static=True)
    assert report.exit_code == 2
    for command in (["verify", "--static"], ["inspect"], ["migrate", "--dry-run"]):
        extra = [str(tmp_path / "out.zip")] if command[0] == "migrate" else []
        run = subprocess.run(
            [sys.executable, "-m", "dppo_ckpt.cli", *command, str(future), *extra],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert run.returncode == 2, (command, run.stdout, run.stderr)
        output = run.stdout + run.stderr
        assert "Traceback" not in output
        assert "dppo-ckpt>=9.1" in output, (command, output)


def test_verify_names_the_layout_and_migrate_for_layout_1():
    results = {r.check_id: r for r in run_checks(LAYOUT_1, static=True).results}
    assert results["DPPO005"].verdict.value == "pass"
    assert "layout 1" in results["DPPO005"].message
    assert "dppo-ckpt migrate" in results["DPPO005"].message
    results = {r.check_id: r for r in run_checks(LAYOUT_2, static=True).results}
    assert results["DPPO005"].verdict.value == "pass"
    assert "layout 2" in results["DPPO005"].message and "vgs.pth" in results["DPPO005"].message


def test_layout_2_without_its_scaler_member_fails_the_legacy_check(tmp_path):
    broken = tmp_path / "no_vgs.zip"
    rewrite_zip(LAYOUT_2, broken, drop={"vgs.pth"})
    results = {r.check_id: r for r in run_checks(broken, static=True).results}
    assert results["DPPO005"].verdict.value == "fail"
    assert "no vgs.pth" in results["DPPO005"].message


# -- DPPO010 on layout 2, through the command line ---------------------------------------------

# A planted regression, loaded into every process of the run (the verify children are forked
# from a server of their own): the scaler forgets its statistics as it loads them.
FORGETFUL_LOAD = """\
from dppo_ckpt.vgs import VarianceGradientScaler

_load_state_dict = VarianceGradientScaler.load_state_dict


def _forgetful(self, state):
    _load_state_dict(self, state)
    self.reset_statistics()


VarianceGradientScaler.load_state_dict = _forgetful
"""


def _verify(path: Path, cwd: Path, shim: Path | None = None) -> tuple[int, dict[str, dict]]:
    """``dppo-ckpt verify --format json PATH``: its exit code and its results by check."""
    root = Path(__file__).resolve().parent.parent
    parts = [str(shim)] if shim is not None else []
    parts += [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    run = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", "verify", "--format", "json", str(path)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(parts)},
    )  # fmt: skip
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    (report,) = json.loads(run.stdout)["files"]
    return run.returncode, {r["check_id"]: r for r in report["results"]}


def _float64_statistics(dst: Path, *, with_entry: bool) -> Path:
    """Layout 2 whose ``vgs.pth`` holds the statistics in float64: the load casts them to the
    parameters' float32, so they do not survive it bit for bit. ``with_entry`` also puts the
    scaler, as the load ends up with it, into ``data`` (the layout-1 entry)."""
    with zipfile.ZipFile(LAYOUT_2) as archive:
        state = th.load(io.BytesIO(archive.read("vgs.pth")), weights_only=True)
        data = json.loads(archive.read("data"))
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = [buffer.double() for buffer in state[key]]
    buffer = io.BytesIO()
    th.save(state, buffer)
    replace = {"vgs.pth": buffer.getvalue()}
    if with_entry:
        with zipfile.ZipFile(LAYOUT_1) as archive:
            entry = json.loads(archive.read("data"))["_variance_gradient_scaler"]
        replace["data"] = json.dumps({**data, "_variance_gradient_scaler": entry}).encode()
    rewrite_zip(LAYOUT_2, dst, replace=replace)
    return dst


def test_verify_fails_dppo010_when_the_load_loses_layout_2_statistics(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FORGETFUL_LOAD)
    code, results = _verify(LAYOUT_2, tmp_path, shim)
    assert code == 1
    assert results["DPPO010"]["verdict"] == "fail", results["DPPO010"]
    assert results["DPPO010"]["details"]["difference"] == "step_count"
    assert "stored step 8, loaded step 0" in results["DPPO010"]["message"]
    for check_id in ("DPPO005", "DPPO007", "DPPO008", "DPPO009"):
        assert results[check_id]["verdict"] == "pass", results[check_id]
    # Without the regression the same file passes: the failure is the lost statistics.
    code, results = _verify(LAYOUT_2, tmp_path)
    assert code == 0 and results["DPPO010"]["verdict"] == "pass"


@pytest.mark.parametrize("with_entry", [False, True], ids=["vgs.pth", "vgs.pth-and-entry"])
def test_verify_fails_dppo010_when_vgs_pth_differs_from_the_loaded_scaler(tmp_path, with_entry):
    path = _float64_statistics(tmp_path / "float64.zip", with_entry=with_entry)
    model = DistributionalPPO.load(path, env=make_env(), device="cpu")
    live = model._variance_gradient_scaler.state_dict()
    assert live["exp_avg"][0].dtype == th.float32  # the load did not keep what vgs.pth holds
    code, results = _verify(path, tmp_path)
    assert code == 1
    assert results["DPPO010"]["verdict"] == "fail", results["DPPO010"]
    assert results["DPPO010"]["details"]["difference"] == "exp_avg[0]"
    assert results["DPPO007"]["verdict"] == "pass"
