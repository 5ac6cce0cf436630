"""DistributionalPPO: the scaler in the train step and a save/load lifecycle with no stale links."""

from __future__ import annotations

import io
import json
import pickle
import tempfile
import warnings
from pathlib import Path

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv

from dppo_ckpt import CustomActorCriticPolicy, DistributionalPPO, VarianceGradientScaler
from dppo_ckpt.ppo import StaleOptimizerError
from dppo_ckpt.vgs_format import STATE_KEYS
from tests._models import (
    make_env,
    make_model,
    optimizer_state_bytes,
    parameters_bytes,
    recording_logger,
    scaler_state_bytes,
)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained past warm-up, and its checkpoint."""
    env = make_env()
    model = make_model(env)
    model.learn(256)
    path = tmp_path_factory.mktemp("ckpt") / "model.zip"
    model.save(path)
    return model, env, path


# -- the six tests of the bug report -----------------------------------------------------


def test_vgs_tracks_correct_params_after_load(trained):
    _, env, path = trained
    loaded = DistributionalPPO.load(path, env=env)
    policy_params = list(loaded.policy.parameters())
    vgs_params = loaded._variance_gradient_scaler._parameters
    assert len(vgs_params) == len(policy_params)
    for p, v in zip(policy_params, vgs_params, strict=True):
        assert id(p) == id(v)


def test_vgs_params_are_not_pickled(trained):
    model, _, _ = trained
    blob = pickle.dumps(model._variance_gradient_scaler)
    assert b"_parameters" not in blob
    assert b"_logger" not in blob
    state = model._variance_gradient_scaler.__getstate__()
    assert "_parameters" not in state and "_logger" not in state


def test_vgs_params_initialized_to_none_after_unpickle(trained):
    model, _, _ = trained
    clone = pickle.loads(pickle.dumps(model._variance_gradient_scaler))
    assert clone._parameters is None
    assert clone._logger is None
    assert clone.step_count == model._variance_gradient_scaler.step_count


def test_vgs_update_parameters_works_correctly(trained):
    model, _, _ = trained
    clone = pickle.loads(pickle.dumps(model._variance_gradient_scaler))
    before = clone.state_dict()
    clone.update_parameters(model.policy.parameters())
    assert [id(p) for p in clone._parameters] == [id(p) for p in model.policy.parameters()]
    after = clone.state_dict()
    for a, b in zip(
        before["exp_avg"] + before["exp_avg_sq"],
        after["exp_avg"] + after["exp_avg_sq"],
        strict=True,
    ):
        assert a.numpy().tobytes() == b.numpy().tobytes()


def test_multiple_save_load_cycles(tmp_path):
    env = make_env()
    model = make_model(env)
    model.learn(128)
    steps = [model._variance_gradient_scaler.step_count]
    for cycle in range(3):
        path = tmp_path / f"cycle{cycle}.zip"
        model.save(path)
        saved_stats = scaler_state_bytes(model)
        model = DistributionalPPO.load(path, env=env, force_reset=False)
        assert scaler_state_bytes(model) == saved_stats
        assert _ids(model._variance_gradient_scaler._parameters) == _ids(model.policy.parameters())
        model.learn(64, reset_num_timesteps=False)
        steps.append(model._variance_gradient_scaler.step_count)
    assert steps == sorted(set(steps)), f"scaler steps must strictly increase: {steps}"
    assert model.num_timesteps == 128 + 3 * 64


def test_vgs_functionality_after_load(trained):
    model, env, path = trained
    loaded = DistributionalPPO.load(path, env=env)
    scaler = loaded._variance_gradient_scaler
    step_before = scaler.step_count
    exp_avg_before = [t.clone() for t in scaler.state_dict()["exp_avg"]]
    params_before = [p.detach().clone() for p in loaded.policy.parameters()]
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == model.num_timesteps + 64  # rollouts were collected
    updates = loaded.n_epochs * (64 // loaded.batch_size)
    assert scaler.step_count == step_before + updates  # every minibatch went through the scaler
    assert scaler is loaded._variance_gradient_scaler
    assert any(
        not th.equal(a, b)
        for a, b in zip(exp_avg_before, scaler.state_dict()["exp_avg"], strict=True)
    ), "statistics must advance after load"
    assert any(
        not th.equal(a, p) for a, p in zip(params_before, loaded.policy.parameters(), strict=True)
    )
    assert scaler.scaling_factor < 1.0  # past warm-up, scaling acts on the live gradients


# -- the bug report's verification script ------------------------------------------------


def test_verification_script_from_bug_report():
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1")])
    model = DistributionalPPO(
        CustomActorCriticPolicy, env, variance_gradient_scaling=True, n_steps=64, verbose=0
    )
    model.learn(total_timesteps=256)
    with tempfile.TemporaryDirectory() as tmpdir:
        save_path = Path(tmpdir) / "test.zip"
        model.save(save_path)
        loaded = DistributionalPPO.load(save_path, env=env)
        p_ids = set(id(p) for p in loaded.policy.parameters())
        v_ids = set(id(p) for p in loaded._variance_gradient_scaler._parameters)
        assert p_ids == v_ids
        assert len(v_ids) == len(list(loaded.policy.parameters()))
    env.close()


# -- the rest of the lifecycle -----------------------------------------------------------


def test_after_load_optimizer_and_statistics(trained):
    model, env, path = trained
    loaded = DistributionalPPO.load(path, env=env)
    optimizer_ids = [id(p) for g in loaded.policy.optimizer.param_groups for p in g["params"]]
    assert optimizer_ids == [id(p) for p in loaded.policy.parameters()]
    assert scaler_state_bytes(loaded) == scaler_state_bytes(model)
    assert optimizer_state_bytes(loaded) == optimizer_state_bytes(model)
    assert parameters_bytes(loaded) == parameters_bytes(model)


def test_vgs_metrics_reach_the_logger_before_and_after_load(tmp_path):
    env = make_env()
    model = make_model(env)
    logger, recorder = recording_logger()
    model.set_logger(logger)
    model.learn(128)  # two iterations: the first train()'s records are dumped by the second
    keys = {"vgs/scale", "vgs/noise_ratio", "vgs/level", "vgs/step", "vgs/scale_mean"}
    keys |= {"vgs/at_min_share", "vgs/at_one_share"}
    assert keys <= recorder.keys()
    model.save(tmp_path / "m.zip")

    loaded = DistributionalPPO.load(tmp_path / "m.zip", env=env, force_reset=False)
    loaded.learn(64, reset_num_timesteps=False)  # SB3's default logger, created by learn()
    assert loaded._variance_gradient_scaler.logger is loaded.logger
    assert loaded.logger.name_to_value["vgs/step"] == loaded._variance_gradient_scaler.step_count

    logger2, recorder2 = recording_logger()
    loaded.set_logger(logger2)
    loaded.learn(128, reset_num_timesteps=False)
    assert keys <= recorder2.keys()


def test_no_setup_flag_or_parameter_references_in_checkpoint(trained):
    import zipfile

    _, _, path = trained
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    assert not any("setup" in key.lower() for key in data)
    assert "_rng_state" in data and isinstance(data["_rng_state"], dict)
    # Layout 2: `data` keeps only the scaler's configuration; its state is vgs.pth, a plain
    # state dict that torch's weights-only loader reads.
    assert "_variance_gradient_scaler" not in data and "vgs_warmup_steps" in data
    with zipfile.ZipFile(path) as archive:
        state = th.load(io.BytesIO(archive.read("vgs.pth")), weights_only=True)
        metadata = json.loads(archive.read("dppo_ckpt.json"))
    assert metadata["layout"] == 2 and metadata["requires"].startswith("dppo-ckpt>=")
    assert list(state) == list(STATE_KEYS)
    assert state["format_version"] == VarianceGradientScaler.STATE_FORMAT_VERSION


def test_rebuilt_policy_relinks_scaler_and_keeps_statistics(trained):
    _, env, path = trained
    loaded = DistributionalPPO.load(path, env=env, force_reset=False)
    stats = scaler_state_bytes(loaded)
    # A policy rebuilt in place (new parameter objects, new optimizer over them).
    old_policy = loaded.policy
    loaded.policy = type(old_policy)(**old_policy._get_constructor_parameters())
    loaded.policy.load_state_dict(old_policy.state_dict())
    assert _ids(loaded._variance_gradient_scaler._parameters) != _ids(loaded.policy.parameters())
    loaded._check_parameter_links()
    assert _ids(loaded._variance_gradient_scaler._parameters) == _ids(loaded.policy.parameters())
    assert scaler_state_bytes(loaded) == stats


def test_stale_optimizer_is_an_error(trained):
    _, env, path = trained
    loaded = DistributionalPPO.load(path, env=env, force_reset=False)
    loaded.policy.optimizer = th.optim.Adam([th.nn.Parameter(th.zeros(3))])
    with pytest.raises(StaleOptimizerError, match="rebuild it over policy.parameters"):
        loaded.learn(64, reset_num_timesteps=False)


def test_vgs_off_has_no_scaler(tmp_path):
    env = make_env()
    model = make_model(env, variance_gradient_scaling=False)
    model.learn(64)
    assert model._variance_gradient_scaler is None
    model.save(tmp_path / "off.zip")
    loaded = DistributionalPPO.load(tmp_path / "off.zip", env=env)
    assert loaded._variance_gradient_scaler is None


def test_legacy_scaler_pickle_loads_relinks_and_warns(trained, tmp_path):
    """A checkpoint whose scaler pickled `_parameters` (the original bug) still loads."""
    from fixtures.make_fixtures import write_legacy_checkpoint

    model, env, _ = trained
    path = tmp_path / "legacy.zip"
    write_legacy_checkpoint(model, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = DistributionalPPO.load(path, env=env)
    messages = [str(w.message) for w in caught if "migrate" in str(w.message)]
    assert len(messages) == 1, messages
    assert _ids(loaded._variance_gradient_scaler._parameters) == _ids(loaded.policy.parameters())
    # The legacy pickle holds a format-1 state: what it had survives bit for bit, and the
    # running level and the factor's counters start afresh.
    loaded_state, saved_state = scaler_state_bytes(loaded), scaler_state_bytes(model)
    for key in ("step_count", "scaling_factor", "noise_ratio", "exp_avg", "exp_avg_sq"):
        assert loaded_state[key] == saved_state[key], key
    assert loaded_state["level"] is None and loaded_state["post_warmup_steps"] == 0
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded._variance_gradient_scaler.level is not None


# -- exact resume ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(critic="quantile"),
        dict(critic="categorical", normalize_returns=True, clip_range_vf=0.5),
        dict(critic="quantile", use_sde=True, clip_range_vf=0.2, cvar_alpha=0.25),
    ],
    ids=["quantile", "categorical-normalized-clipped", "quantile-gsde-cvar"],
)
def test_exact_resume_matches_uninterrupted(tmp_path, overrides):
    n = 128
    uninterrupted = make_model(make_env(), **overrides)
    uninterrupted.learn(2 * n)

    env = make_env()
    model = make_model(env, **overrides)
    model.learn(n)
    model.save(tmp_path / "half.zip")
    resumed = DistributionalPPO.load(tmp_path / "half.zip", env=env, force_reset=False)
    resumed.learn(n, reset_num_timesteps=False)

    assert resumed.num_timesteps == uninterrupted.num_timesteps == 2 * n
    assert parameters_bytes(resumed) == parameters_bytes(uninterrupted)
    assert scaler_state_bytes(resumed) == scaler_state_bytes(uninterrupted)
    assert optimizer_state_bytes(resumed) == optimizer_state_bytes(uninterrupted)


def test_exact_resume_over_three_cycles(tmp_path):
    n = 64
    uninterrupted = make_model(make_env(), critic="categorical")
    uninterrupted.learn(4 * n)

    env = make_env()
    model = make_model(env, critic="categorical")
    model.learn(n)
    for cycle in range(3):
        model.save(tmp_path / f"c{cycle}.zip")
        model = DistributionalPPO.load(tmp_path / f"c{cycle}.zip", env=env, force_reset=False)
        model.learn(n, reset_num_timesteps=False)
    assert parameters_bytes(model) == parameters_bytes(uninterrupted)
    assert scaler_state_bytes(model) == scaler_state_bytes(uninterrupted)


# -- policies and spaces -----------------------------------------------------------------


@pytest.mark.parametrize("critic", ["quantile", "categorical"])
def test_discrete_actions_and_several_envs(critic, tmp_path):
    env = make_env("CartPole-v1", n_envs=2)
    model = make_model(env, critic=critic)
    model.learn(256)
    assert model.policy.value_net.out_features == (32 if critic == "quantile" else 51)
    model.save(tmp_path / "cp.zip")
    loaded = DistributionalPPO.load(tmp_path / "cp.zip", env=env)
    assert _ids(loaded._variance_gradient_scaler._parameters) == _ids(loaded.policy.parameters())
    obs = env.reset()
    actions, _ = loaded.predict(obs, deterministic=True)
    assert actions.shape == (2,)


def test_scalar_value_is_distribution_mean():
    model = make_model()
    obs = th.as_tensor(model.env.reset())
    with th.no_grad():
        quantiles = model.policy.predict_value_distribution(obs)
        assert th.allclose(model.policy.predict_values(obs).squeeze(-1), quantiles.mean(-1))


def test_policy_must_be_distributional():
    from stable_baselines3.common.policies import ActorCriticPolicy

    with pytest.raises(TypeError, match="CustomActorCriticPolicy"):
        DistributionalPPO(ActorCriticPolicy, make_env())


def test_scaler_is_exported():
    assert VarianceGradientScaler.__module__ == "dppo_ckpt.vgs"


def test_load_leaves_the_environment_seeds_as_they_were(trained):
    _, env, path = trained
    env._seeds = [None] * env.num_envs
    DistributionalPPO.load(path, env=env, force_reset=False)
    assert env._seeds == [None] * env.num_envs  # SB3 alone leaves the run's seed pending
    env.seed(123)
    DistributionalPPO.load(path, env=env, force_reset=False)
    assert env._seeds == [123 + i for i in range(env.num_envs)]


# -- custom_objects reach the live scaler --------------------------------------------------------


def test_custom_objects_vgs_values_reach_the_live_scaler(tmp_path):
    from tests._models import make_model as _make

    model = _make()
    model.learn(128)
    model.save(tmp_path / "model.zip")
    saved = model._variance_gradient_scaler.state_dict()
    loaded = DistributionalPPO.load(
        tmp_path / "model.zip",
        device="cpu",
        custom_objects={"vgs_alpha": 0.5, "vgs_kwargs": {"min_scale": 0.2}},
    )
    scaler = loaded._variance_gradient_scaler
    assert loaded.vgs_alpha == 0.5
    state = scaler.state_dict()
    assert state["config"]["alpha"] == 0.5 and state["config"]["min_scale"] == 0.2
    # Statistics are kept: only the configuration changed.
    assert state["step_count"] == saved["step_count"]
    for kept, stored in zip(state["exp_avg"], saved["exp_avg"], strict=True):
        assert th.equal(kept, stored)


@pytest.mark.parametrize(
    ("custom", "reason"),
    [
        ({"vgs_kwargs": {"no_such": 1}}, "unknown scaler setting"),
        ({"vgs_typo": 1}, "is no scaler setting"),
        ({"vgs_alpha": -1.0}, "alpha"),
    ],
)
def test_unusable_custom_objects_vgs_values_are_refused(tmp_path, custom, reason):
    from tests._models import make_model as _make

    _make().save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match=reason):
        DistributionalPPO.load(tmp_path / "model.zip", device="cpu", custom_objects=custom)


def test_custom_objects_vgs_values_for_a_model_without_scaler_are_refused(tmp_path):
    from tests._models import make_model as _make

    _make(variance_gradient_scaling=False).save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="scaler is off"):
        DistributionalPPO.load(
            tmp_path / "model.zip", device="cpu", custom_objects={"vgs_alpha": 0.5}
        )
