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

A run is planned first (:func:`dppo_ckpt.run_plan.plan_run`: every refusal of the options,
before torch loads), then carried out by :func:`run`.

Ctrl-C (SIGINT) asks the run to stop at the next rollout boundary (the rollout under way is
completed and trained on); it writes a final checkpoint there, verifies it and exits with 130
(128 + SIGINT), so that shell scripts see the run did not complete. A second Ctrl-C stops at
the next environment step instead (the partially collected rollout is dropped); a third one
aborts at once, leaving the checkpoints already written. Each Ctrl-C is acknowledged at once,
also during an update, with a line saying what it does (:mod:`dppo_ckpt.train_progress`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import json
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
from dppo_ckpt.run_plan import (
    CHECKPOINT_PREFIX,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_ENV_ID,
    DEFAULT_EVAL_EPISODES,
    DEFAULT_TIMESTEPS,
    ENV_CONFIG_KEYS,
    MANIFEST_NAME,
    TUNED_N_ENVS,
    TUNED_SETTINGS,
    ResumePoint,
    RunPlan,
    TrainingError,
    TrainOptions,
    checkpoint_name,
    plan_run,
    read_config,
    tensorboard_name,
)

if TYPE_CHECKING:
    from rich.console import Console
    from stable_baselines3.common.vec_env import VecEnv

    from dppo_ckpt.ppo import DistributionalPPO

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_ENV_ID",
    "DEFAULT_EVAL_EPISODES",
    "DEFAULT_TIMESTEPS",
    "EXIT_INTERRUPTED",
    "MANIFEST_NAME",
    "TUNED_N_ENVS",
    "TUNED_SETTINGS",
    "RunPlan",
    "TrainOptions",
    "TrainSummary",
    "TrainingError",
    "checkpoint_name",
    "check_model_config",
    "load_config",
    "model_keywords",
    "plan_run",
    "render_summary",
    "run",
    "train",
]

#: Exit code of a run stopped by Ctrl-C: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130

_SNAPSHOT_SUFFIX = ".envs.pkl"
_FRESH = "environments restart fresh"
# The name the run-folder tests know the TensorBoard naming rule by.
_tensorboard_name = tensorboard_name

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
    config = read_config(path)
    check_model_config({k: v for k, v in config.items() if k not in ENV_CONFIG_KEYS}, path)
    return config


def check_model_config(config: Mapping[str, Any], path: Path | None) -> None:
    """Check a config's model keywords against ``DistributionalPPO``'s signature.

    :raises TrainingError: (exit 2) a key is not a keyword, or its value has the wrong type
    """
    known = model_keywords()
    for key, value in config.items():
        if key not in known:
            raise TrainingError(
                f"config {path}: unknown key {key!r} (not a DistributionalPPO keyword)"
            )
        problem = _type_problem(key, value)
        if problem is not None:
            raise TrainingError(f"config {path}: {key} = {value!r}: {problem}")


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


def _snapshot_name(checkpoint: str) -> str:
    return checkpoint.removesuffix(".zip") + _SNAPSHOT_SUFFIX


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and the run manifest


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
    for stale in run_dir.glob(f".{CHECKPOINT_PREFIX}*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()
    with contextlib.suppress(OSError):
        for stale in run_dir.glob(f".{MANIFEST_NAME}.*{TEMP_SUFFIX}"):
            stale.unlink()


def _record_in_checkpoint(checkpoint: bytes, env: dict[str, Any], run: dict[str, Any]) -> bytes:
    """``checkpoint`` with the environment spec and the run's targets in its ``dppo_ckpt.json``.

    ``DistributionalPPO.save`` writes that member with the numerics only; the zip is rebuilt
    with every other member unchanged, in the same order and with the same compression.
    """
    from dppo_ckpt.checkpoint.archive import open_checkpoint
    from dppo_ckpt.checkpoint.metadata import METADATA_MEMBER, encode_metadata

    with open_checkpoint(checkpoint) as archive:
        numerics = (archive.metadata or {})["numerics"]
        member = encode_metadata(numerics, env=env, run=run)
        return archive.rewritten({METADATA_MEMBER: member})


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
            :class:`~dppo_ckpt.train_callback.TrainingCallback`); ``None`` stores the current
            ones
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
            normalization_name = envs.statistics_path(Path(name)).name
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


def _snapshot_bytes(
    point: ResumePoint, spec: envs.EnvSpec, authenticated: str, trust: bool
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


def _manifest_entry(point: ResumePoint) -> dict[str, Any] | None:
    manifest = point.manifest or {}
    entry = next(
        (e for e in manifest.get("checkpoints", []) if isinstance(e, dict)
         and e.get("file") == point.checkpoint.name),
        None,
    )  # fmt: skip
    return entry


def _statistics_file(point: ResumePoint) -> tuple[Path, str | None]:
    """VecNormalize's statistics beside the checkpoint, and the sha256 the manifest lists for
    them (``None`` when it lists none)."""
    path = envs.statistics_path(point.checkpoint)
    entry = _manifest_entry(point) or {}
    listed = entry.get("normalization") if isinstance(entry.get("normalization"), dict) else None
    if listed is None:
        return path, None
    if isinstance(listed.get("file"), str):
        path = point.checkpoint.parent / Path(listed["file"]).name
    sha = listed.get("sha256")
    return path, sha if isinstance(sha, str) else ""


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
# The run


class _CheckpointRejected(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


def train(options: TrainOptions, console: Console) -> TrainSummary:
    """Train (or resume) a run as ``dppo-ckpt train`` does, printing progress on ``console``.

    The numerics are chosen first (the libraries fix theirs when they load), then the run is
    planned (:func:`~dppo_ckpt.run_plan.plan_run`) and carried out (:func:`run`).

    :raises TrainingError: an option could not be used (exit 2) or a checkpoint failed its
        checks (the exit code of those checks)
    :raises KeyboardInterrupt: on a third Ctrl-C
    """
    from dppo_ckpt import numerics

    try:
        numerics.apply_numerics(numerics.PORTABLE if options.portable else numerics.NATIVE)
    except numerics.NumericsError as exc:
        raise TrainingError(str(exc)) from None
    try:
        return run(plan_run(options), console)
    except envs.EnvError as exc:
        raise TrainingError(str(exc), exc.exit_code) from None


def run(plan: RunPlan, console: Console) -> TrainSummary:
    """Carry out ``plan``: build the environments and the model, learn into the run folder,
    evaluate.

    :raises TrainingError: see :func:`train`
    :raises KeyboardInterrupt: on a third Ctrl-C
    """
    if plan.config:
        check_model_config(plan.config, plan.options.config)
    for note in plan.notes:
        console.print(f"note: {note}")
    model = _start_model(plan, console)
    try:
        _create_run_dir(plan.run_dir)
    except TrainingError:
        envs.close_quietly(model.get_env())
        raise
    _remove_stale_temporaries(plan.run_dir)
    if plan.reused:
        console.print(f"note: reusing {plan.run_dir}: its run wrote no checkpoint")
    folder = _RunFolder(plan.run_dir, plan.manifest, plan.key, plan.spec, plan.run_info)
    folder._save_manifest()
    run_checks = _load_run_checks()
    summary = TrainSummary(
        run_dir=plan.run_dir,
        start_timesteps=model.num_timesteps,
        timesteps=model.num_timesteps,
        wall_time_s=0.0,
        vgs_scale=None,
        vgs_step=None,
        unverified=run_checks is None,
    )
    if run_checks is None:
        console.print("note: the checkpoint checks are not available; checkpoints unverified")

    interrupt = _Interrupt()
    started = time.perf_counter()
    halted, last_saved = False, model.num_timesteps
    if model.num_timesteps >= plan.timesteps:
        console.print(
            f"nothing to train: the checkpoint is at step {model.num_timesteps:,}, "
            f"--timesteps is {plan.timesteps:,}"
        )
        summary.last_checkpoint = plan.options.resume
    else:
        verifier = _CheckpointVerifier(
            run_checks, summary, console, plan.options.on_checkpoint
        )
        halted, last_saved = _learn(plan, model, folder, interrupt, verifier, console)
        summary.last_checkpoint = summary.checkpoints[-1]
    summary.wall_time_s = time.perf_counter() - started
    summary.timesteps = last_saved if halted else model.num_timesteps
    summary.interrupted = interrupt.requested and summary.timesteps < plan.timesteps
    scaler = model._variance_gradient_scaler
    if scaler is not None:
        summary.vgs_scale, summary.vgs_step = scaler.scaling_factor, scaler.step_count
        summary.vgs_level, summary.vgs_counts = scaler.level, scaler.factor_counts
    if folder.snapshot_error is not None:
        console.print(
            f"note: the environments cannot be pickled ({folder.snapshot_error}); "
            f"--resume will say: {_FRESH}"
        )
    if plan.options.eval_episodes > 0 and not summary.interrupted:
        _evaluate(plan, model, summary)
    model.get_env().close()
    return summary


def _start_model(plan: RunPlan, console: Console) -> DistributionalPPO:
    """The model the run starts from, on its environments: new, or loaded from the resume
    checkpoint (with the environment snapshot and VecNormalize's statistics beside it)."""
    from dppo_ckpt.ppo import DistributionalPPO

    spec, point = plan.spec, plan.point
    if point is None:
        env, _ = envs.build_stack(spec, plan.env_seed, allowed=True, source="--env")
        try:
            model = DistributionalPPO(envs.policy_for(env.observation_space), env, **plan.settings)
        except (TypeError, ValueError, AssertionError) as exc:
            envs.close_quietly(env)
            raise TrainingError(f"invalid model settings: {exc}".splitlines()[0]) from exc
        console.print(f"training {spec.env_id} for {plan.timesteps:,} steps into {plan.run_dir}")
        console.print(f"environment: {spec.describe()}")
        return model

    from dppo_ckpt import numerics

    statistics, sha256 = _statistics_file(point)

    def build() -> tuple[VecEnv, str | None]:
        return envs.build_stack(
            spec, plan.env_seed, allowed=plan.env_allowed, source=plan.env_source,
            statistics=statistics, sha256=sha256,
        )  # fmt: skip

    env, normalization_line = build()
    restored = False
    snapshot, why = _snapshot_bytes(point, spec, plan.authenticated, plan.options.trust)
    if snapshot is not None:
        # Authenticated: train wrote it for this user (or --trust); the sha256 matches.
        problem = envs.restore_snapshot(env, snapshot)
        if problem is None:
            restored, env_line = True, f"environments restored from {why}"
        else:
            envs.close_quietly(env)
            env, normalization_line = build()
            env_line = f"{_FRESH} (snapshot {why}: {problem})"
    else:
        env_line = f"{_FRESH} ({why})"
    try:
        model = _load_checkpoint(
            point.checkpoint, env, plan.settings, restored, plan.tensorboard_log, plan.options
        )
    except TrainingError:
        envs.close_quietly(env)
        raise
    if not restored:
        # load() re-seeds the environments with the run's original seed.
        model.get_env().seed(plan.env_seed)
    console.print(
        f"resuming {point.checkpoint} at step {model.num_timesteps:,} of {plan.timesteps:,} "
        f"into {plan.run_dir}; {env_line}"
    )
    console.print(f"environment: {spec.describe()} (from {plan.spec_from})")
    if normalization_line is not None:
        console.print(normalization_line)
    note = numerics.resume_note(point.numerics)
    if note is not None:
        console.print(f"note: {note}")
    return model


class _CheckpointVerifier:
    """Verifies each checkpoint the run writes and lists it in the summary.

    :param run_checks: :func:`dppo_ckpt.checkpoint.checks.run_checks`, or ``None`` when the
        checks are not available (the checkpoints are then listed as unverified)
    """

    def __init__(
        self,
        run_checks: Callable[..., Any] | None,
        summary: TrainSummary,
        console: Console,
        on_checkpoint: Callable[[Path, DistributionalPPO], None] | None = None,
    ) -> None:
        self.run_checks = run_checks
        self.summary = summary
        self.console = console
        self.on_checkpoint = on_checkpoint

    def __call__(self, path: Path, model: DistributionalPPO) -> None:
        self.summary.checkpoints.append(path)
        status = "unverified"
        if self.run_checks is not None:
            import torch as th

            from dppo_ckpt.rng import capture_rng_state, restore_rng_state

            # The checks load the file, which moves the generators; training must not notice.
            rng = capture_rng_state(model.action_space)
            threads = th.get_num_threads()
            try:
                report = self.run_checks(path, quick=True)
            finally:
                th.set_num_threads(threads)
                restore_rng_state(rng, model.action_space)
            if report.exit_code != 0:
                raise _CheckpointRejected(
                    f"checkpoint {path} failed its checks: {_first_failure(report)}",
                    report.exit_code,
                )
            status = "verified"
        line = f"checkpoint {model.num_timesteps:,} steps: {path} ({status})"
        self.console.print(line, highlight=False, soft_wrap=True)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, model)


def _learn(
    plan: RunPlan,
    model: DistributionalPPO,
    folder: _RunFolder,
    interrupt: _Interrupt,
    verifier: _CheckpointVerifier,
    console: Console,
) -> tuple[bool, int]:
    """One ``learn()`` call to the plan's total, under the progress line and the Ctrl-C
    handler; a final checkpoint at its end.

    :return: whether a first Ctrl-C halted the run at a rollout boundary, and the step of
        the last checkpoint
    """
    from dppo_ckpt.train_callback import TrainingCallback, scale_text
    from dppo_ckpt.train_progress import RunProgress, rounded_total, rounding_note

    start = model.num_timesteps
    rollout = model.n_steps * model.n_envs
    total = rounded_total(plan.timesteps, start, rollout)
    note = rounding_note(plan.timesteps, total, start, model.n_steps, model.n_envs)
    if note is not None:
        console.print(note)
    try:
        with (
            interrupt.installed(),
            RunProgress(console, total, start, interrupt, scale_text(model)) as progress,
        ):
            callback = TrainingCallback(folder, plan.every, progress, interrupt, verifier)
            try:
                model.learn(
                    plan.timesteps - start,
                    callback=callback,
                    reset_num_timesteps=plan.point is None,
                    tb_log_name=plan.tb_log_name,
                )
            finally:
                callback.detach()
            # A first Ctrl-C already saved at the rollout boundary (the model went on for one
            # more step before learn() returned, which that checkpoint rightly lacks).
            if not callback.halt and callback.last_saved != model.num_timesteps:
                callback.save()
    except _CheckpointRejected as exc:
        raise TrainingError(str(exc), exc.exit_code) from None
    return callback.halt, callback.last_saved


def _evaluate(plan: RunPlan, model: DistributionalPPO, summary: TrainSummary) -> None:
    from stable_baselines3.common.evaluation import evaluate_policy

    seed = (int(plan.seed) + 1_000_003) % 2**32
    eval_env = _evaluation_env(plan.spec, model.get_env(), seed)
    try:
        mean, std = evaluate_policy(
            model, eval_env, n_eval_episodes=plan.options.eval_episodes, deterministic=True
        )
    finally:
        eval_env.close()
    summary.eval_return_mean, summary.eval_return_std = float(mean), float(std)
    summary.eval_episodes = plan.options.eval_episodes


def _evaluation_env(spec: envs.EnvSpec, training_env: VecEnv | None, seed: int) -> VecEnv:
    """One environment of the training stack, in process; a VecNormalize in it uses the
    training statistics, frozen, and reports the true rewards."""
    import copy

    from stable_baselines3.common.vec_env import VecNormalize

    # The module, if any, was imported (or refused) when the training stack was built.
    env, _ = envs.build_stack(
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

