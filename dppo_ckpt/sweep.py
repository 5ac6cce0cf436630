"""``dppo-ckpt sweep CONFIG.toml``: many ``train`` runs on Ray Tune, each one preemption-proof.

A sweep config holds a base ``train`` config and a search space::

    [sweep]
    name = "cartpole"          # the experiment; its folder is STORAGE/NAME
    storage = "sweeps"         # relative to the config file (shared by every node of a cluster)
    metric = "eval_return"     # or "return" (training episodes), "vgs_scale", ...
    mode = "max"
    samples = 1                # Tune's num_samples: draws of the random dimensions
    seeds = [0, 1]             # a grid over the model's seed
    search = "random"          # or "optuna": dppo-ckpt[optuna], no grid dimensions; each
                               # of its `samples` draws runs once per seed
    max_failures = 3           # restarts of a trial whose worker died
    cpus_per_trial = 1

    [train]                    # the options of `train`
    env = "CartPole-v1"
    timesteps = 4096
    checkpoint_every = 1024

    [model]                    # DistributionalPPO keywords, as in `train --config`
    n_steps = 256

    [space]                    # DistributionalPPO keywords drawn per trial
    learning_rate = { loguniform = [1e-4, 1e-3] }
    n_epochs = { grid = [4, 10] }
    vgs_alpha = { uniform = [0.1, 1.0] }
    critic = { choice = ["quantile", "categorical"] }

Each trial is a ``train`` run (:func:`dppo_ckpt.training.train`) into
``STORAGE/NAME/runs/TRIAL_ID/run``, which is the trial's checkpoint directory: checkpoints are
written atomically and verified by ``train`` itself, and each one is then reported to Tune
with the figures of the moment (training return, VGS scale, level and mean factor); the last
report adds the evaluation return.

When a worker dies, Tune starts the trial again. The new attempt looks for the newest
checkpoint of the run folder that verifies -- the checks pass, the folder's manifest is signed
with the user's key (:mod:`dppo_ckpt.signing`) and lists the file and its environment snapshot
with their sha256 -- and continues from it through ``train --resume``, which is exact: the
trial ends with the very parameters of an uninterrupted one on the same kind of machine.
Newer files that fail are moved to ``run/quarantine/`` and named in ``trial.log``; the
checkpoint Tune last received must be there and verify, or the trial fails with the reason and
is never resumed from a bad file, nor from an older one.

Only a worker that died is retried (``max_failures``): a failure a restart would repeat (the
checkpoint Tune last received is missing or fails, ``train`` refuses the run) ends the trial
at once, with a last report that says why.

Ray is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dppo_ckpt.checkpoint.fleet import RAY_EXTRA_HINT, RayUnavailableError, connect

if TYPE_CHECKING:
    from rich.console import Console

    from dppo_ckpt.ppo import DistributionalPPO
    from dppo_ckpt.training import TrainOptions

__all__ = [
    "DIMENSION_KINDS",
    "METRICS",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "TrialRow",
    "load_sweep_config",
    "run_sweep",
    "trial_options",
]

#: The kinds of a search-space dimension: ``{grid = [...]}``, ``{choice = [...]}``,
#: ``{uniform = [low, high]}``, ``{loguniform = [low, high]}``.
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform")
#: What every report to Tune holds (NaN until known).
METRICS = ("timesteps", "return", "eval_return", "vgs_scale", "vgs_level", "vgs_mean_factor")

_SWEEP_KEYS = {
    "name": str, "storage": str, "metric": str, "mode": str, "samples": int, "seeds": list,
    "search": str, "max_failures": int, "cpus_per_trial": (int, float),
}  # fmt: skip
# [train] keys and the TrainOptions field each one sets.
_TRAIN_KEYS = {
    "env": ("env_id", str), "timesteps": ("timesteps", int), "n_envs": ("n_envs", int),
    "checkpoint_every": ("checkpoint_every", int), "eval_episodes": ("eval_episodes", int),
    "vec_env": ("vec_env", str), "normalize": ("normalize", bool),
    "frame_stack": ("frame_stack", int), "portable": ("portable", bool),
    "env_kwargs": ("env_kwargs", dict),
}  # fmt: skip
_RUN = "run"
_LOG = "trial.log"
_WORKER = "worker.json"
_MODEL_CONFIG = "model.toml"
QUARANTINE = "quarantine"


class SweepError(Exception):
    """The sweep could not start (exit 2), or a trial could not go on (its message)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrialCheckpointError(Exception):
    """The checkpoint Tune last received for a trial is missing or fails verification: the
    trial fails at once (never retried: a retry would find the same folder), with
    ``exit_code`` 2 (damaged or missing) or 3 (refused as unsafe)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Dimension:
    """One search-space dimension."""

    kind: str
    values: tuple[Any, ...]


@dataclass
class SweepConfig:
    """A sweep config file, checked."""

    path: Path
    name: str
    storage: Path
    metric: str = "eval_return"
    mode: str = "max"
    samples: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    search: str = "random"
    max_failures: int = 3
    cpus_per_trial: float = 1
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Dimension] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The experiment's folder: Tune's records and ``runs/`` with one folder per trial."""
        return self.storage / self.name


@dataclass
class TrialRow:
    """One line of the results table."""

    trial_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: str
    last_checkpoint: str | None
    restarts: int = 0
    error: str | None = None
    #: For a trial that ended on a deterministic failure: 2 its checkpoint is missing or
    #: damaged (or train refused its options), 3 refused as unsafe, 1 a check failed.
    exit_code: int | None = None


@dataclass
class SweepResult:
    """What a sweep did: a row per trial, the best trial by the metric, the wall time."""

    rows: list[TrialRow]
    metric: str
    mode: str
    best: str | None
    wall_time_s: float
    folder: Path

    @property
    def failed(self) -> int:
        return sum(row.status == "ERROR" for row in self.rows)


# ---------------------------------------------------------------------------------------------
# The config file


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise SweepError("a sweep config needs Python 3.11+ or the tomli package") from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise SweepError(f"cannot read sweep config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"sweep config {path} is not valid TOML: {exc}") from None


def _typed(where: str, value: Any, kind: Any) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise SweepError(f"{where} = {value!r}: must be {names}")
    return value


def _dimension(where: str, value: Any) -> Dimension:
    if not isinstance(value, dict) or len(value) != 1:
        raise SweepError(f"{where}: give one of {', '.join(DIMENSION_KINDS)} = [...]")
    (kind, values), = value.items()
    if kind not in DIMENSION_KINDS:
        raise SweepError(f"{where}: unknown kind {kind!r} (use {', '.join(DIMENSION_KINDS)})")
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}.{kind}: must be a non-empty array")
    if kind in ("uniform", "loguniform"):
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(values) != 2 or len(numbers) != 2 or not values[0] < values[1]:
            raise SweepError(f"{where}.{kind}: give [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise SweepError(f"{where}.loguniform: low must be > 0")
    return Dimension(kind, tuple(values))


def load_sweep_config(path: Path) -> SweepConfig:
    """Read and check a sweep config (see the module docstring); one-line errors, exit 2.

    The ``[model]`` table and every space key are checked as ``train --config`` checks its
    file: DistributionalPPO keywords, with values of the right type.
    """
    document = _read_toml(path)
    unknown = sorted(set(document) - {"sweep", "train", "model", "space"})
    if unknown:
        raise SweepError(f"sweep config {path}: unknown table [{unknown[0]}]")
    sweep = document.get("sweep", {})
    for table in ("sweep", "train", "model", "space"):
        if not isinstance(document.get(table, {}), dict):
            raise SweepError(f"sweep config {path}: {table} must be a table ([{table}])")
    values: dict[str, Any] = {}
    for key, value in sweep.items():
        if key not in _SWEEP_KEYS:
            raise SweepError(f"sweep config {path}: unknown key sweep.{key}")
        values[key] = _typed(f"sweep.{key}", value, _SWEEP_KEYS[key])
    if values.get("mode", "max") not in ("max", "min"):
        raise SweepError(f"sweep.mode = {values['mode']!r}: must be 'max' or 'min'")
    if values.get("metric", "eval_return") not in METRICS:
        raise SweepError(f"sweep.metric = {values['metric']!r}: one of {', '.join(METRICS)}")
    if values.get("search", "random") not in ("random", "optuna"):
        raise SweepError(f"sweep.search = {values['search']!r}: must be 'random' or 'optuna'")
    seeds = values.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError("sweep.seeds: must be a non-empty array of integers")
    for key in ("samples", "max_failures"):
        if values.get(key, 1) < (1 if key == "samples" else 0):
            raise SweepError(f"sweep.{key} = {values[key]}: too small")

    train: dict[str, Any] = {}
    for key, value in document.get("train", {}).items():
        if key not in _TRAIN_KEYS:
            raise SweepError(
                f"sweep config {path}: unknown key train.{key} (one of {', '.join(_TRAIN_KEYS)})"
            )
        field_name, kind = _TRAIN_KEYS[key]
        train[field_name] = _typed(f"train.{key}", value, kind)
    space = {
        key: _dimension(f"space.{key}", value) for key, value in document.get("space", {}).items()
    }
    model = dict(document.get("model", {}))
    if "seed" in model or "seed" in space:
        raise SweepError("sweep config: give seeds as sweep.seeds, not as a model keyword")
    # Checking the keywords loads torch, so the sweep's numerics are chosen first.
    _apply_numerics(train.get("portable", True))
    _check_model_keywords(path, model, space)
    if values.get("search") == "optuna":
        _check_optuna(space)
    name = values.get("name") or path.stem
    if not name or name in (".", "..") or not all(c.isalnum() or c in "._-" for c in name):
        raise SweepError(f"sweep.name {name!r}: use letters, digits, '.', '_' and '-'")
    storage = Path(values.get("storage", "sweeps")).expanduser()
    if not storage.is_absolute():
        storage = path.resolve().parent / storage
    return SweepConfig(
        path=path,
        name=name,
        storage=storage,
        metric=values.get("metric", "eval_return"),
        mode=values.get("mode", "max"),
        samples=values.get("samples", 1),
        seeds=list(seeds),
        search=values.get("search", "random"),
        max_failures=values.get("max_failures", 3),
        cpus_per_trial=values.get("cpus_per_trial", 1),
        train=train,
        model=model,
        space=space,
    )


def _apply_numerics(portable: bool) -> None:
    """Put this process in the sweep's numerics; Ray's workers inherit them (see
    :func:`~dppo_ckpt.checkpoint.fleet.connect`)."""
    from dppo_ckpt import numerics

    try:
        numerics.apply_numerics(numerics.PORTABLE if portable else numerics.NATIVE)
    except numerics.NumericsError as exc:
        raise SweepError(str(exc)) from None


def _check_model_keywords(path: Path, model: dict[str, Any], space: dict[str, Dimension]) -> None:
    """Check ``[model]`` and one draw of every dimension with ``train``'s own config reader."""
    from dppo_ckpt import training

    sample = dict(model)
    for key, dimension in space.items():
        sample[key] = dimension.values[0]
    with tempfile.TemporaryDirectory(prefix="dppo-sweep-") as folder:
        probe = Path(folder) / _MODEL_CONFIG
        probe.write_text(_toml_text(sample), "utf-8")
        try:
            training.load_config(probe)
        except training.TrainingError as exc:
            raise SweepError(str(exc).replace(str(probe), f"{path} [model]/[space]")) from None


#: How to get Ray's Optuna search, named in the message of a sweep that asks for it without.
OPTUNA_EXTRA_HINT = "pip install 'dppo-ckpt[optuna]'"


def _check_optuna(space: Mapping[str, Dimension]) -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError(
            f"sweep.search = 'optuna' needs optuna, which is not installed: {OPTUNA_EXTRA_HINT}"
        ) from None
    if not space:
        raise SweepError("sweep.search = 'optuna' needs a [space] to draw from")
    grids = [key for key, dimension in space.items() if dimension.kind == "grid"]
    if grids:
        raise SweepError(
            f"sweep.search = 'optuna' draws every dimension itself: make space.{grids[0]} a "
            "choice instead of a grid"
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise SweepError(f"cannot write {value!r} to a config file")


def _toml_text(settings: Mapping[str, Any]) -> str:
    """``settings`` as a TOML document of top-level keys (tables inline), for ``--config``."""
    lines = [f"{json.dumps(str(key))} = {_toml_value(value)}\n" for key, value in settings.items()]
    return "".join(lines)


# ---------------------------------------------------------------------------------------------
# Trials


def trial_settings(config: SweepConfig, trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model keywords of one trial: ``[model]`` under the drawn values (seed included)."""
    settings = dict(config.model)
    settings.update({key: value for key, value in trial_config.items() if key != "seed"})
    return settings


def trial_options(
    config: SweepConfig, trial_config: Mapping[str, Any], trial_dir: Path
) -> TrainOptions:
    """The ``train`` options of a fresh trial run into ``trial_dir/run``.

    The model keywords go into ``trial_dir/model.toml``, read as ``train --config`` reads one.
    """
    from dppo_ckpt.training import TrainOptions

    trial_dir.mkdir(parents=True, exist_ok=True)
    model_config = trial_dir / _MODEL_CONFIG
    from dppo_ckpt.atomic import write_atomically

    write_atomically(model_config, _toml_text(trial_settings(config, trial_config)).encode())
    options = TrainOptions(**config.train)
    options.seed = int(trial_config.get("seed", 0))
    options.config = model_config
    options.out = trial_dir / _RUN
    return options


@dataclass(frozen=True)
class _Problem:
    """Why a checkpoint cannot be resumed from, one line, and the exit code it amounts to
    (2 missing, changed or unauthenticated; that of its checks when they fail)."""

    reason: str
    exit_code: int = 2


def _problem_with(
    path: Path, manifest: dict[str, Any] | None, key: bytes | None
) -> _Problem | None:
    """Why ``path`` cannot be resumed from exactly, or None when it verifies.

    It verifies when the folder's manifest is signed with the user's key and lists the file
    and its environment snapshot with their current sha256, and the checks pass (run in a
    child process: the file may have been replaced by anything since it was written).
    """
    from dppo_ckpt import signing, training
    from dppo_ckpt.checkpoint.checks import run_checks
    from dppo_ckpt.checkpoint.isolation import crash_report, run_isolated
    from dppo_ckpt.checkpoint.results import Verdict

    if manifest is None:
        return _Problem(f"{training.MANIFEST_NAME} is missing or unreadable")
    if key is None:
        return _Problem(f"{training.MANIFEST_NAME} cannot be authenticated: no key")
    forged = signing.verify(manifest, key)
    if forged:
        return _Problem(f"{training.MANIFEST_NAME} {forged}")
    entries = manifest.get("checkpoints")
    entry = next(
        (e for e in entries if isinstance(e, dict) and e.get("file") == path.name), None
    ) if isinstance(entries, list) else None  # fmt: skip
    if entry is None:
        return _Problem(f"{training.MANIFEST_NAME} does not list it")
    try:
        if _sha256_of(path) != entry.get("sha256"):
            return _Problem("it changed since train wrote it (sha256)")
    except OSError as exc:
        return _Problem(f"cannot read it: {exc.strerror or exc}")
    snapshot = entry.get("envs")
    if isinstance(snapshot, dict):
        beside = path.parent / Path(str(snapshot.get("file"))).name
        try:
            changed = _sha256_of(beside) != snapshot.get("sha256")
        except FileNotFoundError:
            changed = True
        except OSError as exc:
            why = exc.strerror or exc
            return _Problem(f"its environment snapshot {beside.name} cannot be read: {why}")
        if changed:
            return _Problem(f"its environment snapshot {beside.name} is missing or changed")
    check = functools.partial(run_checks, quick=True)
    outcome = run_isolated(check, str(path), timeout=300)
    report = outcome.value if outcome.ok else crash_report(str(path), outcome, 300)
    if report.exit_code == 0:
        return None
    failed = next(r for r in report.results if r.verdict in (Verdict.FAIL, Verdict.ERROR))
    return _Problem(f"{failed.check_id} {failed.title}: {failed.message}", report.exit_code)


def _sha256_of(path: Path) -> str:
    """The file's sha256.

    :raises OSError: it cannot be read, or it is not a regular file (see :func:`_open_regular`)
    """
    import hashlib

    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[Any]:
    """``path`` opened for reading, if it is a regular file.

    A FIFO put in the run folder would block a plain ``open`` until something writes to it,
    forever; so it is refused before it is opened, and again on what was opened
    (:func:`~dppo_ckpt._untrusted_files.open_regular`).

    :raises OSError: it cannot be opened, or it is not a regular file (one-line ``strerror``)
    """
    from dppo_ckpt._untrusted_files import NotRegularFile, open_regular

    try:
        handle = open_regular(path)
    except NotRegularFile as exc:
        raise OSError(errno.EINVAL, f"not a regular file ({exc.kind})") from None
    with handle:
        yield handle


def _step_of(name: str) -> int | None:
    """The step in a checkpoint's file name (``checkpoint_000001024.zip``), else None."""
    from dppo_ckpt.training import checkpoint_name

    prefix, suffix = checkpoint_name(0).split("0" * 9)
    digits = name.removeprefix(prefix).removesuffix(suffix)
    # isdigit() alone admits digits such as '²' that int() refuses.
    plain = name.startswith(prefix) and digits.isascii() and digits.isdigit()
    return int(digits) if plain else None


def _checkpoints_newest_first(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(_step_of(path.name), path) for path in run_dir.glob("checkpoint_*.zip")]
    return sorted(((step, path) for step, path in found if step is not None), reverse=True)


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    from dppo_ckpt.training import MANIFEST_NAME

    try:
        with _open_regular(run_dir / MANIFEST_NAME) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _quarantine(path: Path) -> list[Path]:
    """Move the checkpoint and the files written with it to ``run/quarantine/``."""
    folder = path.parent / QUARANTINE
    folder.mkdir(exist_ok=True)
    stem = path.name.removesuffix(".zip")
    moved = []
    for member in sorted(path.parent.glob(f"{stem}.*")):
        target = folder / member.name
        attempt = 1
        while target.exists():
            attempt += 1
            target = folder / f"{member.name}.{attempt}"
        os.replace(member, target)
        moved.append(target)
    return moved


def resume_point(run_dir: Path, reported: str | None, log: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies, quarantining newer ones that fail.

    :param reported: the file name of the checkpoint Tune last received, if any: it must be
        in ``run_dir`` and verify, or :class:`TrialCheckpointError` is raised with the reason.
        A missing one is refused rather than replaced by an older checkpoint: ``train`` never
        deletes one, so its absence means the folder is not the one Tune saw, and a trial that
        went back in time would quietly redo steps it had already reported
    :return: the checkpoint to resume from, or None to start afresh (nothing was reported and
        nothing verifies)
    """
    from dppo_ckpt import signing

    reported_step = _step_of(reported) if reported is not None else None
    if reported is not None:
        path = run_dir / reported
        if reported_step is None:
            raise TrialCheckpointError(
                f"{reported!r}, the checkpoint last reported to Tune, is not named as train "
                "names one"
            )
        if not (path.exists() or path.is_symlink()):
            raise TrialCheckpointError(
                f"checkpoint {path}, the one last reported to Tune, is missing: the trial is "
                "not resumed from an older one"
            )
    try:
        key: bytes | None = signing.load_key()
    except signing.SigningKeyError:
        key = None
    manifest = _read_manifest(run_dir)
    for step, path in _checkpoints_newest_first(run_dir):
        problem = _problem_with(path, manifest, key)
        if problem is None:
            return path
        if reported_step is not None and step <= reported_step:
            raise TrialCheckpointError(
                f"checkpoint {path}, the one last reported to Tune, fails verification: "
                f"{problem.reason}",
                problem.exit_code,
            )
        moved = _quarantine(path)
        log(
            f"quarantined {path.name} ({problem.reason}): moved "
            f"{', '.join(p.name for p in moved)} to {path.parent / QUARANTINE}"
        )
    if reported is not None:  # it went while the folder was read
        raise TrialCheckpointError(
            f"checkpoint {reported}, the one last reported to Tune, is not in {run_dir}"
        )
    return None


def _metrics(model: DistributionalPPO, eval_return: float | None = None) -> dict[str, float]:
    scaler = model._variance_gradient_scaler
    counts = scaler.factor_counts if scaler is not None else None
    steps = int(counts["steps"]) if counts else 0
    episodes = model.ep_info_buffer
    mean_return = sum(e["r"] for e in episodes) / len(episodes) if episodes else None
    nan = float("nan")
    return {
        "timesteps": float(model.num_timesteps),
        "return": nan if mean_return is None else float(mean_return),
        "eval_return": nan if eval_return is None else float(eval_return),
        "vgs_scale": nan if scaler is None else float(scaler.scaling_factor),
        "vgs_level": nan if scaler is None or scaler.level is None else float(scaler.level),
        "vgs_mean_factor": counts["scale_sum"] / steps if counts and steps else nan,
    }


@contextlib.contextmanager
def _staged(checkpoint: Path) -> Iterator[Path]:
    """A folder with the checkpoint, the files written with it and the manifest: what Tune
    keeps of the run, enough to resume it on a node that lacks the run folder."""
    from dppo_ckpt.training import MANIFEST_NAME

    with tempfile.TemporaryDirectory(prefix="dppo-tune-") as folder:
        stem = checkpoint.name.removesuffix(".zip")
        for member in [*checkpoint.parent.glob(f"{stem}.*"), checkpoint.parent / MANIFEST_NAME]:
            if member.is_file():
                shutil.copy2(member, Path(folder) / member.name)
        yield Path(folder)


def _seed_run_folder(saved: Path, run_dir: Path) -> str | None:
    """Copy what Tune kept into a run folder that lacks it (a new node); the checkpoint name."""
    names = [p.name for p in saved.glob("checkpoint_*.zip")]
    if not names:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    for member in saved.iterdir():
        if member.is_file() and not (run_dir / member.name).exists():
            shutil.copy2(member, run_dir / member.name)
    return names[0]


def _write_worker(trial_dir: Path, attempt: int) -> None:
    from dppo_ckpt.atomic import write_atomically

    record = {"pid": os.getpid(), "host": socket.gethostname(), "attempt": attempt}
    write_atomically(trial_dir / _WORKER, (json.dumps(record) + "\n").encode())


#: Keys of the last report of a trial that ended itself on a deterministic failure: why, in
#: one line, and the exit code it amounts to. Tune sees a trial that ended (nothing to retry).
FAILED_KEY = "trial_error"
FAILED_EXIT_KEY = "trial_exit_code"


def _run_trial(trial_config: dict[str, Any], config: SweepConfig) -> None:
    """The Tune trainable: one ``train`` run, resumed exactly after a restart.

    Tune retries a trainable that raises, as many times as ``max_failures`` allows. That is
    for a worker that died; a checkpoint that fails verification, or a run that ``train``
    refuses, would fail the same way on every retry. So those end the trial here, at once:
    a last report names the failure (:data:`FAILED_KEY`) and the trainable returns.
    """
    from ray import tune
    from rich.console import Console

    from dppo_ckpt import training

    context = tune.get_context()
    trial_dir = config.folder / "runs" / context.get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / _LOG, "a", encoding="utf-8") as log_file:
        console = Console(file=log_file, highlight=False, soft_wrap=True, width=120)

        def log(line: str) -> None:
            console.print(line)
            print(f"[{context.get_trial_id()}] {line}", flush=True)

        latest = dict.fromkeys(METRICS, float("nan"))
        try:
            summary = _attempt(config, trial_config, trial_dir, console, log, latest)
        except (TrialCheckpointError, training.TrainingError) as exc:
            log(f"error: {exc} (the trial ends: a restart would fail the same way)")
            tune.report({
                **latest, config.metric: float("nan"), FAILED_KEY: str(exc),
                FAILED_EXIT_KEY: exc.exit_code,
            })  # fmt: skip
            return
        final = dict(latest)
        final["timesteps"] = float(summary.timesteps)
        if summary.eval_return_mean is not None:
            final["eval_return"] = float(summary.eval_return_mean)
        log(f"done: {summary.timesteps:,} steps; last checkpoint {summary.last_checkpoint}")
        tune.report({**final, "last_checkpoint": str(summary.last_checkpoint)})


def _attempt(
    config: SweepConfig,
    trial_config: dict[str, Any],
    trial_dir: Path,
    console: Console,
    log: Callable[[str], None],
    latest: dict[str, float],
) -> Any:
    """One attempt at a trial: from its newest verified checkpoint, or afresh; each checkpoint
    reported to Tune with the figures of the moment (kept in ``latest``).

    :return: ``train``'s summary
    :raises TrialCheckpointError: the checkpoint Tune last received is missing or fails
    :raises ~dppo_ckpt.run_plan.TrainingError: ``train`` refused the run, or one of its
        checkpoints failed its checks
    """
    from ray import tune

    from dppo_ckpt import training

    run_dir = trial_dir / _RUN
    previous = _read_worker_attempt(trial_dir)
    _write_worker(trial_dir, previous + 1)
    reported = None
    saved = tune.get_checkpoint()
    if saved is not None:
        with saved.as_directory() as folder:
            reported = _seed_run_folder(Path(folder), run_dir)
    resume = resume_point(run_dir, reported, log) if run_dir.is_dir() else None
    if resume is None:
        if previous:
            log("restart: no checkpoint verifies; the trial starts afresh")
        options = trial_options(config, trial_config, trial_dir)
    else:
        log(f"restart: resuming from {resume.name}, the newest checkpoint that verifies")
        options = training.TrainOptions(
            resume=resume,
            eval_episodes=config.train.get("eval_episodes", training.DEFAULT_EVAL_EPISODES),
            portable=config.train.get("portable", True),
        )

    def report(path: Path, model: DistributionalPPO) -> None:
        latest.update(_metrics(model))
        with _staged(path) as folder:
            tune.report(dict(latest), checkpoint=tune.Checkpoint.from_directory(folder))

    options.on_checkpoint = report
    return training.train(options, console)


def _read_worker_attempt(trial_dir: Path) -> int:
    try:
        with _open_regular(trial_dir / _WORKER) as handle:
            return int(json.loads(handle.read().decode("utf-8")).get("attempt", 0))
    except (OSError, ValueError, AttributeError):
        return 0


# ---------------------------------------------------------------------------------------------
# The driver


def _param_space(config: SweepConfig, *, seeds: bool = True) -> dict[str, Any]:
    from ray import tune

    makers: dict[str, Callable[..., Any]] = {
        "grid": lambda values: tune.grid_search(list(values)),
        "choice": lambda values: tune.choice(list(values)),
        "uniform": lambda values: tune.uniform(*values),
        "loguniform": lambda values: tune.loguniform(*values),
    }
    space = {key: makers[d.kind](d.values) for key, d in config.space.items()}
    if seeds:
        space["seed"] = tune.grid_search(list(config.seeds))
    return space


def _optuna_search(config: SweepConfig) -> Any:
    """Ray's Optuna search, run once per seed for every draw.

    Optuna takes no grid, so the seeds cannot be a dimension of its space; and a draw judged
    on one seed would be judged on luck. Each draw therefore becomes one trial per seed, and
    Optuna is told the mean of the metric over those trials once they have all ended (or that
    the draw failed, if one of them did).
    """
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class EverySeed(Searcher):
        def __init__(self, inner: Any, seeds: list[int]) -> None:
            super().__init__(metric=config.metric, mode=config.mode)
            self.inner = inner
            self.seeds = seeds
            self.pending: list[dict[str, Any]] = []  # the current draw, for the seeds left
            self.draws = 0
            self.draw_of: dict[str, str] = {}  # Tune's trial -> the Optuna draw it runs
            self.scores: dict[str, list[float | None]] = {}

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if not self.pending:
                draw = f"draw{self.draws:05d}"
                params = self.inner.suggest(draw)
                if params is None or params == Searcher.FINISHED:
                    return params
                self.draws += 1
                self.scores[draw] = []
                self.pending = [{**params, "seed": seed, "_draw": draw} for seed in self.seeds]
            suggestion = dict(self.pending.pop(0))
            self.draw_of[trial_id] = suggestion.pop("_draw")
            return suggestion

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            draw = self.draw_of.pop(trial_id, None)
            if draw is None:
                return
            failed = error or not result or result.get(FAILED_KEY) is not None
            value = None if failed else result.get(config.metric)
            scores = self.scores[draw]
            scores.append(value if isinstance(value, (int, float)) else None)
            if len(scores) < len(self.seeds):
                return
            del self.scores[draw]
            known = [v for v in scores if v is not None and math.isfinite(v)]
            if len(known) < len(scores):
                self.inner.on_trial_complete(draw, None, error=True)
            else:
                self.inner.on_trial_complete(draw, {config.metric: sum(known) / len(known)})

    inner = OptunaSearch(
        space=_param_space(config, seeds=False), metric=config.metric, mode=config.mode,
        seed=config.seeds[0],
    )  # fmt: skip
    return EverySeed(inner, list(config.seeds))


def _progress_callback() -> Any:
    from ray.tune import Callback

    class Progress(Callback):
        """One line whenever a trial starts, restarts, ends or fails (on stdout: Tune pickles
        its callbacks, so this one holds no console)."""

        def __init__(self) -> None:
            self.running: set[str] = set()
            self.done = 0
            self.failed = 0

        def _line(self, what: str, trial: Any) -> None:
            print(
                f"trial {trial.trial_id} {what}: {len(self.running)} running, {self.done} done, "
                f"{self.failed} failed",
                flush=True,
            )

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.running.add(trial.trial_id)
            self._line("started", trial)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line("lost its worker; restarting from its newest verified checkpoint", trial)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.running.discard(trial.trial_id)
            failure = (trial.last_result or {}).get(FAILED_KEY)
            if failure is None:
                self.done += 1
                self._line("done", trial)
                return
            self.failed += 1
            self._line(f"failed, not retried ({failure})", trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._line("failed", trial)

    return Progress()


def _error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error)
    for marker in ("TrialCheckpointError: ", "SweepError: "):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def run_sweep(
    config: SweepConfig,
    console: Console,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
) -> SweepResult:
    """Run the sweep on Ray Tune; a row per trial, in Tune's order.

    :raises RayUnavailableError: Ray is missing or the cluster cannot be reached
    """
    _apply_numerics(config.train.get("portable", True))
    # Tune's own status tables would drown the progress lines; verbose=0 quiets them only in
    # its classic output engine.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    connect(address, num_cpus=num_cpus)
    from ray import tune

    search_alg = None
    param_space = _param_space(config)
    num_samples = config.samples
    if config.search == "optuna":
        # The searcher holds the space and suggests every trial's config, the seed included.
        search_alg, param_space = _optuna_search(config), {}
        num_samples = config.samples * len(config.seeds)
    config.folder.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, config=config), {"cpu": config.cpus_per_trial}
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=config.metric, mode=config.mode, num_samples=num_samples,
            search_alg=search_alg,
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=str(config.storage),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[_progress_callback()],
            verbose=0,
        ),
    )  # fmt: skip
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    rows = [_row(config, result) for result in grid]
    return SweepResult(rows, config.metric, config.mode, _best(rows, config), wall, config.folder)


def _row(config: SweepConfig, result: Any) -> TrialRow:
    metrics = dict(result.metrics or {})
    trial_id = str(metrics.get("trial_id") or Path(result.path).name)
    trial_dir = config.folder / "runs" / trial_id
    shown = {key: metrics.get(key) for key in METRICS if key in metrics}
    drawn = {key: value for key, value in (result.config or {}).items()}
    # A trial that ended itself on a deterministic failure says so in its last report.
    failure = metrics.get(FAILED_KEY)
    exit_code = metrics.get(FAILED_EXIT_KEY) if failure is not None else None
    return TrialRow(
        trial_id=trial_id,
        status="ERROR" if result.error is not None or failure is not None else "DONE",
        config=drawn,
        metrics=shown,
        run_dir=str(trial_dir / _RUN),
        last_checkpoint=metrics.get("last_checkpoint"),
        restarts=max(_read_worker_attempt(trial_dir) - 1, 0),
        error=str(failure) if failure is not None else _error_line(result.error),
        exit_code=(
            int(exit_code)
            if isinstance(exit_code, (int, float)) and math.isfinite(exit_code)
            else None
        ),
    )


def _best(rows: list[TrialRow], config: SweepConfig) -> str | None:
    scored = [
        (row.metrics[config.metric], row.trial_id) for row in rows
        if row.status == "DONE" and isinstance(row.metrics.get(config.metric), float)
        and math.isfinite(row.metrics[config.metric])
    ]  # fmt: skip
    if not scored:
        return None
    pick = max if config.mode == "max" else min
    return pick(scored)[1]


__all__ += [
    "FAILED_EXIT_KEY", "FAILED_KEY", "OPTUNA_EXTRA_HINT", "QUARANTINE", "RAY_EXTRA_HINT",
    "RayUnavailableError", "TrialCheckpointError",
]  # fmt: skip
