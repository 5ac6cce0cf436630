"""The verification checks: documented verdicts, no payload ever runs, the gradient probe
leaves no trace, every failure is a result (never a traceback), random damage is handled."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dppo_ckpt.checkpoint import static_checks
from dppo_ckpt.checkpoint.checks import (
    CHECKS,
    model_checks,
    refused_without_loading,
    run_checks,
)
from dppo_ckpt.checkpoint.results import CATEGORIES, Verdict
from dppo_ckpt.checkpoint.safe_pickle import safe_load
from tests._models import make_model, optimizer_state_bytes, parameters_bytes, scaler_state_bytes
from tests._verdicts import EXPECTED, fixture, markers

torch.set_num_threads(1)

CI = bool(os.environ.get("CI"))
STATIC_EXAMPLES = 500 if CI else 40
LOAD_EXAMPLES = 40 if CI else 6


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs in an empty folder; a payload that ran would leave a marker there."""
    monkeypatch.chdir(tmp_path)
    yield
    assert markers(tmp_path) == []


def _failing(report: Any) -> set[str]:
    return {r.check_id for r in report.results if r.verdict in (Verdict.FAIL, Verdict.ERROR)}


# -- the documented verdicts ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_static_verdicts(name: str) -> None:
    code, failing = EXPECTED[name]
    report = run_checks(fixture(name), static=True)
    assert (report.exit_code, _failing(report)) == (code, set(failing))
    assert [r.check_id for r in report.results] == list(CHECKS)
    if report.exit_code != 2:
        load = [r for r in report.results if r.check_id >= "DPPO007"]
        assert all(r.verdict is Verdict.SKIP for r in load)
        assert all("--static" in r.message or "unsafe" in r.message for r in load)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_verdicts(name: str) -> None:
    code, failing = EXPECTED[name]
    report = run_checks(fixture(name), quick=True)
    assert (report.exit_code, _failing(report)) == (code, set(failing))
    verdicts = {r.check_id: r.verdict for r in report.results}
    if code in (0, 1):
        assert verdicts["DPPO007"] is Verdict.PASS
    if name.startswith("dppo_") and name != "dppo_vgs_off.zip":
        for check_id in ("DPPO008", "DPPO009", "DPPO010", "DPPO011"):
            assert verdicts[check_id] is Verdict.PASS, check_id


def _without_durations(report: Any) -> Any:
    return [dataclasses.replace(r, duration_s=0.0) for r in report.results], report.exit_code


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_file_refused_statically_gets_its_full_report_without_a_second_reading(
    name: str,
) -> None:
    static = run_checks(fixture(name), static=True)
    refused = refused_without_loading(static)
    if static.exit_code != 3:
        assert refused is None
        return
    assert refused is not None
    full = run_checks(fixture(name))
    assert _without_durations(refused) == _without_durations(full)
    assert refused.path == full.path and refused.notes == full.notes


def test_results_are_one_line_with_a_remedy_on_failure() -> None:
    for name in EXPECTED:
        for result in run_checks(fixture(name), static=True).results:
            assert "\n" not in result.message and result.message
            assert result.category in CATEGORIES
            failed = result.verdict in (Verdict.FAIL, Verdict.ERROR)
            assert (result.remedy is not None) == failed, (name, result)


def test_hostile_findings_name_member_and_entry() -> None:
    where = {
        "hostile_data_entry.zip": ("data", "clip_range", "io.open"),
        "hostile_nested_blob.zip": ("data", "_last_obs", "io.open"),
        "hostile_code_by_value.zip": ("data", "learning_rate", "cloudpickle"),
        "hostile_policy_pth.zip": ("policy.pth", None, "io.open"),
        "hostile_optimizer_pth.zip": ("policy.optimizer.pth", None, "io.open"),
    }
    for name, (member, entry, global_name) in where.items():
        result = next(
            r for r in run_checks(fixture(name), static=True).results if r.check_id == "DPPO004"
        )
        assert result.category == "security"
        assert result.details["member"] == member
        assert result.details.get("entry") == entry
        assert global_name in result.message


def test_legacy_is_detected_statically_with_the_migrate_remedy() -> None:
    result = run_checks(fixture("dppo_legacy.zip"), static=True).results[4]
    assert (result.check_id, result.verdict, result.category) == ("DPPO005", Verdict.FAIL, "legacy")
    assert "dppo-ckpt migrate OLD.zip NEW.zip" in result.remedy


def test_plain_sb3_ppo_gets_the_generic_checks() -> None:
    report = run_checks(fixture("sb3_ppo.zip"))
    verdicts = {r.check_id: r for r in report.results}
    assert report.exit_code == 0
    assert verdicts["DPPO006"].verdict is Verdict.SKIP
    assert "not a DistributionalPPO checkpoint" in verdicts["DPPO006"].message
    for check_id in ("DPPO001", "DPPO004", "DPPO007", "DPPO009", "DPPO012"):
        assert verdicts[check_id].verdict is Verdict.PASS, check_id


def test_round_trip_runs_unless_quick() -> None:
    full = run_checks(fixture("dppo_quantile_vgs.zip"))
    quick = run_checks(fixture("dppo_quantile_vgs.zip"), quick=True)
    assert full.results[-1].verdict is Verdict.PASS
    assert quick.results[-1].verdict is Verdict.SKIP


def test_missing_file_is_unusable(tmp_path: Path) -> None:
    report = run_checks(tmp_path / "nope.zip")
    assert report.exit_code == 2
    assert "no such file" in report.results[0].message


def test_static_run_never_imports_torch() -> None:
    paths = [str(fixture(n)) for n in EXPECTED]
    code = (
        "import json, sys\n"
        "from dppo_ckpt.checkpoint.checks import run_checks\n"
        "from dppo_ckpt.cli import app\n"
        f"codes = [run_checks(p, static=True).exit_code for p in {paths!r}]\n"
        "heavy = [m for m in ('torch', 'stable_baselines3', 'gymnasium') if m in sys.modules]\n"
        "print(json.dumps([heavy, codes]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, codes = json.loads(out.stdout)
    assert heavy == []
    assert codes == [EXPECTED[n][0] for n in EXPECTED]


def test_exception_inside_a_check_becomes_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(text: str) -> dict[str, str]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(static_checks, "parse_system_info", boom)
    report = run_checks(fixture("dppo_quantile_vgs.zip"), static=True)
    result = next(r for r in report.results if r.check_id == "DPPO003")
    assert result.verdict is Verdict.ERROR
    assert result.message == "RuntimeError: boom second line"
    assert report.exit_code == 1


def test_trust_accepts_a_lambda_schedule(tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    model = PPO(
        "MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, learning_rate=lambda f: 3e-4 * f
    )
    path = tmp_path / "lambda.zip"
    model.save(path)
    refused = run_checks(path, quick=True)
    assert refused.exit_code == 3 and "code pickled by value" in refused.results[3].message
    trusted = run_checks(path, quick=True, trust=True)
    assert trusted.exit_code == 0
    assert trusted.results[3].verdict is Verdict.SKIP
    assert trusted.results[6].verdict is Verdict.PASS


# -- model checks and the gradient probe -------------------------------------------------------


def _loaded(name: str = "dppo_quantile_vgs.zip") -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return safe_load(fixture(name))


def _snapshot(model: Any) -> dict[str, Any]:
    scaler = model._variance_gradient_scaler
    return {
        "parameters": parameters_bytes(model),
        "scaler": scaler_state_bytes(model),
        "links": [id(p) for p in scaler.parameters],
        "optimizer": optimizer_state_bytes(model),
        "param_groups": repr(model.policy.optimizer.state_dict()["param_groups"]),
        "optimizer_links": [
            id(p) for g in model.policy.optimizer.param_groups for p in g["params"]
        ],
        "parameter_objects": [id(p) for p in model.policy.parameters()],
        "grads": [
            None if p.grad is None else (id(p.grad), p.grad.numpy().tobytes())
            for p in model.policy.parameters()
        ],
        "rng": torch.random.get_rng_state().numpy().tobytes(),
        "logger": scaler.logger,
        "training": model.policy.training,
    }


@pytest.mark.parametrize("with_grads", [False, True])
def test_probe_leaves_no_state_changed(with_grads: bool) -> None:
    model = _loaded()
    if with_grads:
        generator = torch.Generator().manual_seed(1)
        for p in model.policy.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
    before = _snapshot(model)
    results = model_checks(model, model._variance_gradient_scaler.state_dict())
    assert [r.verdict for r in results] == [Verdict.PASS] * 4
    assert _snapshot(model) == before


def test_the_probe_resets_the_optimizer_in_place_and_keeps_its_origin() -> None:
    from dppo_ckpt.checkpoint.model_checks import _reset_optimizer, state_fingerprint

    model = make_model()
    model.learn(64)  # an initialised (and, after the update path, flat) Adam state
    optimizer = model.policy.optimizer
    origin = copy.deepcopy(optimizer.state_dict())
    expected = state_fingerprint(origin)
    tensors = [id(t) for entry in optimizer.state.values() for t in entry.values()]
    for param in model.policy.parameters():
        param.grad = torch.ones_like(param)
    model._optimizer_step(model._variance_gradient_scaler, 0.5)
    assert state_fingerprint(optimizer.state_dict()) != expected

    _reset_optimizer(optimizer, origin)
    assert state_fingerprint(optimizer.state_dict()) == expected
    assert [id(t) for entry in optimizer.state.values() for t in entry.values()] == tensors
    assert state_fingerprint(origin) == expected
    # A step after the reset changes the optimizer, never the origin.
    model._optimizer_step(model._variance_gradient_scaler, 0.5)
    assert state_fingerprint(origin) == expected


def test_an_optimizer_state_of_another_layout_is_loaded_afresh() -> None:
    from dppo_ckpt.checkpoint.model_checks import _reset_optimizer, state_fingerprint

    model = make_model()
    optimizer = model.policy.optimizer
    origin = copy.deepcopy(optimizer.state_dict())  # never stepped: no state at all
    model.learn(64)
    _reset_optimizer(optimizer, origin)
    assert state_fingerprint(optimizer.state_dict()) == state_fingerprint(origin)
    assert not optimizer.state


@pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, torch.optim.SGD])
def test_the_probe_works_and_restores_with_other_optimizers(optimizer_class: Any) -> None:
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    model = make_model(
        policy_kwargs={"optimizer_class": optimizer_class, "optimizer_kwargs": kwargs}
    )
    model.learn(64)
    before = _snapshot(model)
    probe = model_checks(model)[3]
    assert probe.verdict is Verdict.PASS, probe.message
    assert _snapshot(model) == before


def test_scaler_states_compare_bit_for_bit_in_place() -> None:
    from dppo_ckpt.checkpoint.model_checks import _comparable, _first_difference, _TensorBits

    def bits(state: Any) -> Any:
        return _comparable(state, _TensorBits)

    nan = torch.tensor([float("nan"), 1.0])
    assert _first_difference(bits({"m": [nan]}), bits({"m": [nan.clone()]})) is None
    zero, negative_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert torch.equal(zero, negative_zero)  # equal values, other bits
    assert _first_difference(bits({"m": [zero]}), bits({"m": [negative_zero]})) == "m[0]"
    assert _first_difference(bits({"m": [zero]}), bits({"m": [zero.double()]})) == "m[0]"
    assert _first_difference(bits({"m": [zero]}), bits({"m": [zero.reshape(1, 1)]})) == "m[0]"
    assert _first_difference(bits({"x": 0.0}), bits({"x": -0.0})) == "x"
    assert _first_difference(bits({"x": float("nan")}), bits({"x": float("nan")})) is None


def test_probe_proves_scaling_during_warm_up() -> None:
    model = make_model(vgs_warmup_steps=100)
    scaler = model._variance_gradient_scaler
    assert scaler.step_count == 0 < scaler.warmup_steps
    before = _snapshot(model)
    probe = model_checks(model)[3]
    assert probe.verdict is Verdict.PASS
    assert 0 < probe.details["factor"] < 1
    assert _snapshot(model) == before


def test_scaler_on_parameter_copies_fails_identity_and_probe() -> None:
    model = _loaded()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.policy.parameters()]
    model._variance_gradient_scaler.update_parameters(copies)
    results = {r.check_id: r for r in model_checks(model)}
    assert results["DPPO008"].verdict is Verdict.FAIL
    assert results["DPPO008"].message.startswith("0/13")
    assert results["DPPO011"].verdict is Verdict.FAIL
    assert results["DPPO011"].message.startswith("the factor cannot reach the step")
    assert "tracks tensors the policy does not use" in results["DPPO011"].message
    assert results["DPPO009"].verdict is Verdict.PASS


def _grad_only_step(self: Any, optimizer: Any, scale: float) -> None:
    """A planted regression: the factor multiplies ``.grad``, the learning rate stays."""
    for param in self.parameters:
        if param.grad is not None:
            param.grad.mul_(scale)
    optimizer.step()


def test_probe_passes_within_the_stated_tolerance() -> None:
    result = model_checks(_loaded())[3]
    assert result.verdict is Verdict.PASS
    assert 0 < result.details["factor"] < 1
    assert result.details["worst_relative_error"] <= 1e-5


def test_a_factor_that_only_multiplies_grad_fails_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dppo_ckpt.vgs import VarianceGradientScaler

    model = _loaded()
    before = _snapshot(model)
    monkeypatch.setattr(VarianceGradientScaler, "step", _grad_only_step)
    result = model_checks(model)[3]
    assert result.verdict is Verdict.FAIL, result.message
    assert "did not move by the factor" in result.message
    # Adam divides the gradient factor out: the step stays near the unscaled one.
    assert result.details["worst_relative_error"] > 0.1
    assert _snapshot(model) == before


def test_a_factor_applied_to_grad_in_compute_scale_fails_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dppo_ckpt.vgs import VarianceGradientScaler

    compute = VarianceGradientScaler.compute_scale

    def scaling_too(self: Any) -> float:
        scale = compute(self)
        for param in self.parameters:
            if param.grad is not None:
                param.grad.mul_(scale)
        return scale

    monkeypatch.setattr(VarianceGradientScaler, "compute_scale", scaling_too)
    result = model_checks(_loaded())[3]
    assert result.verdict is Verdict.FAIL
    assert "changed" in result.message and "raw gradients" in result.message


def test_stale_optimizer_fails() -> None:
    model = _loaded()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.policy.parameters()]
    model.policy.optimizer = torch.optim.Adam(copies)
    result = model_checks(model)[1]
    assert (result.check_id, result.verdict) == ("DPPO009", Verdict.FAIL)
    assert "0/13" in result.message and "13 foreign" in result.message


def test_reset_statistics_fail_the_statistics_check() -> None:
    model = _loaded()
    stored = model._variance_gradient_scaler.state_dict()
    assert model_checks(model, stored)[2].verdict is Verdict.PASS
    model._variance_gradient_scaler.reset_statistics()
    result = model_checks(model, stored)[2]
    assert (result.check_id, result.verdict, result.category) == (
        "DPPO010",
        Verdict.FAIL,
        "statistics",
    )
    assert "step_count" in result.message


def test_statistics_check_is_bit_exact() -> None:
    model = _loaded()
    stored = model._variance_gradient_scaler.state_dict()
    stored["exp_avg"][0] = stored["exp_avg"][0].clone()
    flat = stored["exp_avg"][0].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    result = model_checks(model, stored)[2]
    assert result.verdict is Verdict.FAIL and "exp_avg[0]" in result.message


def test_scaler_off_and_plain_ppo_skip_the_scaler_checks() -> None:
    for name in ("dppo_vgs_off.zip", "sb3_ppo.zip"):
        results = model_checks(_loaded(name))
        assert [r.verdict for r in results] == [
            Verdict.SKIP,
            Verdict.PASS,
            Verdict.SKIP,
            Verdict.SKIP,
        ]


# -- random damage --------------------------------------------------------------------------

_VALID = fixture("dppo_quantile_vgs.zip").read_bytes()
with zipfile.ZipFile(io.BytesIO(_VALID)) as _zip:
    _MEMBERS = {info.filename: _zip.read(info) for info in _zip.infolist()}
_DATA = json.loads(_MEMBERS["data"])
_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 100),
    st.floats(-10, 10, allow_nan=False),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
)


def _zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), payload)
    return buffer.getvalue()


@st.composite
def _member_edit(draw: st.DrawFn) -> bytes:
    members = dict(_MEMBERS)
    data = json.loads(json.dumps(_DATA))
    kind = draw(st.sampled_from(["drop", "garble", "json_drop", "json_set", "entry_flip"]))
    if kind == "drop":
        del members[draw(st.sampled_from(sorted(members)))]
    elif kind == "garble":
        name = draw(st.sampled_from(sorted(members)))
        payload = bytearray(members[name])
        start = draw(st.integers(0, max(len(payload) - 1, 0)))
        payload[start : start + 16] = draw(st.binary(min_size=1, max_size=16))
        members[name] = bytes(payload)
    elif kind == "json_drop":
        del data[draw(st.sampled_from(sorted(data)))]
    elif kind == "json_set":
        data[draw(st.sampled_from(sorted(data)))] = draw(_JSON_VALUES)
    else:
        key = draw(
            st.sampled_from(
                sorted(k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v)
            )
        )
        payload = bytearray(base64.b64decode(data[key][":serialized:"]))
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(payload) - 1))
            payload[index] ^= 1 << draw(st.integers(0, 7))
        data[key][":serialized:"] = base64.b64encode(bytes(payload)).decode()
    if kind.startswith(("json", "entry")):
        members["data"] = json.dumps(data).encode()
    return _zip_of(members)


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "edit"]))
    if kind == "truncate":
        return _VALID[: draw(st.integers(0, len(_VALID) - 1))]
    if kind == "flip":
        raw = bytearray(_VALID)
        for _ in range(draw(st.integers(1, 8))):
            index = draw(st.integers(0, len(raw) - 1))
            raw[index] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    return draw(_member_edit())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("damaged")


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _check_damaged(scratch: Path, raw: bytes, **options: Any) -> None:
    path = scratch / "damaged.zip"
    path.write_bytes(raw)
    with _inside(scratch), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_checks(path, **options)
    assert report.exit_code in (0, 1, 2, 3)
    assert [r.check_id for r in report.results] == list(CHECKS)
    assert all("\n" not in r.message for r in report.results)
    assert markers(scratch) == []


@settings(
    max_examples=STATIC_EXAMPLES,
    deadline=20_000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=_damaged())
def test_random_damage_static(scratch: Path, raw: bytes) -> None:
    _check_damaged(scratch, raw, static=True)


@settings(
    max_examples=LOAD_EXAMPLES,
    deadline=120_000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=_member_edit())
def test_random_damage_full_load(scratch: Path, raw: bytes) -> None:
    _check_damaged(scratch, raw, quick=True)


def test_verify_trust_passes_a_sound_distributional_checkpoint_with_a_lambda_schedule(
    tmp_path: Path,
) -> None:
    # The full run, round trip included: every load goes through the same trusted path.
    from tests._models import make_model

    model = make_model(learning_rate=lambda progress: 1e-3 * progress)
    model.learn(64)
    path = tmp_path / "lambda.zip"
    model.save(path)
    assert run_checks(path).exit_code == 3
    trusted = run_checks(path, trust=True)
    assert trusted.exit_code == 0, [(r.check_id, r.message) for r in trusted.results]
    by_id = {r.check_id: r for r in trusted.results}
    assert by_id["DPPO004"].verdict is Verdict.SKIP
    assert "--trust: accepted code pickled by value" in by_id["DPPO004"].message
    assert by_id["DPPO004"].details["refused"], "the finding is listed in the report"
    assert "with code from the file allowed to run (--trust)" in by_id["DPPO007"].message
    assert by_id["DPPO012"].verdict is Verdict.PASS


def test_an_undecodable_stored_scaler_is_an_error_of_dppo010_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dppo_ckpt.checkpoint import model_checks as load_checks

    monkeypatch.setattr(load_checks, "scaler_payload", lambda archive: b"\x80\x04not a pickle")
    # Layout 1: the scaler entry in `data` is the stored state (layout 2's is vgs.pth).
    report = run_checks(fixture("dppo_layout1.zip"), quick=True)
    verdicts = {r.check_id: r for r in report.results}
    assert verdicts["DPPO010"].verdict is Verdict.ERROR
    assert verdicts["DPPO010"].message.startswith("cannot decode the stored scaler: ")
    assert verdicts["DPPO005"].verdict is Verdict.PASS  # the static check reads the real entry
    assert _failing(report) == {"DPPO010"} and report.exit_code == 1
