"""Save-load-train cycles with regression checks: the CI gate behind ``dppo-ckpt cycle``.

Starting from a fresh model (small settings, so that a run takes seconds) or from a given
checkpoint, the runner repeats K times: train N steps, save, load, run the model checks of
:mod:`dppo_ckpt.checkpoint.checks` on the loaded model, and carry on training the *loaded*
model. Along the way it checks the invariants that the scaler's original checkpoint bug and
its relatives break (see ``DESIGN.md``), each as a :class:`CheckResult` with a stable ID.

The invariants are functions declared with their ID, title and remedy in
:data:`~dppo_ckpt.checkpoint.registry.CYCLE` (``CYC001``-``CYC008``), which gives their
order and the README's table: the *cycle* ones look at each cycle's save/load, CYC008 at an
uninterrupted reference run. Each invariant gives one result over all cycles (the first
failing cycle is named), and each model check one result over all loaded models, so a report
always has the same test cases.

CYC008 builds a second, identical starting point and trains it without any save/load. When
the model's schedules (learning rate, clip ranges) vary with training progress, a single long
``learn()`` call sees different progress values than K short ones even without a checkpoint,
so the reference then trains in K ``learn()`` calls of N steps as well; the report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dppo_ckpt import envs
from dppo_ckpt.checkpoint.checks import MODEL_CHECK_IDS
from dppo_ckpt.checkpoint.registry import CYCLE, CheckSpec, Registry
from dppo_ckpt.checkpoint.results import EXIT_UNSAFE, CheckResult, FileReport, Verdict

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv

    from dppo_ckpt.ppo import DistributionalPPO

__all__ = [
    "CYCLE_CHECKS",
    "CYCLE_SETTINGS",
    "MODEL_CHECK_IDS",
    "CycleError",
    "run_cycles",
]

#: Settings of the fresh model: small enough that the default run takes seconds, with a
#: warm-up short enough that the scaler really scales during the cycles.
CYCLE_SETTINGS: dict[str, Any] = {
    "n_steps": 128,
    "batch_size": 64,
    "n_epochs": 2,
    "learning_rate": 3e-4,
    "vgs_warmup_steps": 4,
}

#: The cycle invariants, by stable ID, in run order.
CYCLE_CHECKS: Registry = CYCLE

DEFAULT_ENV_ID = envs.DEFAULT_ENV_ID
DEFAULT_CYCLES = 3
DEFAULT_STEPS = 256


class CycleError(Exception):
    """The cycles could not start: ``exit_code`` 2 (unusable input) or 3 (refused as unsafe)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# State fingerprints


def _tensor_bytes(tensor: Any) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def _parameters_fingerprint(model: DistributionalPPO) -> list[tuple[str, bytes]]:
    return [(name, _tensor_bytes(p)) for name, p in model.policy.state_dict().items()]


def _optimizer_fingerprint(model: DistributionalPPO) -> list[tuple[str, bytes | str]]:
    import torch as th

    state = model.policy.optimizer.state_dict()
    out: list[tuple[str, bytes | str]] = [("param_groups", repr(state["param_groups"]))]
    for index, entry in sorted(state["state"].items()):
        for key, value in sorted(entry.items()):
            data = _tensor_bytes(value) if isinstance(value, th.Tensor) else repr(value)
            out.append((f"state/{index}/{key}", data))
    return out


def _scaler_fingerprint(state: dict[str, Any] | None) -> list[tuple[str, bytes | str]] | None:
    if state is None:
        return None
    out: list[tuple[str, bytes | str]] = []
    for key, value in sorted(state.items()):
        if isinstance(value, list):
            out.extend((f"{key}[{i}]", _tensor_bytes(t)) for i, t in enumerate(value))
        else:
            out.append((key, repr(value)))
    return out


def _first_difference(
    before: list[tuple[str, Any]] | None, after: list[tuple[str, Any]] | None
) -> str | None:
    """Name the first entry that differs between two fingerprints, or None if equal."""
    if before is None or after is None:
        return None if before is after else "present in one state only"
    if [key for key, _ in before] != [key for key, _ in after]:
        return "different entries"
    for (key, a), (_, b) in zip(before, after, strict=True):
        if a != b:
            return key
    return None


@dataclass
class _State:
    """What a model holds that must survive a save/load."""

    timesteps: int
    scaler_steps: int | None
    scaler_state: dict[str, Any] | None
    parameters: list[tuple[str, bytes]]
    optimizer: list[tuple[str, bytes | str]]

    @classmethod
    def of(cls, model: DistributionalPPO) -> _State:
        scaler = model._variance_gradient_scaler
        state = None if scaler is None else scaler.state_dict()
        return cls(
            timesteps=model.num_timesteps,
            scaler_steps=None if scaler is None else scaler.step_count,
            scaler_state=state,
            parameters=_parameters_fingerprint(model),
            optimizer=_optimizer_fingerprint(model),
        )

    @property
    def scaler(self) -> list[tuple[str, bytes | str]] | None:
        return _scaler_fingerprint(self.scaler_state)


def _shared_parameters(model: DistributionalPPO) -> str | None:
    """None when scaler, optimizer and policy hold the same parameter objects, else why not."""
    live = [p for p in model.policy.parameters() if p.requires_grad]
    live_ids = [id(p) for p in live]
    in_optimizer = [id(p) for group in model.policy.optimizer.param_groups for p in group["params"]]
    if set(in_optimizer) != set(live_ids) or len(in_optimizer) != len(live_ids):
        shared = len(set(in_optimizer) & set(live_ids))
        return f"the optimizer holds {shared}/{len(live_ids)} of the policy's parameter objects"
    scaler = model._variance_gradient_scaler
    if scaler is None:
        return None
    tracked = scaler.parameters
    if tracked is None:
        return f"the scaler is linked to no parameters (0/{len(live_ids)})"
    if [id(p) for p in tracked] != live_ids:
        shared = len({id(p) for p in tracked} & set(live_ids))
        return f"the scaler tracks {shared}/{len(live_ids)} of the policy's parameter objects"
    return None


def _pickled_parameter_copies(path: Path) -> bool:
    """Whether the checkpoint's scaler entry is legacy, by the one rule of
    :func:`~dppo_ckpt.checkpoint.contents.scaler_is_legacy` (nothing is unpickled)."""
    from dppo_ckpt.checkpoint.archive import open_checkpoint
    from dppo_ckpt.checkpoint.contents import scaler_is_legacy, scaler_payload

    with open_checkpoint(path) as archive:
        payload = scaler_payload(archive)
    return payload is not None and scaler_is_legacy(payload)


# ---------------------------------------------------------------------------------------------
# The invariants of each cycle


@dataclass
class _Cycle:
    """One cycle's save/load, as the invariants see it.

    :param before: the state before the cycle trained
    :param trained: the state it was saved in
    :param after: the state of the model loaded from ``checkpoint``
    :param legacy: the legacy-checkpoint warnings that loading gave
    """

    number: int
    before: _State
    trained: _State
    after: _State
    loaded: DistributionalPPO
    checkpoint: Path
    legacy: list[warnings.WarningMessage]
    has_scaler: bool


@dataclass(frozen=True)
class _Finding:
    """What a cycle invariant found wrong in one cycle."""

    message: str
    details: dict[str, Any] = field(default_factory=dict)


# Each invariant below is called after every cycle's load and returns what it found wrong in
# that cycle, or None. `passed` is its line over the whole run; `needs_scaler` makes it a skip
# for a model without a scaler, unless it failed anyway.


@CYCLE.check(
    "CYC001",
    title="Timesteps strictly increase and never reset",
    category="cycle",
    stage="cycle",
    summary="with training, and on every load",
    remedy="Load must restore num_timesteps and training must continue with "
    "learn(..., reset_num_timesteps=False); look for counters reset on load.",
    passed="timesteps {timeline}, kept by every load",
)
def _timesteps_never_reset(cycle: _Cycle) -> _Finding | None:
    before, trained, after = cycle.before, cycle.trained, cycle.after
    if not trained.timesteps > before.timesteps:
        return _Finding(
            f"cycle {cycle.number}: training moved timesteps from {before.timesteps} to "
            f"{trained.timesteps}"
        )
    if after.timesteps != trained.timesteps:
        return _Finding(
            f"cycle {cycle.number}: saved at {trained.timesteps} timesteps, loaded with "
            f"{after.timesteps}"
        )
    return None


@CYCLE.check(
    "CYC002",
    title="Scaler step count strictly increases and never resets",
    category="cycle",
    stage="cycle",
    summary="with training, and on every load",
    remedy="Restore the saved scaler state on every load and call compute_scale() on every "
    "minibatch of the loaded model; a scaler linked to parameter copies sees no gradients and "
    "stops counting.",
    passed="scaler steps {scaler_line}, kept by every load",
    needs_scaler=True,
)
def _scaler_steps_never_reset(cycle: _Cycle) -> _Finding | None:
    if not cycle.has_scaler:
        return None
    before, trained, after = cycle.before, cycle.trained, cycle.after
    if trained.scaler_steps is None or not (
        before.scaler_steps is not None and trained.scaler_steps > before.scaler_steps
    ):
        return _Finding(
            f"cycle {cycle.number}: training moved the scaler's step count from "
            f"{before.scaler_steps} to {trained.scaler_steps}"
        )
    if after.scaler_steps != trained.scaler_steps:
        return _Finding(
            f"cycle {cycle.number}: saved at scaler step {trained.scaler_steps}, loaded at "
            f"{after.scaler_steps}"
        )
    return None


@CYCLE.check(
    "CYC003",
    title="Policy parameters survive save/load bit for bit",
    category="cycle",
    stage="cycle",
    remedy="Save and load policy.pth unchanged; check dtype and device of the loaded policy.",
    passed="{loads} gave back every parameter exactly",
)
def _parameters_survive(cycle: _Cycle) -> _Finding | None:
    diff = _first_difference(cycle.trained.parameters, cycle.after.parameters)
    return None if diff is None else _Finding(f"cycle {cycle.number}: {diff} differs after load")


@CYCLE.check(
    "CYC004",
    title="Optimizer state survives save/load bit for bit",
    category="cycle",
    stage="cycle",
    remedy="Save and load policy.optimizer.pth with the policy; an optimizer rebuilt after "
    "load loses Adam's moments.",
    passed="{loads} gave back the optimizer state exactly",
)
def _optimizer_survives(cycle: _Cycle) -> _Finding | None:
    diff = _first_difference(cycle.trained.optimizer, cycle.after.optimizer)
    if diff is None:
        return None
    return _Finding(f"cycle {cycle.number}: optimizer {diff} differs after load")


@CYCLE.check(
    "CYC005",
    title="Scaler statistics survive save/load bit for bit",
    category="cycle",
    stage="cycle",
    remedy="Restore the scaler with load_state_dict() from its saved state on every load; "
    "never reset or re-create its statistics.",
    passed="{loads} gave back the scaler statistics exactly",
    needs_scaler=True,
)
def _scaler_survives(cycle: _Cycle) -> _Finding | None:
    diff = _first_difference(cycle.trained.scaler, cycle.after.scaler)
    if not cycle.has_scaler or diff is None:
        return None
    return _Finding(f"cycle {cycle.number}: scaler {diff} differs after load")


@CYCLE.check(
    "CYC006",
    title="Scaler, optimizer and policy share parameter objects",
    category="cycle",
    stage="cycle",
    summary="by `id()`, after every load",
    remedy="Relink the scaler after the policy and its optimizer exist, on every load: "
    "scaler.update_parameters(policy.parameters()).",
    passed="after {loads}, one set of parameter objects",
)
def _one_set_of_parameters(cycle: _Cycle) -> _Finding | None:
    problem = _shared_parameters(cycle.loaded)
    return None if problem is None else _Finding(f"cycle {cycle.number}, after load: {problem}")


@CYCLE.check(
    "CYC007",
    title="Checkpoints hold no pickled parameter copies",
    category="cycle",
    stage="cycle",
    summary="in the scaler entry, and no legacy warning on load",
    remedy="The scaler's __getstate__ must drop _parameters; rewrite old checkpoints with "
    "`dppo-ckpt migrate OLD.zip NEW.zip`.",
    passed="{saved}, no _parameters in the scaler",
    needs_scaler=True,
)
def _no_parameter_copies(cycle: _Cycle) -> _Finding | None:
    if cycle.has_scaler and _pickled_parameter_copies(cycle.checkpoint):
        return _Finding(
            f"cycle {cycle.number}: the saved scaler entry pickles _parameters",
            {"member": "data", "entry": "_variance_gradient_scaler"},
        )
    if cycle.legacy:
        return _Finding(
            f"cycle {cycle.number}: loading warned: {_one_line(cycle.legacy[0].message)}"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Starting points


@dataclass(frozen=True)
class _Start:
    """What both starting points are built from: the same inputs give the same model."""

    path: Path | None
    spec: envs.EnvSpec
    allowed: bool  # whether the spec's module: part may be imported
    seed: int
    trust: bool
    source: str = "the options"  # what recorded the spec, for messages
    where: str = "the options"  # where the spec came from, for the line that shows it
    allow: Any = None  # the allow-list MODEL loads with (built-in plus the user's entries)


def _make_env(start: _Start) -> tuple[VecEnv, str | None]:
    """The start's environments, with VecNormalize's statistics from beside the checkpoint
    (the builder ``train`` uses too); and the line saying where those statistics came from."""
    statistics = envs.statistics_path(start.path) if start.path is not None else None
    try:
        return envs.build_stack(
            start.spec, start.seed, allowed=start.allowed, source=start.source,
            statistics=statistics,
        )  # fmt: skip
    except envs.EnvError as exc:
        raise CycleError(str(exc), exc.exit_code) from None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _start(start: _Start) -> tuple[DistributionalPPO, str | None]:
    """A starting point; called twice, it gives two models that train identically.

    :return: the model, and the line saying where VecNormalize's statistics came from
    """
    from stable_baselines3.common.utils import set_random_seed

    from dppo_ckpt.ppo import DistributionalPPO

    model_path, seed, trust, env_id = start.path, start.seed, start.trust, start.spec.env_id
    # A checkpoint without recorded generator states must still start both runs alike.
    set_random_seed(seed)
    env, statistics = _make_env(start)
    if model_path is None:
        policy = envs.policy_for(env.observation_space)
        model = DistributionalPPO(policy, env, seed=seed, device="cpu", **CYCLE_SETTINGS)
        return model, statistics

    from dppo_ckpt.checkpoint.archive import CheckpointError
    from dppo_ckpt.checkpoint.isolation import probe_load
    from dppo_ckpt.checkpoint.safe_pickle import ALLOWED_GLOBALS, UnsafePickleError, safe_load

    crashed = probe_load(os.fspath(model_path), trust=trust, allow=start.allow)
    if crashed is not None:
        envs.close_quietly(env)
        raise CycleError(crashed[1], crashed[0])
    problem: CycleError | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = safe_load(
                model_path, algo_cls=DistributionalPPO, env=env, device="cpu", trust=trust,
                allow=start.allow or ALLOWED_GLOBALS,
            )  # fmt: skip
    except UnsafePickleError as exc:
        problem = CycleError(
            f"{model_path} refused as unsafe: {_one_line(exc)} (--trust loads it anyway)",
            EXIT_UNSAFE,
        )
    except CheckpointError as exc:
        # The reason alone: the archive was read from memory, so its own path is <memory>.
        problem = CycleError(f"cannot use {model_path}: {exc.reason}")
    except Exception as exc:  # SB3 raises anything for a file that does not fit
        problem = CycleError(
            f"cannot load {model_path} on {env_id} (--env sets the environment): {_one_line(exc)}"
        )
    else:
        if not isinstance(model, DistributionalPPO):
            problem = CycleError(f"{model_path} is not a DistributionalPPO checkpoint")
    if problem is not None:
        envs.close_quietly(env)  # a SubprocVecEnv's workers must not outlive the start
        raise problem
    # The environments restart on the first learn(); seeded, so both runs see the same ones.
    env.seed(seed)
    return model, statistics


def _schedules_constant(model: DistributionalPPO) -> bool:
    """Whether learning rate and clip ranges ignore the training progress."""
    schedules = [model.lr_schedule, model.clip_range, model.clip_range_vf]
    for schedule in schedules:
        if schedule is None or not callable(schedule):
            continue
        values = {float(schedule(progress)) for progress in (1.0, 0.5, 0.0)}
        if len(values) > 1:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Outcome:
    """Per-invariant findings collected over the cycles: the first failure wins."""

    failures: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def fail(self, check_id: str, message: str, **details: Any) -> None:
        self.failures.setdefault(check_id, (message, details))


@contextlib.contextmanager
def _timer(durations: dict[str, float], *check_ids: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        for check_id in check_ids:
            durations[check_id] = durations.get(check_id, 0.0) + elapsed


def _merge_model_checks(per_cycle: list[list[CheckResult]], cycles: int) -> list[CheckResult]:
    """One result per model check over all loaded models: the first failure or error wins."""
    order: list[str] = []
    by_id: dict[str, list[tuple[int, CheckResult]]] = {}
    for cycle, results in enumerate(per_cycle, start=1):
        for result in results:
            if result.check_id not in by_id:
                order.append(result.check_id)
                by_id[result.check_id] = []
            by_id[result.check_id].append((cycle, result))
    merged = []
    for check_id in order:
        runs = by_id[check_id]
        duration = sum(result.duration_s for _, result in runs)
        bad = next(((c, r) for c, r in runs if r.verdict in (Verdict.FAIL, Verdict.ERROR)), None)
        if bad is not None:
            cycle, result = bad
            merged.append(
                replace(result, message=f"cycle {cycle}: {result.message}", duration_s=duration)
            )
            continue
        cycle, last = runs[-1]
        if all(r.verdict is Verdict.PASS for _, r in runs):
            message = f"after {_count(len(runs), 'load')}: {last.message}"
        else:
            message = last.message
        merged.append(replace(last, message=message, duration_s=duration))
    return merged


def run_cycles(
    model_path: str | Path | None = None,
    *,
    env_id: str | None = None,
    env_options: envs.EnvOptions | None = None,
    cycles: int = DEFAULT_CYCLES,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    trust: bool = False,
    allow: Any = None,
    workdir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    portable: bool = True,
    note: Callable[[str], None] | None = None,
) -> FileReport:
    """Run ``cycles`` save-load-train cycles of ``steps`` steps and check every invariant.

    :param model_path: start from this checkpoint (loaded with the allow-list loader) instead
        of a fresh model with :data:`CYCLE_SETTINGS`
    :param env_id: the environment to train on (the same as ``env_options.env_id``); by
        default the one ``model_path`` records, else :data:`DEFAULT_ENV_ID`
    :param env_options: the rest of the environment stack (VecNormalize, frame stacking, ...)
        given by the user; what they leave out comes from the spec ``model_path`` records
    :param cycles: how many times to train, save and load (K)
    :param steps: environment steps per cycle (N), rounded up to whole rollouts
    :param seed: seed of the fresh model and of the environments
    :param trust: load ``model_path`` even if it pickles globals off the allow-list
    :param allow: the user's extra allow entries (a
        :class:`~dppo_ckpt.checkpoint.allowlist.UserAllowList`) for ``model_path``
    :param workdir: keep the cycle checkpoints here (default: a temporary folder)
    :param progress: called with a short line as each stage starts
    :param portable: run in portable numerics (see :mod:`dppo_ckpt.numerics`); fixed for the
        process by its first choice
    :param note: called with the environment stack used and where it came from, and with the
        line saying that ``model_path`` was written with other numerics, so that its results
        here are not bit for bit those of its machine
    :return: one report, path = ``model_path`` or ``"fresh-<env_id>"``
    :raises CycleError: the start could not be used (exit 2) or was refused as unsafe (exit 3)
    """
    from dppo_ckpt import numerics

    try:  # first: the libraries fix their numerics when they load
        numerics.apply_numerics(numerics.PORTABLE if portable else numerics.NATIVE)
    except numerics.NumericsError as exc:
        raise CycleError(str(exc)) from None
    if cycles < 1:
        raise CycleError(f"--cycles must be >= 1, got {cycles}")
    if steps < 1:
        raise CycleError(f"--steps must be >= 1, got {steps}")
    path = Path(model_path) if model_path is not None else None
    given = dataclasses.replace(env_options or envs.EnvOptions())
    if env_id is not None:
        given.env_id = env_id
    start = _plan_start(path, given, seed, trust)
    if allow is not None and allow.pairs:
        from dppo_ckpt.checkpoint.safe_pickle import ALLOWED_GLOBALS

        start = dataclasses.replace(start, allow=allow.merged(ALLOWED_GLOBALS))
    say = progress or (lambda line: None)

    with contextlib.ExitStack() as stack:
        if workdir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dppo-cycle-")))
        else:
            folder = Path(workdir)
            folder.mkdir(parents=True, exist_ok=True)
        results = _run(start, cycles, steps, folder, say, note)
    report_path = str(model_path) if model_path is not None else f"fresh-{start.spec.env_id}"
    notes: list[str] = []
    if allow is not None and allow.pairs and path is not None:
        # Listed in every format, so a change adding a zip and an allow entry shows in review.
        source = allow.source or "--allow"
        notes.append(f"extra allow entries {', '.join(allow.names)} from {source}")
        used = {"extra_allow": allow.names, "allow_source": allow.source}
        results = [dataclasses.replace(r, details={**r.details, **used}) for r in results]
    return FileReport.from_results(report_path, results, notes=notes)


def _plan_start(path: Path | None, given: envs.EnvOptions, seed: int, trust: bool) -> _Start:
    """The starting point's inputs, with where its environment spec came from.

    The spec a checkpoint records is read as plain JSON; its ``module:`` part is imported
    only when ``--env`` names that very environment, or with ``--trust``.

    :raises CycleError: the file or the options cannot be used (exit 2)
    """
    from dppo_ckpt.checkpoint.archive import CheckpointError, open_checkpoint

    recorded = None
    where = "the options"
    if path is not None:
        if not path.is_file():
            what = "is a folder, not a checkpoint" if path.is_dir() else "no such file"
            if path.exists() and not path.is_dir():
                what = "not a regular file"
            raise CycleError(f"cannot use {path}: {what}")
        try:
            with open_checkpoint(path) as archive:
                metadata = archive.metadata or {}
        except CheckpointError as exc:
            raise CycleError(f"cannot use {path}: {exc.reason}") from None
        try:
            if metadata.get("env") is not None:
                recorded = envs.EnvSpec.from_json(metadata["env"], path.name)
        except envs.EnvError as exc:
            raise CycleError(str(exc)) from None
        where = f"recorded in {path.name}" if recorded is not None else (
            f"{path.name} records none" + ("" if given.env_id else "; --env sets it")
        )  # fmt: skip
    try:
        spec = envs.resolve_spec(given, recorded, fixed=recorded is not None)
    except envs.EnvError as exc:
        raise CycleError(str(exc), exc.exit_code) from None
    if given.env_id is not None and recorded is not None:
        where = f"--env; {where}"
    allowed = trust or (given.env_id is not None and given.env_id == spec.env_id)
    if not allowed and path is not None and spec.module is not None:
        allowed = _vouched_for(path, spec)
    source = path.name if path is not None else "the options"
    return _Start(path, spec, allowed, seed, trust, source, where)


def _vouched_for(path: Path, spec: envs.EnvSpec) -> bool:
    """Whether the ``run.json`` beside ``path`` is signed with the user's key, lists this very
    checkpoint (same sha256) and records the same environment: then its ``module:`` part is
    the user's own, as for ``train --resume``."""
    import hashlib
    import json

    from dppo_ckpt import signing

    if not (os.environ.get(signing.KEY_ENV) or signing.key_path().is_file()):
        return False  # no key yet: nothing was signed with it (and none is created here)
    try:
        manifest = json.loads((path.parent / "run.json").read_text("utf-8"))
        key = signing.load_key()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, ValueError, signing.SigningKeyError):
        return False
    if not isinstance(manifest, dict) or signing.verify(manifest, key) is not None:
        return False
    recorded = manifest.get("env")
    listed = manifest.get("checkpoints")
    return (
        isinstance(recorded, dict)
        and recorded.get("env_id") == spec.env_id
        and isinstance(listed, list)
        and any(
            isinstance(e, dict) and e.get("file") == path.name and e.get("sha256") == digest
            for e in listed
        )
    )


def _numerics_note(path: Path) -> str | None:
    """The line saying that this process cannot reproduce the checkpoint's bits, if so.

    Nothing is said of an unreadable file: the load that follows reports it with its reason.
    """
    from dppo_ckpt import numerics
    from dppo_ckpt.checkpoint.archive import CheckpointError, open_checkpoint

    try:
        with open_checkpoint(path) as archive:
            metadata = archive.metadata
    except CheckpointError:
        return None
    return numerics.resume_note(metadata["numerics"] if metadata is not None else None)


def _run(
    start: _Start,
    cycles: int,
    steps: int,
    folder: Path,
    say: Callable[[str], None],
    note: Callable[[str], None] | None = None,
) -> list[CheckResult]:
    say("building the starting point")
    model, statistics = _start(start)
    env = model.get_env()
    try:
        if note is not None:  # said once the start is known to be usable
            note(f"environment: {start.spec.describe()} ({start.where})")
            if statistics is not None:
                note(statistics)
        return _run_started(start, model, cycles, steps, folder, say, note)
    finally:
        envs.close_quietly(env)


def _run_started(
    start: _Start,
    model: DistributionalPPO,
    cycles: int,
    steps: int,
    folder: Path,
    say: Callable[[str], None],
    note: Callable[[str], None] | None,
) -> list[CheckResult]:
    from dppo_ckpt.checkpoint.checks import model_checks
    from dppo_ckpt.ppo import DistributionalPPO, LegacyCheckpointWarning

    path = start.path
    outcome = _Outcome()
    durations: dict[str, float] = {}
    per_cycle_model_checks: list[list[CheckResult]] = []
    if path is not None and note is not None:  # said once the start is known to be usable
        line = _numerics_note(path)
        if line is not None:
            note(line)
    env = model.get_env()
    rollout = model.n_steps * model.n_envs
    steps_per_cycle = math.ceil(steps / rollout) * rollout
    has_scaler = model._variance_gradient_scaler is not None
    history: list[dict[str, Any]] = []
    start_timesteps = model.num_timesteps
    broken: str | None = None

    for cycle in range(1, cycles + 1):
        stage = "learn"
        try:
            say(f"cycle {cycle}/{cycles}: train {steps_per_cycle} steps, save, load")
            before = _State.of(model)
            model.learn(steps, reset_num_timesteps=False)
            trained = _State.of(model)
            checkpoint = folder / f"cycle_{cycle}.zip"
            stage = "save"
            model.save(checkpoint)
            stage = "load"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = DistributionalPPO.load(
                    checkpoint, env=env, device="cpu", force_reset=False
                )
            legacy = [w for w in caught if issubclass(w.category, LegacyCheckpointWarning)]
            stage = "check"
            after = _State.of(loaded)
            history.append(
                {
                    "cycle": cycle,
                    "timesteps": [before.timesteps, trained.timesteps, after.timesteps],
                    "scaler_steps": [before.scaler_steps, trained.scaler_steps, after.scaler_steps],
                }
            )
            observed = _Cycle(cycle, before, trained, after, loaded, checkpoint, legacy, has_scaler)
            for spec in CYCLE_CHECKS.in_stage("cycle"):
                with _timer(durations, spec.check_id):
                    found = spec(observed)
                if found is not None:
                    outcome.fail(spec.check_id, found.message, **found.details)
            say(f"cycle {cycle}/{cycles}: model checks")
            per_cycle_model_checks.append(model_checks(loaded, trained.scaler_state))
            model = loaded
        except Exception as exc:  # the gate reports a crash as an error, never a traceback
            broken = f"cycle {cycle} stopped in {stage}: {type(exc).__name__}: {_one_line(exc)}"
            break

    final = _State.of(model) if broken is None else None
    results: list[CheckResult] = []
    details = {"cycles": cycles, "steps_per_cycle": steps_per_cycle, "history": history}

    timeline = [start_timesteps] + [h["timesteps"][2] for h in history]
    scaler_line = [h["scaler_steps"][0] for h in history[:1]]
    scaler_line += [h["scaler_steps"][2] for h in history]
    run = {
        "timeline": " -> ".join(str(t) for t in timeline),
        "scaler_line": " -> ".join(str(s) for s in scaler_line),
        "loads": _count(cycles, "load"),
        "saved": _count(cycles, "checkpoint"),
    }

    def verdict(spec: CheckSpec) -> CheckResult:
        if spec.check_id in outcome.failures:
            message, extra = outcome.failures[spec.check_id]
            result = spec.failed(message, **extra, **details)
        elif broken is not None:
            result = spec.errored(broken)
        elif spec.options.get("needs_scaler") and not has_scaler:
            result = spec.skipped("the model has no scaler (variance_gradient_scaling=False)")
        else:
            result = spec.passed(spec.options["passed"].format(**run), **details)
        return replace(result, duration_s=durations.get(spec.check_id, 0.0))

    for spec in CYCLE_CHECKS.values():
        if spec.stage == "cycle":
            results.append(verdict(spec))
        else:
            results.append(spec(start, cycles, steps, steps_per_cycle, final, broken, say))
    merged = _merge_model_checks(per_cycle_model_checks, cycles)
    if broken is not None:
        # Keep the report's test cases the same even when a cycle crashed before a check ran.
        from dppo_ckpt.checkpoint.checks import CHECKS

        present = {result.check_id for result in merged}
        merged += [CHECKS[i].errored(broken) for i in MODEL_CHECK_IDS if i not in present]
    results.extend(merged)
    return results


@CYCLE.check(
    "CYC008",
    title="Cycles equal uninterrupted training bit for bit",
    category="cycle",
    stage="reference",
    summary="K cycles of N steps against K*N steps from the same start",
    remedy="Some state is not saved or not restored: compare the random generator states, "
    "counters, scaler and optimizer state of a loaded model with the saved one.",
)
def _exact_resume(
    start: _Start,
    cycles: int,
    steps: int,
    steps_per_cycle: int,
    final: _State | None,
    broken: str | None,
    say: Callable[[str], None],
) -> CheckResult:
    """CYC008: train a second, identical start without save/load and compare bit for bit."""
    spec = CYCLE_CHECKS["CYC008"]
    if final is None:
        return spec.errored(broken or "the cycles did not finish")
    started = time.perf_counter()
    total = cycles * steps_per_cycle
    reference = None
    try:
        say(f"reference: {total} steps without save/load")
        reference, _ = _start(start)
        if _schedules_constant(reference):
            reference.learn(total, reset_num_timesteps=False)
            how = f"{total} uninterrupted steps"
        else:
            for _ in range(cycles):
                reference.learn(steps, reset_num_timesteps=False)
            how = f"{cycles} learn() calls of {steps_per_cycle} steps without save/load"
            how += " (the schedules vary with progress)"
        expected = _State.of(reference)
    except Exception as exc:  # as in the cycles: a crash is an error result
        return spec.errored(f"the reference run failed: {type(exc).__name__}: {_one_line(exc)}")
    finally:
        if reference is not None:
            envs.close_quietly(reference.get_env())
    details = {"reference": how, "timesteps": final.timesteps}
    mismatches = []
    if expected.timesteps != final.timesteps:
        mismatches.append(f"timesteps {final.timesteps} vs {expected.timesteps}")
    for what, ours, theirs in (
        ("parameter", final.parameters, expected.parameters),
        ("optimizer", final.optimizer, expected.optimizer),
        ("scaler", final.scaler, expected.scaler),
    ):
        diff = _first_difference(ours, theirs)
        if diff is not None:
            mismatches.append(f"{what} {diff}")
    duration = time.perf_counter() - started
    if mismatches:
        result = spec.failed(
            f"{_count(cycles, 'cycle')} of {steps_per_cycle} steps differ from {how}: "
            + "; ".join(mismatches),
            **details,
        )
    else:
        result = spec.passed(
            f"{_count(cycles, 'cycle')} of {steps_per_cycle} steps equal {how}: parameters, "
            "optimizer and scaler state bit for bit",
            **details,
        )
    return replace(result, duration_s=duration)
