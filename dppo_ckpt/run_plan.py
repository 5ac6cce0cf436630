"""What a ``dppo-ckpt train`` run will do, decided before anything heavy is imported.

:func:`plan_run` turns the options into a :class:`RunPlan`: the run folder, the targets, the
environment spec, the model settings and the manifest to write. It reads files (the config,
the resume checkpoint through :mod:`dppo_ckpt.checkpoint.archive`, the run manifest) but
imports neither torch nor stable-baselines3 and builds nothing, so every refusal of the
options comes before the libraries load, and the plan is testable on its own.
:mod:`dppo_ckpt.training` then carries the plan out.

Its defaults are shown in ``--help``; the model's own are those of
:class:`~dppo_ckpt.ppo.DistributionalPPO` (a test holds them equal).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dppo_ckpt import envs

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CRITIC",
    "DEFAULT_ENV_ID",
    "DEFAULT_EVAL_EPISODES",
    "DEFAULT_TIMESTEPS",
    "DEFAULT_VGS_ALPHA",
    "DEFAULT_VGS_WARMUP_STEPS",
    "MANIFEST_NAME",
    "TUNED_N_ENVS",
    "TUNED_SETTINGS",
    "ResumePoint",
    "RunPlan",
    "TrainOptions",
    "TrainingError",
    "checkpoint_name",
    "plan_run",
    "read_config",
]

DEFAULT_ENV_ID = envs.DEFAULT_ENV_ID
DEFAULT_TIMESTEPS = 100_000
DEFAULT_CHECKPOINT_EVERY = 10_000
DEFAULT_EVAL_EPISODES = 5
# DistributionalPPO's defaults, for --help (importing it would load torch).
DEFAULT_CRITIC = "quantile"
DEFAULT_VGS_ALPHA = 1.0
DEFAULT_VGS_WARMUP_STEPS = 100

#: The manifest of a run folder.
MANIFEST_NAME = "run.json"
MANIFEST_FORMAT_VERSION = 1

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

CHECKPOINT_PREFIX = "checkpoint_"
# Tables of the config file that describe the environment, not the model.
ENV_CONFIG_KEYS = ("env_kwargs", "normalize")

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
    #: Called with each checkpoint's path and the model once the checkpoint is written and
    #: verified (a sweep reports it to its scheduler); an exception stops the run.
    on_checkpoint: Callable[[Path, Any], None] | None = None


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, as read without unpickling anything."""

    checkpoint: Path
    manifest: dict[str, Any] | None
    n_envs: int
    timesteps: int
    numerics: dict[str, Any] | None
    #: the environment spec and run targets recorded in the checkpoint's dppo_ckpt.json
    env: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunPlan:
    """Everything a run was decided to be, before anything is built.

    ``settings`` are the model keywords of a new run, or those the resumed run recorded;
    ``config`` the config file's model keywords, which the runner still checks against the
    model's signature (that needs the model class, so torch).
    """

    options: TrainOptions
    run_dir: Path
    #: an existing folder whose run never wrote a checkpoint, reused
    reused: bool
    timesteps: int
    every: int
    seed: Any
    spec: envs.EnvSpec
    #: whether the spec's ``module:`` part may be imported, and what names it in a refusal
    env_allowed: bool
    env_source: str
    #: the seed the environments are built with
    env_seed: int
    settings: dict[str, Any]
    config: dict[str, Any]
    #: the manifest the run folder starts with (before this run lists its checkpoints)
    manifest: dict[str, Any]
    tensorboard_log: str | None
    tb_log_name: str
    key: bytes | None
    point: ResumePoint | None = None
    #: ``""`` when the resume folder's manifest is authenticated, else why not
    authenticated: str = ""
    #: where the spec came from, for the ``environment:`` line of a resumed run
    spec_from: str = ""
    #: notes to print before the run starts
    notes: list[str] = field(default_factory=list)

    @property
    def run_info(self) -> dict[str, Any]:
        """The targets recorded in every checkpoint's ``dppo_ckpt.json``."""
        return {"timesteps": self.timesteps, "checkpoint_every": self.every, "seed": self.seed}


# ---------------------------------------------------------------------------------------------
# Options and configuration


def read_config(path: Path) -> dict[str, Any]:
    """Read a TOML config: top-level DistributionalPPO keywords (tables become dicts), plus
    the environment's ``[env_kwargs]`` and ``[normalize]`` tables, which are checked here.

    The model keywords are checked by :func:`dppo_ckpt.training.load_config`.

    :raises TrainingError: (exit 2) the file cannot be read or parsed, or an environment
        table is wrong (the message names the key)
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
    for key in ENV_CONFIG_KEYS:
        if key not in config:
            continue
        value = config[key]
        if not isinstance(value, dict):
            raise TrainingError(f"config {path}: {key} must be a table ([{key}])")
        if key == "normalize":
            try:
                envs.check_normalize_options(value, f"config {path}: normalize")
            except envs.EnvError as exc:
                raise TrainingError(str(exc)) from None
    return config


def checkpoint_name(timesteps: int) -> str:
    """The file name of the checkpoint at ``timesteps``: sorts by step as text."""
    return f"{CHECKPOINT_PREFIX}{timesteps:09d}.zip"


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise TrainingError(f"{name} must be > 0, got {value}")


def check_options(options: TrainOptions) -> None:
    """Refuse options that cannot be used, alone or together.

    :raises TrainingError: (exit 2) names the option
    """
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


def model_settings(options: TrainOptions, config: Mapping[str, Any], env_id: str) -> dict[str, Any]:
    """Model keywords: built-in defaults < tuned settings of the environment < config file <
    explicit command-line options."""
    settings: dict[str, Any] = {"seed": 0, "device": "cpu", "verbose": 0}
    settings.update(TUNED_SETTINGS.get(env_id, {}))
    settings.update({k: v for k, v in config.items() if k not in ENV_CONFIG_KEYS})
    explicit = {
        "seed": options.seed,
        "critic": options.critic,
        "variance_gradient_scaling": options.vgs,
        "vgs_alpha": options.vgs_alpha,
        "vgs_warmup_steps": options.vgs_warmup_steps,
    }
    settings.update({key: value for key, value in explicit.items() if value is not None})
    return settings


def env_options(options: TrainOptions, config: Mapping[str, Any]) -> envs.EnvOptions:
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


# ---------------------------------------------------------------------------------------------
# The run folder and its manifest


def new_manifest(
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


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``run_dir`` as written by ``train``, or ``None``."""
    try:
        manifest = json.loads((run_dir / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        return None
    if not isinstance(manifest.get("checkpoints"), list):
        return None
    return manifest


def checkpoint_steps(folder: Path) -> dict[Path, int]:
    """The checkpoints ``train`` wrote into ``folder``, with their step from the file name."""
    found = {}
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*.zip"):
        digits = path.name[len(CHECKPOINT_PREFIX) : -len(".zip")]
        if digits.isdigit():
            found[path] = int(digits)
    return found


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of ``folder`` at the highest step, or ``None``."""
    steps = checkpoint_steps(folder)
    return max(steps, key=lambda p: (steps[p], p.name)) if steps else None


def not_a_file(path: Path, what: str) -> str:
    """Why ``path`` cannot be a checkpoint: a folder (naming its newest checkpoint) or absent."""
    if path.is_dir():
        newest = newest_checkpoint(path)
        hint = f": give one of its checkpoints, e.g. {newest}" if newest else ""
        return f"{what} {path}: is a folder, not a checkpoint{hint}"
    if path.exists():
        return f"{what} {path}: not a regular file"
    return f"{what} {path}: no such file"


def inspect_resume(path: Path) -> ResumePoint:
    """Check that ``path`` is a readable checkpoint; read its counters, its numerics
    fingerprint, its recorded environment and the manifest (nothing is unpickled here)."""
    from dppo_ckpt.checkpoint.archive import CheckpointError, open_checkpoint

    if not path.is_file():
        raise TrainingError(not_a_file(path, "cannot resume from"))
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
    return ResumePoint(
        path,
        read_manifest(path.parent),
        n_envs,
        timesteps,
        metadata.get("numerics"),
        metadata.get("env"),
        dict(metadata.get("run") or {}),
    )


def manifest_problem(manifest: dict[str, Any], key: bytes | None, key_error: str | None) -> str:
    """Why ``manifest`` is not authenticated, or ``""`` when its signature verifies."""
    from dppo_ckpt import signing

    if key is None:
        return f"cannot be authenticated ({key_error})"
    return signing.verify(manifest, key) or ""


def recorded_spec(point: ResumePoint, authenticated: str) -> tuple[envs.EnvSpec | None, str, bool]:
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


def resolve_run_dir(options: TrainOptions, point: ResumePoint | None) -> Path:
    """The run folder: ``--out``, the branch of a resumed run, the resumed run's, or new."""
    if options.out is not None:
        return options.out
    if point is not None and options.branch is not None:
        return point.checkpoint.parent / "branches" / options.branch
    if options.resume is not None:
        return options.resume.parent
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


def check_run_dir(run_dir: Path, resuming_here: bool) -> bool:
    """Refuse a folder that holds another run; nothing is created yet.

    A folder whose run never wrote a checkpoint (killed early) holds nothing to continue, so
    it is reused.

    :return: whether an existing folder is reused
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--out {run_dir} exists and is not a directory")
    if not run_dir.is_dir() or resuming_here:
        return False
    newest = newest_checkpoint(run_dir)
    if newest is not None:
        raise TrainingError(
            f"{run_dir} already holds a run: continue it with --resume {newest}, "
            "or choose another --out"
        )
    return (run_dir / MANIFEST_NAME).exists()


def check_not_behind(point: ResumePoint, branch: str | None) -> None:
    """Refuse to resume into a folder from a checkpoint older than its newest: the run would
    overwrite the later checkpoints, and TensorBoard would see their steps twice."""
    steps = checkpoint_steps(point.checkpoint.parent)
    later = sorted((step, path.name) for path, step in steps.items() if step > point.timesteps)
    if later and branch is None:
        raise TrainingError(
            f"{point.checkpoint} is not the newest checkpoint of {point.checkpoint.parent} "
            f"({later[-1][1]}); resuming there would overwrite later checkpoints: continue "
            f"into {point.checkpoint.parent / 'branches' / 'NAME'} with --branch NAME, or "
            "choose another --out"
        )


def tensorboard_name(tensorboard_log: str | None, point: ResumePoint | None) -> str:
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


# ---------------------------------------------------------------------------------------------
# The plan


KeyLoader = Callable[[], tuple["bytes | None", "str | None"]]


def _load_key() -> tuple[bytes | None, str | None]:
    from dppo_ckpt import signing

    try:
        return signing.load_key(), None
    except signing.SigningKeyError as exc:
        return None, str(exc)


def plan_run(options: TrainOptions, load_key: KeyLoader = _load_key) -> RunPlan:
    """Decide what the run does: every refusal of the options happens here.

    :param load_key: the user's signing key and, without one, why not; called once the
        options are known to be usable (the default creates the key on first use)
    :raises TrainingError: (exit 2) an option, the config or the resume checkpoint cannot be
        used; :class:`~dppo_ckpt.envs.EnvError` for the environment options
    """
    check_options(options)
    point = inspect_resume(options.resume) if options.resume is not None else None
    manifest_in = point.manifest if point is not None else None
    previous = manifest_in or {}
    recorded_run = point.run if point is not None else {}

    config = read_config(options.config) if options.config is not None else {}
    given = env_options(options, config)
    timesteps = (
        options.timesteps or previous.get("timesteps") or recorded_run.get("timesteps")
        or DEFAULT_TIMESTEPS
    )  # fmt: skip
    every = (
        options.checkpoint_every or previous.get("checkpoint_every")
        or recorded_run.get("checkpoint_every") or DEFAULT_CHECKPOINT_EVERY
    )  # fmt: skip

    run_dir = resolve_run_dir(options, point)
    resuming_here = point is not None and run_dir.resolve() == point.checkpoint.parent.resolve()
    if point is not None and resuming_here and timesteps > point.timesteps:
        check_not_behind(point, options.branch)
    reused = check_run_dir(run_dir, resuming_here)
    tensorboard_log = str(run_dir / "tensorboard") if options.tensorboard else None

    key, key_error = load_key()
    notes = [] if key_error is None else [f"the run manifest is not signed: {key_error}"]
    common = {
        "options": options, "run_dir": run_dir, "reused": reused, "timesteps": timesteps,
        "every": every, "tensorboard_log": tensorboard_log,
        "tb_log_name": tensorboard_name(tensorboard_log, point), "key": key, "notes": notes,
    }  # fmt: skip

    if point is None:
        env_id = given.env_id or DEFAULT_ENV_ID
        spec = envs.resolve_spec(given, None, default_n_envs=TUNED_N_ENVS.get(env_id, 1))
        settings = model_settings(options, config, spec.gym_id)
        seed = settings["seed"]
        if tensorboard_log is not None:
            settings["tensorboard_log"] = tensorboard_log
        return RunPlan(
            **common, seed=seed, spec=spec, env_allowed=True, env_source="--env",
            env_seed=seed, settings=settings,
            config={k: v for k, v in config.items() if k not in ENV_CONFIG_KEYS},
            manifest=new_manifest(spec, seed, timesteps, every, settings, None),
        )  # fmt: skip

    settings = dict(previous.get("model_settings") or {})
    seed = options.seed
    if seed is None:
        seed = previous.get("seed", recorded_run.get("seed", 0))
    authenticated = (
        manifest_problem(point.manifest, key, key_error) if point.manifest else "is missing"
    )
    recorded, where, vouched = recorded_spec(point, authenticated)
    if recorded is None and options.env_id is None:
        raise TrainingError(
            f"cannot tell which environment {point.checkpoint} was trained on: it records "
            f"none and no {MANIFEST_NAME} beside it names one; pass --env ID"
        )
    spec = envs.resolve_spec(given, recorded, default_n_envs=point.n_envs, fixed=True)
    named = options.env_id is not None and options.env_id == spec.env_id
    # Only an authenticated manifest is carried on: re-signing a forged one would make its
    # entries (snapshots included) look like ours to the next resume.
    if resuming_here and manifest_in is not None and not authenticated:
        manifest = manifest_in
        manifest["timesteps"] = timesteps
        manifest["checkpoint_every"] = every
        manifest["env"] = spec.to_json()
    else:
        manifest = new_manifest(spec, seed, timesteps, every, settings, str(point.checkpoint))
    return RunPlan(
        **common, seed=seed, spec=spec, env_allowed=named or vouched or options.trust,
        env_source=where or "the record",
        # Fresh environments are seeded past the original start, so that they do not replay
        # the episodes the run began with.
        env_seed=(int(seed) + point.timesteps) % 2**32,
        settings=settings, config={}, manifest=manifest, point=point,
        authenticated=authenticated,
        spec_from="--env" if named and recorded is None else (where or "the options"),
    )  # fmt: skip
