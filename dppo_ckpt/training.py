"""The training driver behind ``dppo-ckpt train``: a run folder of verified checkpoints.

A run trains one :class:`~dppo_ckpt.ppo.DistributionalPPO` agent with a single ``learn()``
call and writes checkpoints into its run folder as it goes::

    RUN/
      run.json                              manifest: settings, checkpoints and their sha256
      checkpoint_000010240.zip              the model (DistributionalPPO.save)
      checkpoint_000010240.envs.pkl         the environments at that moment (cloudpickle)
      checkpoint_000010240.vecnorm.npz      VecNormalize's statistics (with --normalize)
      tensorboard/                          with --tensorboard

The environment stack is an :class:`~dppo_ckpt.envs.EnvSpec`, recorded in the manifest and in
each checkpoint's ``dppo_ckpt.json``; ``--resume`` rebuilds it from there. A recorded
``module:EnvId`` is imported only when the manifest is authenticated (below), when the user
names it with ``--env``, or with ``--trust``.

Checkpoints are taken at rollout boundaries, after an update and before the next rollout, so
that a checkpoint holds everything the next iteration depends on: parameters, optimizer and
scaler state, counters, the last observation and every random generator. Together with the
environment snapshot beside it, ``--resume`` then continues exactly where the run was: on CPU
with the same settings, a resumed run equals the uninterrupted one bit for bit.

Every file is written atomically (a temporary file in the run folder, ``fsync``,
``os.replace``), so a run killed at any moment leaves only complete checkpoints. Each
checkpoint is then verified with the quick checks of :mod:`dppo_ckpt.checkpoint.checks`; a
failing check stops the run.

``--resume`` trusts no file: the checkpoint is scanned and loaded with the allow-list loader
(:func:`~dppo_ckpt.checkpoint.safe_pickle.safe_load`), exactly as ``cycle`` loads one, so a
hostile checkpoint is refused with exit 3 and nothing in it runs. The environment snapshot is a
pickle by nature; it is loaded only when the folder's manifest carries a valid HMAC made with
the user's own key (:mod:`dppo_ckpt.signing`, kept outside every run folder), lists the
snapshot beside that very checkpoint, and both files still have the sha256 it recorded.
Anything else restarts the environments fresh and says why. ``--trust`` lifts both rules.

Ctrl-C (SIGINT) asks the run to stop at the next rollout boundary (the rollout under way is
completed and trained on); it writes a final checkpoint there, verifies it and exits with 130
(128 + SIGINT), so that shell scripts see the run did not complete. A second Ctrl-C stops at
the next environment step instead (the partially collected rollout is dropped); a third one
aborts at once, leaving the checkpoints already written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dppo_ckpt import envs
from dppo_ckpt.atomic import TEMP_SUFFIX, write_atomically

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from stable_baselines3.common.vec_env import VecEnv

    from dppo_ckpt.ppo import DistributionalPPO

__all__ = [
    "EXIT_INTERRUPTED",
    "MANIFEST_NAME",
    "TrainOptions",
    "TrainSummary",
    "TrainingError",
    "checkpoint_name",
    "load_config",
    "model_keywords",
    "render_summary",
    "train",
]

#: Exit code of a run stopped by Ctrl-C: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130

#: The manifest of a run folder.
MANIFEST_NAME = "run.json"
MANIFEST_FORMAT_VERSION = 1

from dppo_ckpt.run_plan import (  # noqa: E402
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_ENV_ID,
    DEFAULT_EVAL_EPISODES,
    DEFAULT_TIMESTEPS,
)

# Settings that make the default run learn: RL Zoo's tuned PPO hyperparameters for
# Pendulum-v1 (SB3's generic defaults barely learn it in 100k steps). They are the base
# under the config file and the command line, and only for that environment.
TUNED_SETTINGS: dict[str, dict[str, Any]] = {
    "Pendulum-v1": {
        "n_steps": 1024,
        "gae_lambda": 0.95,
        "gamma": 0.9,
        "n_epochs": 10,
        "ent_coef": 0.0,
        "learning_rate": 1e-3,
        "clip_range": 0.2,
        "use_sde": True,
        "sde_sample_freq": 4,
    }
}
TUNED_N_ENVS: dict[str, int] = {"Pendulum-v1": 4}

_CHECKPOINT_PREFIX = "checkpoint_"
_SNAPSHOT_SUFFIX = ".envs.pkl"
_NORMALIZATION_SUFFIX = ".vecnorm.npz"
# Tables of the config file that describe the environment, not the model.
_ENV_CONFIG_KEYS = ("env_kwargs", "normalize")
_FRESH = "environments restart fresh"

# Options of `train` that set model keywords; with --resume the checkpoint fixes them.
_MODEL_OPTIONS = {
    "critic": "--critic",
    "variance_gradient_scaling": "--vgs/--no-vgs",
    "vgs_alpha": "--vgs-alpha",
    "vgs_warmup_steps": "--vgs-warmup-steps",
}


class TrainingError(Exception):
    """A run could not start or had to stop; ``exit_code`` follows the command's rules.

    2: an option, the config file or the resume checkpoint could not be used; 1 (or 3): a
    checkpoint the run wrote failed its checks.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainOptions:
    """What ``dppo-ckpt train`` was asked to do. ``None`` means "not given"."""

    env_id: str | None = None
    timesteps: int | None = None
    n_envs: int | None = None
    env_kwargs: dict[str, Any] | None = None
    vec_env: str | None = None
    normalize: bool | None = None
    frame_stack: int | None = None
    atari: bool | None = None
    seed: int | None = None
    critic: str | None = None
    vgs: bool | None = None
    vgs_alpha: float | None = None
    vgs_warmup_steps: int | None = None
    config: Path | None = None
    out: Path | None = None
    checkpoint_every: int | None = None
    resume: Path | None = None
    branch: str | None = None
    eval_episodes: int = DEFAULT_EVAL_EPISODES
    tensorboard: bool = False
    portable: bool = True
    trust: bool = False
    user_allow: Any = None  # UserAllowList: extra allow entries for the resume checkpoint


@dataclass
class TrainSummary:
    """What a run did, for the summary table."""

    run_dir: Path
    start_timesteps: int
    timesteps: int
    wall_time_s: float
    vgs_scale: float | None
    vgs_step: int | None
    #: The scaler's running level of the noise ratio, and its factor counts after warm-up
    #: (``VarianceGradientScaler.factor_counts``, since the run began).
    vgs_level: float | None = None
    vgs_counts: dict[str, float] | None = None
    checkpoints: list[Path] = field(default_factory=list)
    last_checkpoint: Path | None = None
    eval_return_mean: float | None = None
    eval_return_std: float | None = None
    eval_episodes: int = 0
    interrupted: bool = False
    unverified: bool = False

    @property
    def fps(self) -> float:
        """Environment steps per second of wall time over this invocation."""
        steps = self.timesteps - self.start_timesteps
        return steps / self.wall_time_s if self.wall_time_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Options and configuration


def model_keywords() -> frozenset[str]:
    """Every keyword ``DistributionalPPO(...)`` accepts besides ``policy`` and ``env``."""
    from stable_baselines3 import PPO

    from dppo_ckpt.ppo import DistributionalPPO

    names: set[str] = set()
    for function in (DistributionalPPO.__init__, PPO.__init__):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            names.add(parameter.name)
    return frozenset(names - {"self", "policy", "env", "_init_setup_model"})


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML file of DistributionalPPO keywords (top-level keys; tables become dicts),
    plus the environment's ``[env_kwargs]`` and ``[normalize]`` tables.

    :raises TrainingError: (exit 2) the file cannot be read or parsed, or a key is not a
        DistributionalPPO keyword, or a value has the wrong type (the message names the key)
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise TrainingError("--config needs Python 3.11+ or the tomli package") from None
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except OSError as exc:
        raise TrainingError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TrainingError(f"config {path} is not valid TOML: {exc}") from exc
    known = model_keywords()
    for key, value in config.items():
        if key in _ENV_CONFIG_KEYS:
            if not isinstance(value, dict):
                raise TrainingError(f"config {path}: {key} must be a table ([{key}])")
            if key == "normalize":
                try:
                    envs.check_normalize_options(value, f"config {path}: normalize")
                except envs.EnvError as exc:
                    raise TrainingError(str(exc)) from None
            continue
        if key not in known:
            raise TrainingError(
                f"config {path}: unknown key {key!r} (not a DistributionalPPO keyword)"
            )
        problem = _type_problem(key, value)
        if problem is not None:
            raise TrainingError(f"config {path}: {key} = {value!r}: {problem}")
    return config


def _type_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be DistributionalPPO's ``key``, judged from its type hints.

    Only what TOML can hold is judged (numbers, text, booleans, tables, arrays): a hint that
    admits none of those, or that cannot be resolved, accepts anything, and the model's own
    checks speak later.
    """
    expected = _toml_types(key)
    if expected is None:
        return None
    ok = any(
        isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        for kind in expected
    )
    if ok:
        return None
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a table", list: "an array"}  # fmt: skip
    # An integer is a number: "a number" says both.
    kinds = [k for k in expected if not (k is int and float in expected)]
    wanted = " or ".join(dict.fromkeys(names[k] for k in kinds if k in names))
    return f"must be {wanted}"


@functools.cache
def _toml_types(key: str) -> tuple[type, ...] | None:
    import types
    import typing

    from stable_baselines3 import PPO

    from dppo_ckpt.ppo import DistributionalPPO

    hint: Any = None
    for function in (DistributionalPPO.__init__, PPO.__init__):
        parameter = inspect.signature(function).parameters.get(key)
        if parameter is None or parameter.annotation is parameter.empty:
            continue
        hint = parameter.annotation
        if isinstance(hint, str):  # postponed annotations: resolve this one name only
            module = sys.modules.get(function.__module__)
            try:
                hint = eval(hint, dict(vars(module)) if module else {})  # noqa: S307
            except Exception:  # a name only imported for type checkers: judge nothing
                return None
        break
    if hint is None:
        return None
    members = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    plain: list[type] = []
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            continue
        if origin in (bool, int, float, str, dict, list):
            plain.append(origin)
            if origin is float:
                plain.append(int)  # TOML writes 1 for 1.0
        elif origin is tuple:
            plain.append(list)
        elif member is typing.Any:
            return None
    return tuple(plain) or None


def checkpoint_name(timesteps: int) -> str:
    """The file name of the checkpoint at ``timesteps``: sorts by step as text."""
    return f"{_CHECKPOINT_PREFIX}{timesteps:09d}.zip"


def _snapshot_name(checkpoint: str) -> str:
    return checkpoint.removesuffix(".zip") + _SNAPSHOT_SUFFIX


def _normalization_name(checkpoint: str) -> str:
    return checkpoint.removesuffix(".zip") + _NORMALIZATION_SUFFIX


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise TrainingError(f"{name} must be > 0, got {value}")


def _check_options(options: TrainOptions) -> None:
    _positive("--timesteps", options.timesteps)
    _positive("--n-envs", options.n_envs)
    _positive("--checkpoint-every", options.checkpoint_every)
    if options.eval_episodes < 0:
        raise TrainingError(f"--eval-episodes must be >= 0, got {options.eval_episodes}")
    if options.vgs_warmup_steps is not None and options.vgs_warmup_steps < 0:
        raise TrainingError(f"--vgs-warmup-steps must be >= 0, got {options.vgs_warmup_steps}")
    if options.vgs_alpha is not None and not (0.0 <= options.vgs_alpha < math.inf):
        raise TrainingError(f"--vgs-alpha must be finite and >= 0, got {options.vgs_alpha}")
    if options.critic is not None and options.critic not in ("quantile", "categorical"):
        raise TrainingError(f"--critic must be 'quantile' or 'categorical', got {options.critic!r}")
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if options.branch is not None:
        if options.resume is None:
            raise TrainingError("--branch needs --resume: it names where a resumed run continues")
        if options.out is not None:
            raise TrainingError("--branch and --out both choose the run folder: give one")
        name = options.branch
        if not name or name in (".", "..") or not all(c.isalnum() or c in "._-" for c in name):
            raise TrainingError(
                f"--branch {name!r}: use letters, digits, '.', '_' and '-' (a folder name)"
            )
    if options.resume is not None:
        given = {
            "critic": options.critic,
            "variance_gradient_scaling": options.vgs,
            "vgs_alpha": options.vgs_alpha,
            "vgs_warmup_steps": options.vgs_warmup_steps,
        }
        for key, value in given.items():
            if value is not None:
                raise TrainingError(
                    f"{_MODEL_OPTIONS[key]} cannot be combined with --resume: "
                    "the checkpoint fixes the model settings"
                )
        if options.config is not None:
            raise TrainingError(
                "--config cannot be combined with --resume: the checkpoint fixes the model settings"
            )


def _model_settings(
    options: TrainOptions, config: Mapping[str, Any], env_id: str
) -> dict[str, Any]:
    """Model keywords: built-in defaults < tuned settings of the environment < config file <
    explicit command-line options."""
    settings: dict[str, Any] = {"seed": 0, "device": "cpu", "verbose": 0}
    settings.update(TUNED_SETTINGS.get(env_id, {}))
    settings.update({k: v for k, v in config.items() if k not in _ENV_CONFIG_KEYS})
    explicit = {
        "seed": options.seed,
        "critic": options.critic,
        "variance_gradient_scaling": options.vgs,
        "vgs_alpha": options.vgs_alpha,
        "vgs_warmup_steps": options.vgs_warmup_steps,
    }
    settings.update({key: value for key, value in explicit.items() if value is not None})
    return settings


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and the run manifest


def _new_manifest(
    spec: envs.EnvSpec,
    seed: Any,
    timesteps: int,
    every: int,
    settings: dict[str, Any],
    resumed_from: str | None,
) -> dict[str, Any]:
    """The manifest of a new run folder, before any checkpoint is listed.

    ``env_id`` and ``n_envs`` repeat fields of ``env`` for readers of the first manifests.
    """
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "env_id": spec.env_id,
        "n_envs": spec.n_envs,
        "env": spec.to_json(),
        "seed": seed,
        "timesteps": timesteps,
        "checkpoint_every": every,
        "model_settings": settings,
        "resumed_from": resumed_from,
        "checkpoints": [],
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Drop temporary files a killed run left behind (they were never complete)."""
    for stale in run_dir.glob(f".{_CHECKPOINT_PREFIX}*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()
    with contextlib.suppress(OSError):
        for stale in run_dir.glob(f".{MANIFEST_NAME}.*{TEMP_SUFFIX}"):
            stale.unlink()


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((run_dir / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        return None
    if not isinstance(manifest.get("checkpoints"), list):
        return None
    return manifest


def _record_in_checkpoint(checkpoint: bytes, env: dict[str, Any], run: dict[str, Any]) -> bytes:
    """``checkpoint`` with the environment spec and the run's targets in its ``dppo_ckpt.json``.

    ``DistributionalPPO.save`` writes that member with the numerics only; the zip is rebuilt
    with every other member unchanged, in the same order and with the same compression.
    """
    import zipfile

    from dppo_ckpt.checkpoint.metadata import METADATA_MEMBER, encode_metadata, parse_metadata

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(checkpoint)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == METADATA_MEMBER:
                numerics = parse_metadata(data)["numerics"]
                data = encode_metadata(numerics, env=env, run=run)
            target.writestr(info, data)
    return out.getvalue()


class _RunFolder:
    """The run folder: writes checkpoints, environment snapshots, VecNormalize statistics and
    the manifest."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        key: bytes | None,
        spec: envs.EnvSpec,
        run_info: dict[str, Any],
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.key = key
        self.spec = spec
        self.run_info = run_info
        self.snapshot_error: str | None = None

    def _save_manifest(self) -> None:
        from dppo_ckpt import signing

        document = signing.sign(self.manifest, self.key) if self.key else self.manifest
        # default=str: TOML dates in the model settings have no JSON form.
        text = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
        write_atomically(self.path / MANIFEST_NAME, text.encode("utf-8"))

    def write(self, model: DistributionalPPO, rng_state: dict[str, Any] | None) -> Path:
        """Write the checkpoint of ``model`` (and its environments), then list them.

        :param rng_state: random generator states to store instead of the current ones (see
            :class:`_TrainingCallback`); ``None`` stores the current ones
        """
        from dppo_ckpt.rng import capture_rng_state, restore_rng_state

        name = checkpoint_name(model.num_timesteps)
        buffer = io.BytesIO()
        if rng_state is None:
            model.save(buffer)
        else:
            # save() records the generators as they are now; show it the earlier state.
            current = capture_rng_state(model.action_space)
            restore_rng_state(rng_state, model.action_space)
            try:
                model.save(buffer)
            finally:
                restore_rng_state(current, model.action_space)
        checkpoint_bytes = _record_in_checkpoint(
            buffer.getvalue(), self.spec.to_json(), self.run_info
        )

        snapshot_entry = None
        if self.snapshot_error is None:
            snapshot_bytes = self._pickle_environments(model.get_env())
            if snapshot_bytes is not None:
                snapshot_name = _snapshot_name(name)
                write_atomically(self.path / snapshot_name, snapshot_bytes)
                snapshot_entry = {"file": snapshot_name, "sha256": _sha256(snapshot_bytes)}
        normalization_entry = None
        normalization = envs.save_normalization(model.get_env())
        if normalization is not None:
            normalization_name = _normalization_name(name)
            write_atomically(self.path / normalization_name, normalization)
            normalization_entry = {"file": normalization_name, "sha256": _sha256(normalization)}
        path = self.path / name
        write_atomically(path, checkpoint_bytes)

        entries = [e for e in self.manifest["checkpoints"] if e.get("file") != name]
        entries.append(
            {
                "file": name,
                "timesteps": model.num_timesteps,
                "sha256": _sha256(checkpoint_bytes),
                "envs": snapshot_entry,
                "normalization": normalization_entry,
            }
        )
        self.manifest["checkpoints"] = entries
        self._save_manifest()
        return path

    def _pickle_environments(self, env: VecEnv | None) -> bytes | None:
        if env is None:
            return None
        try:
            return envs.snapshot_environments(env)
        except envs.SnapshotError as exc:  # names the environment's own exception already
            self.snapshot_error = str(exc).splitlines()[0]
            return None
        except Exception as exc:  # whatever the environment's pickling raises
            self.snapshot_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return None


# ---------------------------------------------------------------------------------------------
# Resuming


@dataclass
class _ResumePoint:
    checkpoint: Path
    manifest: dict[str, Any] | None
    n_envs: int
    timesteps: int
    numerics: dict[str, Any] | None
    #: the environment spec and run targets recorded in the checkpoint's dppo_ckpt.json
    env: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)


def _checkpoint_steps(folder: Path) -> dict[Path, int]:
    """The checkpoints ``train`` wrote into ``folder``, with their step from the file name."""
    found = {}
    for path in folder.glob(f"{_CHECKPOINT_PREFIX}*.zip"):
        digits = path.name[len(_CHECKPOINT_PREFIX) : -len(".zip")]
        if digits.isdigit():
            found[path] = int(digits)
    return found


def _newest_checkpoint(folder: Path) -> Path | None:
    steps = _checkpoint_steps(folder)
    return max(steps, key=lambda p: (steps[p], p.name)) if steps else None


def _not_a_file(path: Path, what: str) -> str:
    """Why ``path`` cannot be a checkpoint: a folder (naming its newest checkpoint) or absent."""
    if path.is_dir():
        newest = _newest_checkpoint(path)
        hint = f": give one of its checkpoints, e.g. {newest}" if newest else ""
        return f"{what} {path}: is a folder, not a checkpoint{hint}"
    if path.exists():
        return f"{what} {path}: not a regular file"
    return f"{what} {path}: no such file"


def _inspect_resume(path: Path) -> _ResumePoint:
    """Check that ``path`` is a readable checkpoint; read its counters, its numerics
    fingerprint, its recorded environment and the manifest (nothing is unpickled here)."""
    from dppo_ckpt.checkpoint.archive import CheckpointError, open_checkpoint

    if not path.is_file():
        raise TrainingError(_not_a_file(path, "cannot resume from"))
    try:
        with open_checkpoint(path) as archive:
            data = archive.data
            metadata = archive.metadata
    except CheckpointError as exc:
        raise TrainingError(
            f"cannot resume from {path}: not a readable checkpoint ({exc.reason})"
        ) from exc
    n_envs, timesteps = data.get("n_envs"), data.get("num_timesteps")
    if not isinstance(n_envs, int) or not isinstance(timesteps, int):
        raise TrainingError(f"cannot resume from {path}: n_envs or num_timesteps missing")
    metadata = metadata or {}
    return _ResumePoint(
        path,
        _read_manifest(path.parent),
        n_envs,
        timesteps,
        metadata.get("numerics"),
        metadata.get("env"),
        dict(metadata.get("run") or {}),
    )


def _manifest_problem(manifest: dict[str, Any], key: bytes | None, key_error: str | None) -> str:
    """Why ``manifest`` is not authenticated, or ``""`` when its signature verifies."""
    from dppo_ckpt import signing

    if key is None:
        return f"cannot be authenticated ({key_error})"
    return signing.verify(manifest, key) or ""


def _recorded_spec(
    point: _ResumePoint, authenticated: str
) -> tuple[envs.EnvSpec | None, str, bool]:
    """The environment spec the run recorded: ``(spec, where, vouched for)``.

    An authenticated manifest speaks first and vouches for its ``module:`` part; otherwise the
    checkpoint's own record, then an unauthenticated manifest's (neither vouches).
    """
    manifest = point.manifest or {}
    sources: list[tuple[Any, str, bool]] = []
    if not authenticated:
        sources.append((manifest.get("env"), f"{MANIFEST_NAME} (signed with your key)", True))
    sources.append((point.env, point.checkpoint.name, False))
    if authenticated:
        sources.append((manifest.get("env"), MANIFEST_NAME, False))
    for value, where, vouched in sources:
        if value is not None:
            try:
                return envs.EnvSpec.from_json(value, where), where, vouched
            except envs.EnvError as exc:
                raise TrainingError(f"cannot resume from {point.checkpoint}: {exc}") from None
    legacy = manifest.get("env_id")  # manifests of dppo-ckpt 0.2: a registered id only
    if isinstance(legacy, str) and ":" not in legacy:
        return envs.EnvSpec(legacy, n_envs=point.n_envs), MANIFEST_NAME, not authenticated
    return None, "", False


def _snapshot_bytes(
    point: _ResumePoint, spec: envs.EnvSpec, authenticated: str, trust: bool
) -> tuple[bytes | None, str]:
    """The environment snapshot beside the checkpoint, if train wrote it and it may be loaded.

    :param authenticated: ``""`` when the manifest's signature verifies, else why not
    :param trust: load the snapshot of a manifest that is not authenticated
    :return: the snapshot's bytes (or None) and why not
    """
    if spec.n_envs != point.n_envs:
        return None, f"--n-envs {spec.n_envs} differs from the checkpoint's {point.n_envs}"
    manifest = point.manifest
    if manifest is None:
        return None, f"no {MANIFEST_NAME} beside the checkpoint"
    if authenticated and not trust:
        return None, (
            f"the snapshot is a pickle and {MANIFEST_NAME} {authenticated}, so "
            "nothing vouches for it; --trust loads it anyway"
        )
    entry = _manifest_entry(point)
    if entry is None or not isinstance(entry.get("envs"), dict):
        return None, "no environment snapshot was written with this checkpoint"
    if entry.get("sha256") != _file_sha256(point.checkpoint):
        return None, "the checkpoint changed since train wrote it"
    snapshot_name = entry["envs"].get("file")
    if not isinstance(snapshot_name, str) or Path(snapshot_name).name != snapshot_name:
        return None, "the manifest names no snapshot beside the checkpoint"
    try:
        data = (point.checkpoint.parent / snapshot_name).read_bytes()
    except OSError:
        return None, f"environment snapshot {snapshot_name} is missing"
    if _sha256(data) != entry["envs"].get("sha256"):
        return None, f"environment snapshot {snapshot_name} changed since written"
    return data, snapshot_name


def _manifest_entry(point: _ResumePoint) -> dict[str, Any] | None:
    manifest = point.manifest or {}
    entry = next(
        (e for e in manifest.get("checkpoints", []) if isinstance(e, dict)
         and e.get("file") == point.checkpoint.name),
        None,
    )  # fmt: skip
    return entry


def _restore_normalization(point: _ResumePoint, env: VecEnv) -> str | None:
    """Load VecNormalize's statistics from beside the checkpoint; a line saying what happened.

    The file holds numbers only (read without pickle), so it needs no authentication; when
    the manifest lists it, its sha256 must still match.
    """
    from stable_baselines3.common.vec_env import VecNormalize

    if envs.find_wrapper(env, VecNormalize) is None:
        return None
    name = _normalization_name(point.checkpoint.name)
    entry = _manifest_entry(point) or {}
    listed = entry.get("normalization") if isinstance(entry.get("normalization"), dict) else None
    if listed is not None and isinstance(listed.get("file"), str):
        name = Path(listed["file"]).name
    try:
        data = (point.checkpoint.parent / name).read_bytes()
    except OSError:
        return f"VecNormalize statistics start fresh ({name} is missing)"
    if listed is not None and _sha256(data) != listed.get("sha256"):
        return f"VecNormalize statistics start fresh ({name} changed since written)"
    try:
        envs.load_normalization(env, data)
    except ValueError as exc:
        return f"VecNormalize statistics start fresh ({name}: {exc})"
    return f"VecNormalize statistics from {name}"


# ---------------------------------------------------------------------------------------------
# Verification


def _load_run_checks() -> Callable[..., Any] | None:
    try:
        from dppo_ckpt.checkpoint.checks import run_checks
    except ImportError:
        return None
    return run_checks


def _first_failure(report: Any) -> str:
    from dppo_ckpt.checkpoint.results import Verdict

    for result in report.results:
        if result.verdict in (Verdict.FAIL, Verdict.ERROR):
            text = f"{result.check_id} {result.title}: {result.message}"
            return f"{text} ({result.remedy})" if result.remedy else text
    return f"the checks ended with exit code {report.exit_code}"


# ---------------------------------------------------------------------------------------------
# Ctrl-C


class _Interrupt:
    """Counts SIGINTs: 1 = stop at the next rollout boundary, 2 = stop now, 3 = abort."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None
        self._installed = False

    @property
    def requested(self) -> bool:
        return self.count >= 1

    @property
    def immediate(self) -> bool:
        return self.count >= 2

    def _handle(self, signum: int, frame: Any) -> None:
        # No printing here: the handler may run while the console holds its lock.
        self.count += 1
        if self.count >= 3:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupt]:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        try:
            yield self
        finally:
            if self._installed:
                signal.signal(signal.SIGINT, self._previous)
                self._installed = False


# ---------------------------------------------------------------------------------------------
# The training loop


def _mean_return(model: DistributionalPPO) -> float | None:
    buffer = model.ep_info_buffer
    if not buffer:
        return None
    return float(sum(info["r"] for info in buffer) / len(buffer))


def _scale_text(model: DistributionalPPO) -> str:
    scaler = model._variance_gradient_scaler
    return "off" if scaler is None else f"{scaler.scaling_factor:.3f}"


class _CheckpointRejected(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _make_callback(
    run: _RunFolder,
    every: int,
    progress: Progress,
    task: TaskID,
    interrupt: _Interrupt,
    on_checkpoint: Callable[[Path, DistributionalPPO], None],
) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    from dppo_ckpt.rng import capture_rng_state

    class TrainingCallback(BaseCallback):
        """Saves at rollout boundaries, feeds the progress bar and honours Ctrl-C.

        A rollout boundary is the start of a rollout: the previous update is complete and
        nothing of the next iteration has happened yet, except that gSDE draws fresh
        exploration noise just before (``policy.reset_noise``). The generators are therefore
        recorded right before that draw and stored in the checkpoint instead of the current
        ones, so that a resumed run draws the same noise again.
        """

        def __init__(self) -> None:
            super().__init__(verbose=0)
            self.last_saved = -1
            self.halt = False
            self.notified = 0
            self._rng_before_noise: dict[str, Any] | None = None
            self._last_refresh = 0.0

        def _on_training_start(self) -> None:
            self.last_saved = self.model.num_timesteps
            policy = self.model.policy
            reset_noise = policy.reset_noise

            def recording_reset_noise(*args: Any, **kwargs: Any) -> Any:
                self._rng_before_noise = capture_rng_state(self.model.action_space)
                return reset_noise(*args, **kwargs)

            # An instance attribute: the policy is saved as a state dict, never pickled.
            policy.reset_noise = recording_reset_noise

        def _on_training_end(self) -> None:
            self.model.policy.__dict__.pop("reset_noise", None)
            self._refresh(force=True)

        def _notify(self) -> None:
            if interrupt.count > self.notified:
                self.notified = interrupt.count
                text = (
                    "Ctrl-C: stopping after this rollout and its update (again to stop now)"
                    if interrupt.count == 1
                    else "Ctrl-C: stopping now"
                )
                progress.console.print(text)
                progress.update(task, description="stopping")

        def _on_rollout_start(self) -> None:
            self._notify()
            model = self.model
            due = model.num_timesteps - self.last_saved >= every
            if (due or interrupt.requested) and model.num_timesteps != self.last_saved:
                rng = self._rng_before_noise if model.use_sde else None
                self.save(rng)
            if interrupt.requested:
                self.halt = True

        def save(self, rng_state: dict[str, Any] | None = None) -> Path:
            path = run.write(self.model, rng_state)
            self.last_saved = self.model.num_timesteps
            on_checkpoint(path, self.model)
            return path

        def _refresh(self, force: bool = False) -> None:
            now = time.monotonic()
            if not force and now - self._last_refresh < 0.2:
                return
            self._last_refresh = now
            model = self.model
            mean_return = _mean_return(model)
            elapsed = max(time.time_ns() - model.start_time, 1) / 1e9
            fps = (model.num_timesteps - model._num_timesteps_at_start) / elapsed
            # After a first Ctrl-C the run takes one more step that the final checkpoint
            # rightly lacks; the bar shows where the run stopped.
            progress.update(
                task,
                completed=self.last_saved if self.halt else model.num_timesteps,
                fps=f"{fps:,.0f}",
                ret="-" if mean_return is None else f"{mean_return:,.1f}",
                scale=_scale_text(model),
            )

        def _on_step(self) -> bool:
            self._notify()
            self._refresh()
            return not (self.halt or interrupt.immediate)

    return TrainingCallback()


def _load_checkpoint(
    path: Path,
    env: VecEnv,
    settings: Mapping[str, Any],
    restored: bool,
    tensorboard_log: str | None,
    options: TrainOptions,
) -> DistributionalPPO:
    """Load the resume checkpoint as ``cycle`` does: scanned, then through the allow-list
    loader (``--trust`` lets refused globals load)."""
    from dppo_ckpt.checkpoint.archive import CheckpointError
    from dppo_ckpt.checkpoint.isolation import probe_load
    from dppo_ckpt.checkpoint.results import EXIT_UNSAFE
    from dppo_ckpt.checkpoint.safe_pickle import ALLOWED_GLOBALS, UnsafePickleError, safe_load
    from dppo_ckpt.ppo import DistributionalPPO

    allow = ALLOWED_GLOBALS
    if options.user_allow is not None and options.user_allow.pairs:
        allow = options.user_allow.merged(ALLOWED_GLOBALS)
    crashed = probe_load(str(path), trust=options.trust, allow=allow)
    if crashed is not None:
        raise TrainingError(crashed[1], crashed[0])
    try:
        model = safe_load(
            path,
            algo_cls=DistributionalPPO,
            env=env,
            device=settings.get("device", "cpu"),
            trust=options.trust,
            allow=allow,
            force_reset=not restored,
            tensorboard_log=tensorboard_log,
        )
    except UnsafePickleError as exc:
        raise TrainingError(
            f"{path} refused as unsafe: {_first_line(exc)} (--trust loads it anyway)",
            EXIT_UNSAFE,
        ) from None
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume from {path}: {exc.reason}") from None
    except Exception as exc:  # SB3 raises anything from a mismatching file
        raise TrainingError(f"cannot resume from {path}: {_first_line(exc)}") from None
    if not isinstance(model, DistributionalPPO):
        raise TrainingError(f"cannot resume from {path}: not a DistributionalPPO checkpoint")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_run_dir(options: TrainOptions, point: _ResumePoint | None) -> Path:
    if options.out is not None:
        return options.out
    if point is not None and options.branch is not None:
        return point.checkpoint.parent / "branches" / options.branch
    if options.resume is not None:
        return options.resume.parent
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


def _check_run_dir(run_dir: Path, resuming_here: bool) -> bool:
    """Refuse a folder that holds another run; nothing is created yet.

    A folder whose run never wrote a checkpoint (killed early) holds nothing to continue, so
    it is reused.

    :return: whether an existing folder is reused
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--out {run_dir} exists and is not a directory")
    if not run_dir.is_dir() or resuming_here:
        return False
    newest = _newest_checkpoint(run_dir)
    if newest is not None:
        raise TrainingError(
            f"{run_dir} already holds a run: continue it with --resume {newest}, "
            "or choose another --out"
        )
    return (run_dir / MANIFEST_NAME).exists()


def _create_run_dir(run_dir: Path) -> None:
    """Create the folder and prove it writable, so that no write fails later with a traceback."""
    import tempfile

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"cannot create {run_dir}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TrainingError(f"cannot write into {run_dir}: {exc.strerror or exc}") from None


def _check_not_behind(point: _ResumePoint, branch: str | None) -> None:
    """Refuse to resume into a folder from a checkpoint older than its newest: the run would
    overwrite the later checkpoints, and TensorBoard would see their steps twice."""
    steps = _checkpoint_steps(point.checkpoint.parent)
    later = sorted((step, path.name) for path, step in steps.items() if step > point.timesteps)
    if later and branch is None:
        raise TrainingError(
            f"{point.checkpoint} is not the newest checkpoint of {point.checkpoint.parent} "
            f"({later[-1][1]}); resuming there would overwrite later checkpoints: continue "
            f"into {point.checkpoint.parent / 'branches' / 'NAME'} with --branch NAME, or "
            "choose another --out"
        )


def _tensorboard_name(tensorboard_log: str | None, point: _ResumePoint | None) -> str:
    """The TensorBoard run name: a resumed run gets its own, after the step it resumed from,
    so that no event directory holds a step twice."""
    if point is None:
        return "dppo"
    base = f"resumed-{point.timesteps:09d}"
    name, attempt = base, 1
    while tensorboard_log is not None and any(Path(tensorboard_log).glob(f"{name}_*")):
        attempt += 1
        name = f"{base}-{attempt}"
    return name


def _progress(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  {task.fields[fps]} fps"),
        TextColumn("return {task.fields[ret]}"),
        TextColumn("vgs {task.fields[scale]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def train(options: TrainOptions, console: Console) -> TrainSummary:
    """Train (or resume) a run as ``dppo-ckpt train`` does, printing progress on ``console``.

    :raises TrainingError: an option could not be used (exit 2) or a checkpoint failed its
        checks (the exit code of those checks)
    :raises KeyboardInterrupt: on a third Ctrl-C
    """
    try:
        return _train(options, console)
    except envs.EnvError as exc:
        raise TrainingError(str(exc), exc.exit_code) from None


def _env_options(options: TrainOptions, config: Mapping[str, Any]) -> envs.EnvOptions:
    """The environment options given: the command line over the config's tables."""
    env_kwargs = options.env_kwargs
    if env_kwargs is None and "env_kwargs" in config:
        env_kwargs = dict(config["env_kwargs"])
    return envs.EnvOptions(
        env_id=options.env_id,
        n_envs=options.n_envs,
        env_kwargs=env_kwargs,
        vec_env=options.vec_env,
        normalize=options.normalize,
        normalize_options=config.get("normalize"),
        frame_stack=options.frame_stack,
        atari=options.atari,
    )


def _train(options: TrainOptions, console: Console) -> TrainSummary:
    from dppo_ckpt import numerics

    try:  # first: the libraries fix their numerics when they load
        numerics.apply_numerics(numerics.PORTABLE if options.portable else numerics.NATIVE)
    except numerics.NumericsError as exc:
        raise TrainingError(str(exc)) from None
    _check_options(options)
    point = _inspect_resume(options.resume) if options.resume is not None else None
    manifest_in = point.manifest if point is not None else None
    previous = manifest_in or {}
    recorded_run = point.run if point is not None else {}

    config = load_config(options.config) if options.config is not None else {}
    given = _env_options(options, config)
    timesteps = (
        options.timesteps or previous.get("timesteps") or recorded_run.get("timesteps")
        or DEFAULT_TIMESTEPS
    )  # fmt: skip
    every = (
        options.checkpoint_every or previous.get("checkpoint_every")
        or recorded_run.get("checkpoint_every") or DEFAULT_CHECKPOINT_EVERY
    )  # fmt: skip

    run_dir = _resolve_run_dir(options, point)
    resuming_here = point is not None and run_dir.resolve() == point.checkpoint.parent.resolve()
    if point is not None and resuming_here and timesteps > point.timesteps:
        _check_not_behind(point, options.branch)
    reused = _check_run_dir(run_dir, resuming_here)
    tensorboard_log = str(run_dir / "tensorboard") if options.tensorboard else None

    import torch as th

    from dppo_ckpt import signing
    from dppo_ckpt.ppo import DistributionalPPO

    key_error: str | None = None
    try:
        key: bytes | None = signing.load_key()
    except signing.SigningKeyError as exc:
        key, key_error = None, str(exc)
        console.print(f"note: the run manifest is not signed: {key_error}")

    if point is None:
        env_id = given.env_id or DEFAULT_ENV_ID
        spec = envs.resolve_spec(given, None, default_n_envs=TUNED_N_ENVS.get(env_id, 1))
        settings = _model_settings(options, config, spec.gym_id)
        seed = settings["seed"]
        env = envs.build_vec_env(spec, seed, allowed=True, source="--env")
        if tensorboard_log is not None:
            settings["tensorboard_log"] = tensorboard_log
        try:
            model = DistributionalPPO(envs.policy_for(env.observation_space), env, **settings)
        except (TypeError, ValueError, AssertionError) as exc:
            envs.close_quietly(env)
            raise TrainingError(f"invalid model settings: {exc}".splitlines()[0]) from exc
        manifest = _new_manifest(spec, seed, timesteps, every, settings, None)
        console.print(f"training {spec.env_id} for {timesteps:,} steps into {run_dir}")
        console.print(f"environment: {spec.describe()}")
    else:
        settings = dict(previous.get("model_settings") or {})
        seed = options.seed
        if seed is None:
            seed = previous.get("seed", recorded_run.get("seed", 0))
        authenticated = (
            _manifest_problem(point.manifest, key, key_error) if point.manifest else "is missing"
        )
        recorded, where, vouched = _recorded_spec(point, authenticated)
        if recorded is None and options.env_id is None:
            raise TrainingError(
                f"cannot tell which environment {point.checkpoint} was trained on: it records "
                f"none and no {MANIFEST_NAME} beside it names one; pass --env ID"
            )
        spec = envs.resolve_spec(given, recorded, default_n_envs=point.n_envs, fixed=True)
        named = options.env_id is not None and options.env_id == spec.env_id
        allowed = named or vouched or options.trust
        # Fresh environments are seeded past the original start, so that they do not replay
        # the episodes the run began with.
        fresh_seed = (int(seed) + point.timesteps) % 2**32
        env = envs.build_vec_env(spec, fresh_seed, allowed=allowed, source=where or "the record")
        restored = False
        snapshot, why = _snapshot_bytes(point, spec, authenticated, options.trust)
        if snapshot is not None:
            # Authenticated: train wrote it for this user (or --trust); the sha256 matches.
            problem = envs.restore_snapshot(env, snapshot)
            if problem is None:
                restored, env_line = True, f"environments restored from {why}"
            else:
                envs.close_quietly(env)
                env = envs.build_vec_env(spec, fresh_seed, allowed=allowed)
                env_line = f"{_FRESH} (snapshot {why}: {problem})"
        else:
            env_line = f"{_FRESH} ({why})"
        normalization_line = _restore_normalization(point, env)
        model = _load_checkpoint(
            point.checkpoint, env, settings, restored, tensorboard_log, options
        )
        if not restored:
            # load() re-seeds the environments with the run's original seed.
            model.get_env().seed(fresh_seed)
        # Only an authenticated manifest is carried on: re-signing a forged one would make
        # its entries (snapshots included) look like ours to the next resume.
        if resuming_here and manifest_in is not None and not authenticated:
            manifest = manifest_in
            manifest["timesteps"] = timesteps
            manifest["checkpoint_every"] = every
            manifest["env"] = spec.to_json()
        else:
            manifest = _new_manifest(spec, seed, timesteps, every, settings, str(point.checkpoint))
        console.print(
            f"resuming {point.checkpoint} at step {model.num_timesteps:,} of {timesteps:,} "
            f"into {run_dir}; {env_line}"
        )
        source = "--env" if named and recorded is None else (where or "the options")
        console.print(f"environment: {spec.describe()} (from {source})")
        if normalization_line is not None:
            console.print(normalization_line)
        note = numerics.resume_note(point.numerics)
        if note is not None:
            console.print(f"note: {note}")

    try:
        _create_run_dir(run_dir)
    except TrainingError:
        envs.close_quietly(model.get_env())
        raise
    _remove_stale_temporaries(run_dir)
    if reused:
        console.print(f"note: reusing {run_dir}: its run wrote no checkpoint")
    run_info = {"timesteps": timesteps, "checkpoint_every": every, "seed": seed}
    run = _RunFolder(run_dir, manifest, key, spec, run_info)
    run._save_manifest()
    run_checks = _load_run_checks()
    summary = TrainSummary(
        run_dir=run_dir,
        start_timesteps=model.num_timesteps,
        timesteps=model.num_timesteps,
        wall_time_s=0.0,
        vgs_scale=None,
        vgs_step=None,
        unverified=run_checks is None,
    )
    if run_checks is None:
        console.print("note: the checkpoint checks are not available; checkpoints unverified")

    def on_checkpoint(path: Path, current: DistributionalPPO) -> None:
        summary.checkpoints.append(path)
        status = "unverified"
        if run_checks is not None:
            # Checks load the file, which moves the generators; training must not notice.
            from dppo_ckpt.rng import capture_rng_state, restore_rng_state

            rng = capture_rng_state(current.action_space)
            threads = th.get_num_threads()
            try:
                report = run_checks(path, quick=True)
            finally:
                th.set_num_threads(threads)
                restore_rng_state(rng, current.action_space)
            if report.exit_code != 0:
                raise _CheckpointRejected(
                    f"checkpoint {path} failed its checks: {_first_failure(report)}",
                    report.exit_code,
                )
            status = "verified"
        line = f"checkpoint {current.num_timesteps:,} steps: {path} ({status})"
        console.print(line, highlight=False, soft_wrap=True)

    interrupt = _Interrupt()
    remaining = max(timesteps - model.num_timesteps, 0)
    started = time.perf_counter()
    halted = False
    if remaining == 0:
        console.print(
            f"nothing to train: the checkpoint is at step {model.num_timesteps:,}, "
            f"--timesteps is {timesteps:,}"
        )
        summary.last_checkpoint = options.resume
    else:
        try:
            with interrupt.installed(), _progress(console) as progress:
                task = progress.add_task(
                    "training",
                    total=timesteps,
                    completed=model.num_timesteps,
                    fps="-",
                    ret="-",
                    scale=_scale_text(model),
                )
                callback = _make_callback(run, every, progress, task, interrupt, on_checkpoint)
                model.learn(
                    remaining,
                    callback=callback,
                    reset_num_timesteps=point is None,
                    tb_log_name=_tensorboard_name(tensorboard_log, point),
                )
                # A first Ctrl-C already saved at the rollout boundary (the model went on for
                # one more step before learn() returned, which that checkpoint rightly lacks).
                halted = callback.halt
                if not halted and callback.last_saved != model.num_timesteps:
                    callback.save()
        except _CheckpointRejected as exc:
            raise TrainingError(str(exc), exc.exit_code) from None
        summary.last_checkpoint = summary.checkpoints[-1]
    summary.wall_time_s = time.perf_counter() - started
    summary.timesteps = callback.last_saved if halted else model.num_timesteps
    summary.interrupted = interrupt.requested and summary.timesteps < timesteps
    scaler = model._variance_gradient_scaler
    if scaler is not None:
        summary.vgs_scale, summary.vgs_step = scaler.scaling_factor, scaler.step_count
        summary.vgs_level, summary.vgs_counts = scaler.level, scaler.factor_counts
    if run.snapshot_error is not None:
        console.print(
            f"note: the environments cannot be pickled ({run.snapshot_error}); "
            f"--resume will say: {_FRESH}"
        )

    if options.eval_episodes > 0 and not summary.interrupted:
        from stable_baselines3.common.evaluation import evaluate_policy

        eval_env = _evaluation_env(spec, model.get_env(), (int(seed) + 1_000_003) % 2**32)
        try:
            mean, std = evaluate_policy(
                model, eval_env, n_eval_episodes=options.eval_episodes, deterministic=True
            )
        finally:
            eval_env.close()
        summary.eval_return_mean, summary.eval_return_std = float(mean), float(std)
        summary.eval_episodes = options.eval_episodes
    model.get_env().close()
    return summary


def _evaluation_env(spec: envs.EnvSpec, training_env: VecEnv | None, seed: int) -> VecEnv:
    """One environment of the training stack, in process; a VecNormalize in it uses the
    training statistics, frozen, and reports the true rewards."""
    import copy

    from stable_baselines3.common.vec_env import VecNormalize

    # The module, if any, was imported (or refused) when the training stack was built.
    env = envs.build_vec_env(
        dataclasses.replace(spec, n_envs=1, vec_env="dummy"), seed, allowed=True
    )
    normalize = envs.find_wrapper(env, VecNormalize)
    trained = envs.find_wrapper(training_env, VecNormalize)
    if normalize is not None and trained is not None:
        normalize.obs_rms = copy.deepcopy(trained.obs_rms)
        normalize.training = False
        normalize.norm_reward = False
    return env


def _factor_line(counts: dict[str, float] | None) -> str:
    """The mean factor and the shares at its bounds, over the updates after warm-up."""
    steps = 0 if counts is None else int(counts["steps"])
    if counts is None or steps == 0:
        return "no update after warm-up yet"
    return (
        f"mean {counts['scale_sum'] / steps:.3f}; at min_scale {counts['at_min'] / steps:.1%}, "
        f"at 1 {counts['at_one'] / steps:.1%} of {steps:,} updates"
    )


def render_summary(summary: TrainSummary, console: Console) -> None:
    """The summary table of a run, then the path of its last checkpoint."""
    from rich.table import Table

    table = Table(title="training summary", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    steps = f"{summary.timesteps:,}"
    if summary.start_timesteps:
        steps += f" (resumed at {summary.start_timesteps:,})"
    table.add_row("steps", steps)
    table.add_row("wall time", f"{summary.wall_time_s:,.1f} s")
    table.add_row("fps", f"{summary.fps:,.0f}")
    if summary.eval_return_mean is not None:
        table.add_row(
            "final evaluation return",
            f"{summary.eval_return_mean:,.1f} ± {summary.eval_return_std:,.1f} "
            f"({summary.eval_episodes} episode{'s' if summary.eval_episodes != 1 else ''})",
        )
    else:
        table.add_row("final evaluation return", "not evaluated")
    if summary.vgs_scale is None:
        table.add_row("VGS scale", "off")
    else:
        table.add_row("VGS scale", f"{summary.vgs_scale:.4f} (step {summary.vgs_step:,})")
        level = "not set yet" if summary.vgs_level is None else f"{summary.vgs_level:.4g}"
        table.add_row("VGS level of the noise ratio", level)
        table.add_row("VGS factor after warm-up", _factor_line(summary.vgs_counts))
    written = f"{len(summary.checkpoints)}"
    if summary.unverified:
        written += " (unverified)"
    table.add_row("checkpoints written", written)
    console.print(table)
    if summary.interrupted:
        console.print("stopped by Ctrl-C; the final checkpoint is complete and verified")
    if summary.last_checkpoint is not None:
        console.print(
            f"last checkpoint: {summary.last_checkpoint}", highlight=False, soft_wrap=True
        )
