"""The environment spec: one description of the environment stack, built, recorded and rebuilt.

``train`` and ``cycle`` build their environments from an :class:`EnvSpec` and nothing else,
so that what a run trained on can be written down (the run manifest and the checkpoint's
``dppo_ckpt.json``) and rebuilt exactly by ``train --resume`` and ``cycle MODEL.zip``::

    gymnasium.make(env_id, **env_kwargs)      per environment, seeded seed + rank
      Monitor                                 episode returns for the progress bar
      AtariWrapper                            with --atari
      Snapshottable                           lets the run snapshot each environment
    DummyVecEnv | SubprocVecEnv               --vec-env
      VecNormalize                            --normalize (options from the config)
      VecFrameStack                           --frame-stack N

An ``env_id`` of the form ``module:EnvId`` imports ``module`` first, as ``gymnasium.make``
does. Importing runs the module's code, so a spec read from a file never imports by itself:
the caller says whether the import is allowed (:func:`import_env_module`), and it is only when
the user named the environment, the spec comes from a run manifest authenticated with the
user's key, or ``--trust`` was given.

The per-environment wrapper :class:`dppo_ckpt._snapshottable.Snapshottable` pickles and
restores the environment it wraps *inside* the process that runs it, so a ``SubprocVecEnv``'s
remote environments are snapshotted through ``env_method`` exactly like a ``DummyVecEnv``'s.
VecNormalize's running statistics are plain arrays and are stored as a ``.npz`` (never a
pickle), so they can be read back from any file without running anything from it.

Importing this module loads neither numpy nor gymnasium, so that ``train`` and ``cycle`` can
still choose the numerics before those libraries load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gymnasium as gym
    from stable_baselines3.common.vec_env import VecEnv

__all__ = [
    "DEFAULT_ENV_ID",
    "NORMALIZE_OPTIONS",
    "VEC_ENV_KINDS",
    "EnvError",
    "EnvOptions",
    "EnvSpec",
    "SnapshotError",
    "build_stack",
    "build_vec_env",
    "check_normalize_options",
    "close_quietly",
    "find_wrapper",
    "import_env_module",
    "load_normalization",
    "parse_env_kwargs",
    "policy_for",
    "resolve_spec",
    "restore_snapshot",
    "save_normalization",
    "snapshot_environments",
    "statistics_path",
]

DEFAULT_ENV_ID = "Pendulum-v1"
VEC_ENV_KINDS = ("dummy", "subproc")

#: VecNormalize's keywords that a config's ``[normalize]`` table may set, with their JSON types.
NORMALIZE_OPTIONS: dict[str, tuple[type, ...]] = {
    "norm_obs": (bool,),
    "norm_reward": (bool,),
    "clip_obs": (int, float),
    "clip_reward": (int, float),
    "gamma": (int, float),
    "epsilon": (int, float),
    "norm_obs_keys": (list,),
}

_SNAPSHOT_FORMAT = 2
# The spec's own fields, in the order of its JSON form.
_SPEC_FIELDS = ("env_id", "n_envs", "env_kwargs", "vec_env", "normalize", "frame_stack", "atari")
# VecNormalize statistics: a few arrays the size of one observation; far larger is not ours.
_MAX_NORMALIZATION_BYTES = 64 * 1024 * 1024


class SnapshotError(ValueError):
    """An environment of the stack cannot be snapshotted; the message says why."""


class EnvError(Exception):
    """The environment spec cannot be used; the commands exit with ``exit_code`` (2)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class EnvSpec:
    """Everything that decides which environments a run steps through, as plain JSON.

    :param env_id: a registered gymnasium id, or ``module:EnvId`` (``module`` is imported
        first, only where :func:`import_env_module` allows it)
    :param n_envs: parallel environments
    :param env_kwargs: keywords for ``gymnasium.make``
    :param vec_env: ``"dummy"`` (in process) or ``"subproc"`` (one process per environment)
    :param normalize: VecNormalize's keywords, or ``None`` for no VecNormalize
    :param frame_stack: frames stacked by VecFrameStack (0: none)
    :param atari: wrap each environment in SB3's AtariWrapper
    """

    env_id: str
    n_envs: int = 1
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    vec_env: str = "dummy"
    normalize: Mapping[str, Any] | None = None
    frame_stack: int = 0
    atari: bool = False

    @property
    def module(self) -> str | None:
        """The module an ``env_id`` of the form ``module:EnvId`` imports, else ``None``."""
        module, sep, _ = self.env_id.partition(":")
        return module if sep else None

    @property
    def gym_id(self) -> str:
        """The registered id, without a ``module:`` part."""
        return self.env_id.rpartition(":")[2]

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON object (keys in a fixed order)."""
        return {
            "env_id": self.env_id,
            "n_envs": self.n_envs,
            "env_kwargs": dict(self.env_kwargs),
            "vec_env": self.vec_env,
            "normalize": None if self.normalize is None else dict(self.normalize),
            "frame_stack": self.frame_stack,
            "atari": self.atari,
        }

    @classmethod
    def from_json(cls, value: Any, where: str) -> EnvSpec:
        """Read a spec written by :meth:`to_json`, checking every field.

        :param where: names the source in messages, e.g. ``"run.json"``
        :raises EnvError: a field is missing or has another type
        """
        if not isinstance(value, dict):
            raise EnvError(f"{where}: the environment spec is not a JSON object")
        unknown = sorted(set(value) - set(_SPEC_FIELDS))
        if unknown:
            raise EnvError(f"{where}: unknown environment spec field {unknown[0]!r}")
        env_id = value.get("env_id")
        if not isinstance(env_id, str) or not env_id:
            raise EnvError(f"{where}: the environment spec has no env_id")
        n_envs = value.get("n_envs", 1)
        frame_stack = value.get("frame_stack", 0)
        for name, number in (("n_envs", n_envs), ("frame_stack", frame_stack)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise EnvError(f"{where}: environment spec field {name} is not a count")
        env_kwargs = value.get("env_kwargs") or {}
        if not isinstance(env_kwargs, dict):
            raise EnvError(f"{where}: environment spec field env_kwargs is not an object")
        normalize = value.get("normalize")
        if normalize is not None:
            if not isinstance(normalize, dict):
                raise EnvError(f"{where}: environment spec field normalize is not an object")
            check_normalize_options(normalize, f"{where}: normalize")
        atari = value.get("atari", False)
        if not isinstance(atari, bool):
            raise EnvError(f"{where}: environment spec field atari is not true or false")
        vec_env = value.get("vec_env", "dummy")
        if vec_env not in VEC_ENV_KINDS:
            raise EnvError(f"{where}: environment spec field vec_env is {vec_env!r}")
        return cls(env_id, max(n_envs, 1), env_kwargs, vec_env, normalize, frame_stack, atari)

    def describe(self) -> str:
        """One line for the terminal: ``CartPole-v1 x4 (subproc), VecNormalize, 4 frames``."""
        parts = [f"{self.env_id} x{self.n_envs} ({self.vec_env})"]
        if self.env_kwargs:
            parts.append("env_kwargs " + json.dumps(dict(self.env_kwargs), sort_keys=True))
        if self.atari:
            parts.append("AtariWrapper")
        if self.normalize is not None:
            options = ", ".join(f"{k}={v}" for k, v in sorted(self.normalize.items()))
            parts.append(f"VecNormalize({options})" if options else "VecNormalize")
        if self.frame_stack:
            parts.append(f"{self.frame_stack} stacked frames")
        return ", ".join(parts)


@dataclass
class EnvOptions:
    """The environment options the user gave; ``None`` means "not given"."""

    env_id: str | None = None
    n_envs: int | None = None
    env_kwargs: Mapping[str, Any] | None = None
    vec_env: str | None = None
    normalize: bool | None = None
    normalize_options: Mapping[str, Any] | None = None
    frame_stack: int | None = None
    atari: bool | None = None


def parse_env_kwargs(text: str | None) -> dict[str, Any] | None:
    """``--env-kwargs`` as a dict: a JSON object, or ``None`` when not given.

    :raises EnvError: not JSON, or not an object
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise EnvError(f"--env-kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EnvError(f"--env-kwargs must be a JSON object such as '{{\"g\": 9.81}}', got {text}")
    return value


def check_normalize_options(options: Mapping[str, Any], where: str) -> None:
    """Check VecNormalize keywords by name and type (a typo must not be silently ignored).

    :raises EnvError: names the key
    """
    for key, value in options.items():
        types = NORMALIZE_OPTIONS.get(key)
        if types is None:
            known = ", ".join(NORMALIZE_OPTIONS)
            raise EnvError(f"{where}: unknown key {key!r} (VecNormalize takes {known})")
        if isinstance(value, bool) and bool not in types:
            raise EnvError(f"{where}.{key} must be a number, got {value!r}")
        if not isinstance(value, types):
            kind = "true or false" if bool in types else types[0].__name__
            kind = "a number" if float in types else kind
            raise EnvError(f"{where}.{key} must be {kind}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise EnvError(f"{where}.{key} must be finite, got {value!r}")


def _check_options(given: EnvOptions) -> None:
    if given.n_envs is not None and given.n_envs <= 0:
        raise EnvError(f"--n-envs must be > 0, got {given.n_envs}")
    if given.frame_stack is not None and given.frame_stack < 0:
        raise EnvError(f"--frame-stack must be >= 0, got {given.frame_stack}")
    if given.vec_env is not None and given.vec_env not in VEC_ENV_KINDS:
        raise EnvError(f"--vec-env must be 'dummy' or 'subproc', got {given.vec_env!r}")
    if given.env_id is not None and not given.env_id.strip(":"):
        raise EnvError(f"--env {given.env_id!r} names no environment")


def resolve_spec(
    given: EnvOptions,
    recorded: EnvSpec | None,
    *,
    default_n_envs: int = 1,
    default_id: str | None = DEFAULT_ENV_ID,
    fixed: bool = False,
) -> EnvSpec:
    """The spec to build: the recorded one with the options the user gave on top.

    :param recorded: the spec a run folder or checkpoint recorded, if any
    :param default_n_envs: ``n_envs`` when neither the user nor a record gives one
    :param default_id: the environment when neither the user nor a record names one;
        ``None`` makes that an error (a checkpoint must not silently train elsewhere)
    :param fixed: the recorded stack fixes the model's observations (a resumed model):
        wrapper options that differ from the record are refused instead of applied
    :raises EnvError: an option is invalid, or contradicts a fixed record
    """
    _check_options(given)
    normalize: Mapping[str, Any] | None
    if given.normalize is False:
        normalize = None
    elif given.normalize or given.normalize_options is not None:
        normalize = dict(given.normalize_options or {})
    else:
        normalize = None
    if recorded is None:
        env_id = given.env_id or default_id
        if env_id is None:
            raise EnvError("no environment is recorded: pass --env ID")
        return EnvSpec(
            env_id=env_id,
            n_envs=given.n_envs or default_n_envs,
            env_kwargs=dict(given.env_kwargs or {}),
            vec_env=given.vec_env or "dummy",
            normalize=normalize,
            frame_stack=given.frame_stack or 0,
            atari=bool(given.atari),
        )
    changes: dict[str, Any] = {}
    if given.env_id is not None:
        changes["env_id"] = given.env_id
    if given.n_envs is not None:
        changes["n_envs"] = given.n_envs
    if given.vec_env is not None:
        changes["vec_env"] = given.vec_env
    wrappers: dict[str, tuple[str, Any]] = {}
    if given.env_kwargs is not None:
        wrappers["env_kwargs"] = ("--env-kwargs", dict(given.env_kwargs))
    options_given = given.normalize_options is not None
    # A bare --normalize agrees with a recorded VecNormalize: its recorded options stay.
    keeps_recorded = normalize is not None and recorded.normalize is not None and not options_given
    if (given.normalize is not None or options_given) and not keeps_recorded:
        wrappers["normalize"] = ("--normalize", normalize)
    if given.frame_stack is not None:
        wrappers["frame_stack"] = ("--frame-stack", given.frame_stack)
    if given.atari is not None:
        wrappers["atari"] = ("--atari", given.atari)
    for name, (option, value) in wrappers.items():
        if fixed and value != getattr(recorded, name):
            raise EnvError(
                f"{option} differs from the recorded environment ({recorded.describe()}): "
                "the checkpoint's model was trained on that stack"
            )
        changes[name] = value
    return dataclasses.replace(recorded, **changes)


# ---------------------------------------------------------------------------------------------
# Building


def import_env_module(spec: EnvSpec, *, allowed: bool, source: str = "the record") -> None:
    """Import the ``module:`` part of ``spec.env_id`` (and ale-py for Atari), if allowed.

    :param allowed: the user named this environment, or its record is authenticated, or
        ``--trust`` was given; otherwise a ``module:`` part is refused
    :param source: what recorded the spec, for the refusal's message
    :raises EnvError: the import is not allowed, or fails, or an optional extra is missing
    """
    import gymnasium as gym

    if spec.atari or spec.gym_id.startswith("ALE/"):
        missing = [name for name in ("ale_py", "cv2") if importlib.util.find_spec(name) is None]
        if missing:
            what = "--atari" if spec.atari else f"--env {spec.env_id}"
            raise EnvError(
                f"{what} needs {' and '.join(_PACKAGES[m] for m in missing)}: "
                "pip install 'dppo-ckpt[atari]'"
            )
        import ale_py

        gym.register_envs(ale_py)
    module = spec.module
    if module is None:
        return
    if not allowed:
        raise EnvError(
            f"{source} names environment {spec.env_id!r}, whose module {module!r} would have "
            f"to be imported (that runs its code): pass --env {spec.env_id} to import it"
        )
    try:
        importlib.import_module(module)
    except Exception as exc:  # the module's own code may raise anything
        raise EnvError(
            f"--env {spec.env_id}: cannot import module {module!r}: {_one_line(exc)}"
        ) from None


_PACKAGES = {"ale_py": "ale-py", "cv2": "opencv-python"}


def _check_registered(spec: EnvSpec) -> None:
    import gymnasium as gym

    try:
        gym.spec(spec.gym_id)
    except gym.error.Error as exc:
        raise EnvError(f"unknown environment id {spec.env_id!r}: {_one_line(exc)}") from None


def _space_problem(space: gym.Space, what: str) -> str | None:
    from gymnasium import spaces

    # What the policies handle: these, and for observations a Dict of them (unnested).
    simple = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
    if isinstance(space, simple):
        return None
    if what == "observation" and isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            if not isinstance(sub, simple):
                return f"its {what} space {key!r} is {type(sub).__name__}"
        return None
    return f"its {what} space is {type(space).__name__}"


def _check_spaces(spec: EnvSpec, env: VecEnv | gym.Env) -> None:
    for what, space in (("observation", env.observation_space), ("action", env.action_space)):
        problem = _space_problem(space, what)
        if problem is not None:
            kinds = "Box, Discrete, MultiDiscrete, MultiBinary"
            if what == "observation":
                kinds += " or a Dict of them"
            raise EnvError(f"{spec.env_id} is not supported: {problem} (supported: {kinds})")


def _make_one(spec: EnvSpec, rank: int, seed: int | None, builder_pid: int = 0) -> gym.Env:
    """One environment of the stack, as SB3's ``make_vec_env`` makes it.

    A module-level function (pickled by reference): a ``SubprocVecEnv`` worker calls it in
    its own process, which therefore imports the ``module:`` part and ale-py by itself.

    :param builder_pid: the process that builds the stack; called in another one (a worker),
        the worker ignores Ctrl-C
    """
    import gymnasium as gym

    if builder_pid and os.getpid() != builder_pid:
        # Ctrl-C reaches the whole process group; SB3's worker ends on it and breaks the pipe
        # that the training process still steps through. That process decides when to stop
        # (at a rollout boundary, after its final checkpoint) and closes the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from stable_baselines3.common.monitor import Monitor

    from dppo_ckpt._snapshottable import Snapshottable

    if spec.atari or spec.gym_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    kwargs = dict(spec.env_kwargs)
    try:
        env = gym.make(spec.env_id, **{"render_mode": "rgb_array", **kwargs})
    except TypeError:  # an environment without render_mode, as make_vec_env falls back
        env = gym.make(spec.env_id, **kwargs)
    if seed is not None:
        env.action_space.seed(seed + rank)
    env = Monitor(env)
    if spec.atari:
        from stable_baselines3.common.atari_wrappers import AtariWrapper

        env = AtariWrapper(env)
    return Snapshottable(env)


def build_vec_env(
    spec: EnvSpec, seed: int | None, *, allowed: bool, source: str = "the record"
) -> VecEnv:
    """Build the environment stack of ``spec``, seeded like ``make_vec_env``.

    :param allowed: whether a ``module:`` part may be imported (see :func:`import_env_module`)
    :raises EnvError: the environment cannot be built, or its spaces are not supported
    """
    from stable_baselines3.common.vec_env import (
        DummyVecEnv,
        SubprocVecEnv,
        VecFrameStack,
        VecNormalize,
    )

    import_env_module(spec, allowed=allowed, source=source)
    _check_registered(spec)
    factories = [
        functools.partial(_make_one, spec, rank, seed, os.getpid()) for rank in range(spec.n_envs)
    ]
    if spec.vec_env == "subproc":
        # A worker that fails to build its environment dies with a traceback on stderr and
        # leaves a broken pipe: build one here first, where a failure is one line.
        try:
            probe = _make_one(spec, 0, seed)
        except Exception as exc:  # gymnasium and the environment's code raise many kinds
            raise EnvError(f"cannot create environment {spec.env_id!r}: {_one_line(exc)}") from None
        try:
            _check_spaces(spec, probe)
        finally:
            with contextlib.suppress(Exception):
                probe.close()
    try:
        venv: VecEnv = (
            SubprocVecEnv(factories) if spec.vec_env == "subproc" else DummyVecEnv(factories)
        )
    except Exception as exc:  # gymnasium and the environment's code raise many kinds
        raise EnvError(f"cannot create environment {spec.env_id!r}: {_one_line(exc)}") from None
    try:
        _check_spaces(spec, venv)
        venv.seed(seed)
        if spec.normalize is not None:
            venv = VecNormalize(venv, **dict(spec.normalize))
        if spec.frame_stack:
            venv = VecFrameStack(venv, spec.frame_stack)
    except EnvError:
        close_quietly(venv)
        raise
    except Exception as exc:  # a wrapper refusing the spaces, or bad VecNormalize options
        close_quietly(venv)
        raise EnvError(f"cannot wrap environment {spec.env_id!r}: {_one_line(exc)}") from None
    return venv


def statistics_path(checkpoint: Path) -> Path:
    """Where ``train`` writes VecNormalize's statistics beside ``checkpoint``."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".zip") + ".vecnorm.npz")


def _read_statistics(venv: VecEnv, path: Path) -> bytes:
    """The statistics file's bytes, read only from a regular file within the size limit.

    :raises EnvError: refused (the stack is closed)
    :raises OSError: missing or unreadable
    """
    from dppo_ckpt import _npz

    try:
        return _npz.read_regular_file(path, _MAX_NORMALIZATION_BYTES)
    except _npz.NpzRefused as exc:
        close_quietly(venv)
        raise _refused(path.name, exc) from None


def _refused(name: str, reason: object) -> EnvError:
    # One line for the terminal, saying what the user can do about it.
    return EnvError(
        f"VecNormalize statistics refused: {name} {reason} "
        "(move it away to start the statistics fresh)"
    )


def build_stack(
    spec: EnvSpec,
    seed: int | None,
    *,
    allowed: bool,
    source: str = "the record",
    statistics: Path | None = None,
    sha256: str | None = None,
) -> tuple[VecEnv, str | None]:
    """The one environment builder of ``train`` and ``cycle``: the stack of ``spec``
    (:func:`build_vec_env`), with VecNormalize's statistics read from ``statistics``.

    The statistics file holds numbers only (read without pickle), so it needs no
    authentication; a missing, changed or damaged file, or one that does not fit the stack,
    leaves them fresh, and the line says so. A file that could make reading it hang, exhaust
    memory or need pickle (not a regular file, over the size limit, arrays that are not
    numbers) is refused instead: the user decides what to do with it.

    :param statistics: the ``.vecnorm.npz`` beside the checkpoint the stack resumes, if any
    :param sha256: the digest the run manifest lists for that file, if it lists one
    :return: the stack, and the line saying where VecNormalize's statistics came from
        (``None`` without VecNormalize or without a file to read them from)
    :raises EnvError: the environment cannot be built, or the statistics file is refused
    """
    from stable_baselines3.common.vec_env import VecNormalize

    venv = build_vec_env(spec, seed, allowed=allowed, source=source)
    if statistics is None or find_wrapper(venv, VecNormalize) is None:
        return venv, None
    name = statistics.name
    try:
        data = _read_statistics(venv, statistics)
    except FileNotFoundError:
        return venv, f"VecNormalize statistics start fresh ({name} is missing)"
    except OSError as exc:
        return venv, f"VecNormalize statistics start fresh ({name}: {exc.strerror or exc})"
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        return venv, f"VecNormalize statistics start fresh ({name} changed since written)"
    try:
        load_normalization(venv, data)
    except EnvError as exc:
        close_quietly(venv)
        raise _refused(name, exc) from None
    except ValueError as exc:
        return venv, f"VecNormalize statistics start fresh ({name}: {exc})"
    return venv, f"VecNormalize statistics from {name}"


def close_quietly(venv: VecEnv | None) -> None:
    """Close ``venv`` (its worker processes included); a failure to close is not news."""
    if venv is None:
        return
    with contextlib.suppress(Exception):  # already failing or already closed
        venv.close()


def policy_for(observation_space: gym.Space) -> str:
    """The policy alias for these observations: MultiInput for Dict, Cnn for images."""
    from gymnasium import spaces
    from stable_baselines3.common.preprocessing import is_image_space

    if isinstance(observation_space, spaces.Dict):
        return "MultiInputPolicy"
    if is_image_space(observation_space, check_channels=False):
        return "CnnPolicy"
    return "MlpPolicy"


def find_wrapper(venv: VecEnv | None, cls: type) -> Any:
    """The first wrapper of class ``cls`` in the chain from ``venv`` inwards, or ``None``."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    while venv is not None:
        if isinstance(venv, cls):
            return venv
        venv = venv.venv if isinstance(venv, VecEnvWrapper) else None
    return None


# ---------------------------------------------------------------------------------------------
# Snapshots and statistics


def _frame_stack_arrays(venv: VecEnv) -> dict[str, Any] | None:
    from stable_baselines3.common.vec_env import VecFrameStack

    stack = find_wrapper(venv, VecFrameStack)
    if stack is None:
        return None
    stacked = stack.stacked_obs
    if hasattr(stacked, "sub_stacked_observations"):
        return {k: s.stacked_obs.copy() for k, s in stacked.sub_stacked_observations.items()}
    return {"": stacked.stacked_obs.copy()}


def snapshot_environments(venv: VecEnv) -> bytes:
    """Pickle every environment of the stack (remote ones in their own process) and the
    frame-stack buffers.

    :raises SnapshotError: an environment cannot be pickled (the message says why)
    """
    import cloudpickle

    envs = venv.env_method("dppo_ckpt_snapshot")
    problem = next((e for e in envs if isinstance(e, str)), None)
    if problem is not None:
        raise SnapshotError(problem)
    document = {"format": _SNAPSHOT_FORMAT, "envs": envs, "frame_stack": _frame_stack_arrays(venv)}
    return cloudpickle.dumps(document)


def restore_snapshot(venv: VecEnv, blob: bytes) -> str | None:
    """Put the environments of a snapshot into the freshly built stack ``venv``.

    Loading the snapshot runs code (it is a pickle): call it only for a snapshot that the
    user's key or ``--trust`` vouches for.

    :return: ``None`` when restored, else why not (the stack is then unusable: close it)
    """
    import pickle

    from stable_baselines3.common.vec_env import VecFrameStack

    try:
        document = pickle.loads(blob)
    except Exception as exc:  # a snapshot of another software version
        return f"it cannot be loaded: {_one_line(exc)}"
    if not isinstance(document, dict) or document.get("format") != _SNAPSHOT_FORMAT:
        return "it was written in another format"
    envs = document.get("envs")
    if not isinstance(envs, list) or len(envs) != venv.num_envs:
        held = len(envs) if isinstance(envs, list) else 0
        return f"it holds {held} environments, not {venv.num_envs}"
    if not all(isinstance(e, bytes) for e in envs):
        return "it was written in another format"
    for index, env_blob in enumerate(envs):
        (problem,) = venv.env_method("dppo_ckpt_restore", env_blob, indices=[index])
        if problem is not None:
            return f"environment {index} cannot be restored: {problem}"
    arrays = document.get("frame_stack")
    stack = find_wrapper(venv, VecFrameStack)
    if (arrays is None) != (stack is None):
        return "its frame stacking differs from the environment spec"
    if stack is not None:
        stacked = stack.stacked_obs
        targets = (
            {k: s for k, s in stacked.sub_stacked_observations.items()}
            if hasattr(stacked, "sub_stacked_observations")
            else {"": stacked}
        )
        if set(targets) != set(arrays):
            return "its frame-stack buffers do not match the observations"
        for key, target in targets.items():
            if arrays[key].shape != target.stacked_obs.shape:
                return "its frame-stack buffers do not match the observations"
            target.stacked_obs = arrays[key].copy()
    return None


def _rms_items(prefix: str, rms: Any) -> dict[str, Any]:
    return {f"{prefix}/mean": rms.mean, f"{prefix}/var": rms.var, f"{prefix}/count": rms.count}


def save_normalization(venv: VecEnv | None) -> bytes | None:
    """VecNormalize's running statistics and discounted returns as ``.npz`` bytes (no pickle),
    or ``None`` when the stack has no VecNormalize."""
    import numpy as np
    from stable_baselines3.common.vec_env import VecNormalize

    normalize = find_wrapper(venv, VecNormalize)
    if normalize is None:
        return None
    arrays: dict[str, Any] = {"returns": normalize.returns}
    arrays.update(_rms_items("ret_rms", normalize.ret_rms))
    if isinstance(normalize.obs_rms, dict):
        for key, rms in normalize.obs_rms.items():
            arrays.update(_rms_items(f"obs_rms/{key}", rms))
    else:
        arrays.update(_rms_items("obs_rms", normalize.obs_rms))
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
    return buffer.getvalue()


def load_normalization(venv: VecEnv, data: bytes) -> None:
    """Restore the statistics of :func:`save_normalization` into the stack's VecNormalize.

    Read without ``np.load`` and without pickle (:func:`dppo_ckpt._npz.read_arrays`): the zip
    directory and every array header are checked before anything is inflated or allocated,
    so a hostile file can hold only numbers, and only as many as the size limit allows.

    :raises EnvError: the file is refused (over the size limit, arrays that are not numbers
        or declare more than the file holds); nothing is read from it
    :raises ValueError: the file is not such statistics, or their shapes do not fit
    """
    import numpy as np
    from stable_baselines3.common.vec_env import VecNormalize

    from dppo_ckpt import _npz

    normalize = find_wrapper(venv, VecNormalize)
    if normalize is None:
        raise ValueError("the environment stack has no VecNormalize")
    try:
        arrays = _npz.read_arrays(data, _MAX_NORMALIZATION_BYTES)
    except _npz.NpzRefused as exc:
        raise EnvError(str(exc)) from None
    except ValueError as exc:
        raise ValueError(f"not a statistics file ({_one_line(exc)})") from None
    targets: dict[str, Any] = {"ret_rms": normalize.ret_rms}
    if isinstance(normalize.obs_rms, dict):
        targets.update({f"obs_rms/{k}": rms for k, rms in normalize.obs_rms.items()})
    else:
        targets["obs_rms"] = normalize.obs_rms
    expected = {"returns"} | {f"{p}/{f}" for p in targets for f in ("mean", "var", "count")}
    if set(arrays) != expected:
        raise ValueError("its arrays are not those of this environment's VecNormalize")
    updates: list[tuple[Any, str, Any]] = []
    for prefix, rms in targets.items():
        for name in ("mean", "var"):
            value = arrays[f"{prefix}/{name}"]
            if value.shape != np.shape(getattr(rms, name)):
                raise ValueError(f"{prefix} has shape {value.shape}, not {np.shape(rms.mean)}")
            updates.append((rms, name, value.copy()))
        count = arrays[f"{prefix}/count"]
        if count.shape != ():
            raise ValueError(f"{prefix}/count is not a number")
        updates.append((rms, "count", float(count)))
    returns = arrays["returns"]
    if returns.shape != normalize.returns.shape:
        raise ValueError(f"returns has shape {returns.shape}, not {normalize.returns.shape}")
    for rms, name, value in updates:  # only once everything fits: all or nothing
        setattr(rms, name, value)
    normalize.returns = returns.copy()
