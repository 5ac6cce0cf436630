"""The `dppo-ckpt` command line: thin Typer commands that call library functions."""

from __future__ import annotations

import os
import sys
from enum import Enum
from inspect import cleandoc
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from dppo_ckpt import __version__
from dppo_ckpt import run_plan as defaults

if TYPE_CHECKING:
    from dppo_ckpt.checkpoint.allowlist import UserAllowList
    from dppo_ckpt.checkpoint.budgets import Budgets
    from dppo_ckpt.checkpoint.results import FileReport


class _Option(TyperOption):
    """An option whose default given as text shows as ``[default: TEXT]``, like any other
    default (Typer would write ``[default: (TEXT)]``)."""

    def _get_default_string(
        self, *, ctx: Any, show_default_is_str: bool, default_value: Any
    ) -> str:
        if show_default_is_str:
            return str(self.show_default)
        return super()._get_default_string(
            ctx=ctx, show_default_is_str=show_default_is_str, default_value=default_value
        )


def _help_params(params: list[Any]) -> list[Any]:
    """``params`` as ``--help`` shows them: flags without a type (``<bool>`` says nothing a
    flag does not) and every default in one style."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if type(param) is TyperOption:
            param.__class__ = _Option
    return params


def _unwrapped(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line: the help renderer keeps single line breaks,
    which then split lines in the middle at any terminal width."""
    if text is None:
        return None
    paragraphs = cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


class _Command(TyperCommand):
    """A command whose ``--help`` shows flags, defaults and paragraphs cleanly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = _unwrapped(kwargs.get("help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx: Any) -> list[Any]:
        return _help_params(super().get_params(ctx))


class _Group(TyperGroup):
    """The command group, with flags shown as in :class:`_Command`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _help_params(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="dppo-ckpt",
    help="Train distributional PPO agents with a Variance Gradient Scaler, and verify, "
    "migrate and regression-test their checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dppo-ckpt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """dppo-ckpt: checkpoints for distributional PPO with a Variance Gradient Scaler."""


# ---------------------------------------------------------------------------------------------
# verify


class VerifyFormat(str, Enum):
    """Output formats of ``verify``."""

    table = "table"
    json = "json"
    junit = "junit"
    sarif = "sarif"


class InspectFormat(str, Enum):
    """Output formats of ``inspect``."""

    table = "table"
    json = "json"


def _write_atomic(path: Path, text: str) -> None:
    """Write a report so that readers never see a half-written one."""
    from dppo_ckpt.atomic import write_atomically

    write_atomically(path, text.encode("utf-8"))


_SIZE_UNITS: dict[str, int] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _budgets(max_memory: str, timeout: float) -> Budgets:
    """The per-file budgets of the command line (``--max-memory 512MiB``, ``--timeout``)."""
    import re

    from dppo_ckpt.checkpoint.budgets import Budgets

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", max_memory, re.IGNORECASE)
    if match is None:
        typer.echo(
            f"error: --max-memory {max_memory!r}: give a size such as 512MiB or 4GiB", err=True
        )
        raise typer.Exit(2)
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        typer.echo("error: --max-memory must be positive", err=True)
        raise typer.Exit(2)
    return Budgets(max_memory=size, timeout=timeout)


_ALLOW_OPTION = typer.Option(
    "--allow",
    # rich would read "[tool.dppo-ckpt]" as markup and drop it.
    help="Also allow this exact module.Name (repeatable; adds to \\[tool.dppo-ckpt] allow).",
    metavar="MODULE.NAME",
    show_default=False,
)


def _user_allow(flags: list[str] | None) -> UserAllowList:
    """The run's extra allow entries (``--allow`` and the nearest pyproject), or exit 2."""
    from dppo_ckpt.checkpoint.allowlist import AllowListError, user_allow_list

    try:
        return user_allow_list(flags or ())
    except AllowListError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None


def _emit(reports: list[FileReport], fmt: str, command: str, output: Path | None) -> None:
    """Print the reports, or write them to ``output`` atomically and say so; exit 2 when
    ``output`` cannot be written."""
    from dppo_ckpt.checkpoint import report

    if output is None:
        report.print_reports(reports, fmt, command=command, tool_version=__version__)
        return
    text = report.render(reports, fmt, command=command, tool_version=__version__)
    try:
        _write_atomic(output, text)
    except OSError as exc:
        typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(report.written_line(reports, output))


@app.command(cls=_Command)
def verify(
    models: Annotated[
        list[Path], typer.Argument(help="Checkpoint zip(s) to verify.", show_default=False)
    ],
    fmt: Annotated[
        VerifyFormat, typer.Option("--format", "-f", help="Output format.")
    ] = VerifyFormat.table,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the report to this file (atomically)."),
    ] = None,
    static: Annotated[
        bool, typer.Option("--static", help="Static checks only: never import torch or load.")
    ] = False,
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Accept globals off the allow-list (may run code!)."),
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Skip the save/load round trip (DPPO012).")
    ] = False,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Check this many files in parallel.")
    ] = 1,
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate/--no-isolate",
            help="Load each file in its own child process, so a crash is that file's verdict.",
        ),
    ] = True,
    max_memory: Annotated[
        str,
        typer.Option("--max-memory", help="Memory budget per file for what its pickles build."),
    ] = "4GiB",
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Wall-time budget per file, in seconds.")
    ] = 120.0,
    allow: Annotated[list[str] | None, _ALLOW_OPTION] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Take *.zip in subfolders of folders too.")
    ] = False,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="Fan the checks out as Ray tasks (needs dppo-ckpt\\[ray])."),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option("--address", help="With --ray: the Ray cluster to join.", metavar="ADDR",
                     show_default="a new local cluster"),  # fmt: skip
    ] = None,
) -> None:
    """Check checkpoints (files, or the *.zip in folders): archive, safety, legacy layout,
    parameter links, statistics.

    Exit code: 0 all good, 1 a check failed, 2 a file could not be used, 3 refused as unsafe.
    """
    from dppo_ckpt.checkpoint.batch import verify_files
    from dppo_ckpt.checkpoint.fleet import RayUnavailableError
    from dppo_ckpt.checkpoint.inputs import checkpoint_files
    from dppo_ckpt.checkpoint.report import unusable_lines
    from dppo_ckpt.checkpoint.results import overall_exit_code

    paths = [str(path) for path in checkpoint_files(models, recursive=recursive)]
    if not paths:
        typer.echo("error: no checkpoint (*.zip) in the folders given", err=True)
        raise typer.Exit(2)
    if address is not None and not ray:
        typer.echo("error: --address needs --ray", err=True)
        raise typer.Exit(2)
    budgets = _budgets(max_memory, timeout)
    try:
        done = verify_files(
            paths, static=static, trust=trust, quick=quick, budgets=budgets,
            allow=_user_allow(allow), jobs=jobs, isolate=isolate, ray=ray, address=address,
        )  # fmt: skip
    except RayUnavailableError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None
    for line in done.messages:
        typer.echo(line, err=True)
    reports = done.reports
    for line in unusable_lines(reports):
        typer.echo(line, err=True)
    _emit(reports, fmt.value, "verify", output)
    raise typer.Exit(overall_exit_code(reports))


# ---------------------------------------------------------------------------------------------
# inspect


def _printable(value: Any) -> str:
    from dppo_ckpt.checkpoint.results import printable

    return printable(value)


@app.command(cls=_Command)
def inspect(
    model: Annotated[Path, typer.Argument(help="Checkpoint zip to describe.", show_default=False)],
    fmt: Annotated[
        InspectFormat, typer.Option("--format", "-f", help="Output format.")
    ] = InspectFormat.table,
) -> None:
    """Show what a checkpoint holds, without executing anything from it.

    Members, recorded versions, algorithm and policy class, hyperparameters, the scaler's
    configuration and counters, legacy status and every pickled global with its verdict.
    Exit code 2 when the file is not a usable checkpoint.
    """
    from dppo_ckpt.checkpoint.archive import CheckpointError
    from dppo_ckpt.checkpoint.contents import inspect_checkpoint
    from dppo_ckpt.checkpoint.report import inspection_to_json, render_inspection

    try:
        info = inspect_checkpoint(model)
    except CheckpointError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None
    if fmt is InspectFormat.json:
        sys.stdout.write(inspection_to_json(info))
        return
    from rich.console import Console

    render_inspection(info, Console())


# ---------------------------------------------------------------------------------------------
# train


_PORTABLE_OPTION = typer.Option(
    "--portable/--no-portable",
    help="Portable numerics: the same bits on any x86-64 CPU (one thread, CPU-independent "
    "kernels); --no-portable uses this CPU's fastest kernels.",
)


_ENV_HELP = "Gymnasium environment id; module:EnvId imports module first (as gymnasium.make does)."
_ENV_KWARGS_OPTION = typer.Option(
    "--env-kwargs", help="JSON object of keywords for gymnasium.make.", metavar="JSON"
)


# The options of the environment stack, shared by train and cycle. Their defaults are given
# as text: an option not given means "the recorded stack's, else this".
def _vec_env_option(default: str) -> Any:
    return typer.Option(
        "--vec-env", help="dummy (one process) or subproc (a process per environment).",
        metavar="KIND", show_default=default,
    )  # fmt: skip


def _normalize_option(default: str, options: str) -> Any:
    return typer.Option(
        "--normalize/--no-normalize",
        help=f"VecNormalize the observations and rewards (options: {options}).",
        show_default=default,
    )


def _frame_stack_option(default: str) -> Any:
    return typer.Option(
        "--frame-stack", help="Stack this many frames (VecFrameStack; 0: none).", metavar="N",
        show_default=default,
    )  # fmt: skip


def _atari_option(default: str) -> Any:
    return typer.Option(
        "--atari/--no-atari",
        help="Wrap in SB3's AtariWrapper (needs the atari extra: ale-py).",
        show_default=default,
    )


def _env_kwargs(text: str | None) -> dict[str, Any] | None:
    from dppo_ckpt import envs

    try:
        return envs.parse_env_kwargs(text)
    except envs.EnvError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None


@app.command("train", cls=_Command)
def train_command(
    env: Annotated[
        str | None,
        typer.Option("--env", help=_ENV_HELP, show_default=defaults.DEFAULT_ENV_ID),
    ] = None,
    env_kwargs: Annotated[str | None, _ENV_KWARGS_OPTION] = None,
    vec_env: Annotated[str | None, _vec_env_option("dummy")] = None,
    normalize: Annotated[
        bool | None, _normalize_option("no-normalize", "the config's \\[normalize]")
    ] = None,
    frame_stack: Annotated[int | None, _frame_stack_option("0")] = None,
    atari: Annotated[bool | None, _atari_option("no-atari")] = None,
    timesteps: Annotated[
        int | None,
        typer.Option(
            "--timesteps",
            help="Total environment steps of the run, rounded up to whole rollouts; a resumed "
            "run trains the rest.",
            show_default=str(defaults.DEFAULT_TIMESTEPS),
        ),
    ] = None,
    n_envs: Annotated[
        int | None,
        typer.Option(
            "--n-envs", help="Parallel environments.", show_default="4 for Pendulum-v1, else 1"
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Random seed.", show_default="0")
    ] = None,
    critic: Annotated[
        str | None,
        typer.Option(
            "--critic", help="quantile or categorical.", show_default=defaults.DEFAULT_CRITIC
        ),
    ] = None,
    vgs: Annotated[
        bool | None,
        typer.Option("--vgs/--no-vgs", help="Variance Gradient Scaler on or off.",
                     show_default="vgs"),  # fmt: skip
    ] = None,
    vgs_alpha: Annotated[
        float | None,
        typer.Option(
            "--vgs-alpha",
            help="Strength of the gradient scaling.",
            show_default=str(defaults.DEFAULT_VGS_ALPHA),
        ),
    ] = None,
    vgs_warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--vgs-warmup-steps",
            help="Optimizer steps before scaling.",
            show_default=str(defaults.DEFAULT_VGS_WARMUP_STEPS),
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file of DistributionalPPO keywords.", metavar="FILE"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Run folder.", metavar="DIR", show_default="runs/run-DATE-TIME"
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            "--checkpoint-every",
            help="Checkpoint every STEPS steps (at the next rollout boundary).",
            metavar="STEPS",
            show_default=str(defaults.DEFAULT_CHECKPOINT_EVERY),
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue a run from this checkpoint, exactly (loaded without running code).",
            metavar="CHECKPOINT",
        ),
    ] = None,
    branch: Annotated[
        str | None,
        typer.Option(
            "--branch",
            help="With --resume from an older checkpoint: continue into RUN/branches/NAME/, "
            "leaving the later checkpoints alone.",
            metavar="NAME",
        ),
    ] = None,
    eval_episodes: Annotated[
        int, typer.Option("--eval-episodes", help="Evaluation episodes at the end (0: none).")
    ] = 5,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Log to RUN/tensorboard (needs tensorboard).")
    ] = False,
    portable: Annotated[bool, _PORTABLE_OPTION] = True,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust",
            help="With --resume: load a checkpoint with globals off the allow-list, and an "
            "environment snapshot whose manifest is not signed with your key (may run code!).",
        ),
    ] = False,
    allow: Annotated[list[str] | None, _ALLOW_OPTION] = None,
) -> None:
    """Train a DistributionalPPO agent with the scaler, into a run folder of checkpoints.

    Checkpoints are written atomically, beside an environment snapshot, and verified.

    --resume continues bit for bit; the checkpoint loads through the allow-list loader, and
    the environment snapshot only from a run folder signed with your key. With --resume, the
    environment stack, --timesteps, --checkpoint-every and --seed default to the run's record.

    Ctrl-C writes a final, verified checkpoint and exits with 130.

    Exit code: 0 done, 1 a checkpoint failed its checks, 2 an option could not be used,
    3 the resume checkpoint was refused as unsafe.
    """
    from rich.console import Console

    from dppo_ckpt import training

    options = training.TrainOptions(
        env_id=env,
        timesteps=timesteps,
        n_envs=n_envs,
        env_kwargs=_env_kwargs(env_kwargs),
        vec_env=vec_env,
        normalize=normalize,
        frame_stack=frame_stack,
        atari=atari,
        seed=seed,
        critic=critic,
        vgs=vgs,
        vgs_alpha=vgs_alpha,
        vgs_warmup_steps=vgs_warmup_steps,
        config=config,
        out=out,
        checkpoint_every=checkpoint_every,
        resume=resume,
        branch=branch,
        eval_episodes=eval_episodes,
        tensorboard=tensorboard,
        portable=portable,
        trust=trust,
        user_allow=_user_allow(allow),
    )
    # soft_wrap: status lines (paths, "environments restart fresh") stay whole for log readers.
    console = Console(highlight=False, soft_wrap=True)
    try:
        summary = training.train(options, console)
    except training.TrainingError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("error: aborted by Ctrl-C; checkpoints already written are complete", err=True)
        raise typer.Exit(training.EXIT_INTERRUPTED) from None
    training.render_summary(summary, console)
    raise typer.Exit(training.EXIT_INTERRUPTED if summary.interrupted else 0)


# ---------------------------------------------------------------------------------------------
# sweep


@app.command("sweep", cls=_Command)
def sweep_command(
    config: Annotated[
        Path,
        typer.Argument(help="Sweep config (TOML): \\[sweep], \\[train], \\[model], \\[space].",
                       show_default=False),  # fmt: skip
    ],
    address: Annotated[
        str | None,
        typer.Option("--address", help="The Ray cluster to join.", metavar="ADDR",
                     show_default="a new local cluster"),  # fmt: skip
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also write the results as JSON here (atomically)."),
    ] = None,
) -> None:
    """Run many train runs on Ray Tune (needs dppo-ckpt\\[ray]); each trial survives the loss
    of its worker and resumes exactly from its newest verified checkpoint.

    Exit code: 0 every trial done, 1 a trial failed, 2 the config or Ray could not be used.
    """
    from dppo_ckpt.checkpoint import fleet

    if not fleet.ray_available():
        typer.echo(f"error: sweep needs Ray, which is not installed: {fleet.RAY_EXTRA_HINT}",
                   err=True)  # fmt: skip
        raise typer.Exit(2)
    from rich.console import Console

    from dppo_ckpt import sweep
    from dppo_ckpt.checkpoint.report import render_sweep, sweep_to_json

    # Wide when written to a file: the results table has a column per drawn value.
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    try:
        result = sweep.run_sweep(sweep.load_sweep_config(config), console, address=address)
    except (sweep.SweepError, fleet.RayUnavailableError) as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None
    render_sweep(result, console)
    if output is not None:
        try:
            _write_atomic(output, sweep_to_json(result, __version__) + "\n")
        except OSError as exc:
            typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
    raise typer.Exit(1 if result.failed else 0)


# ---------------------------------------------------------------------------------------------
# migrate


class MigrateFormat(str, Enum):
    """Output formats of ``migrate``."""

    table = "table"
    json = "json"


@app.command("migrate", cls=_Command)
def migrate_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="OLD.zip NEW.zip; or inputs (files or folders of *.zip) with --out-dir or "
            "--in-place.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Write each migrated input here, under its own name."),
    ] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Rewrite the inputs, keeping a backup of each.")
    ] = False,
    backup_suffix: Annotated[
        str, typer.Option("--backup-suffix", help="Suffix of the --in-place backup.")
    ] = ".bak",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would change; write nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    static: Annotated[
        bool,
        typer.Option("--static", help="Verify the result with the static checks only."),
    ] = False,
    fmt: Annotated[
        MigrateFormat, typer.Option("--format", "-f", help="Output format.")
    ] = MigrateFormat.table,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Take *.zip in subfolders of folders too.")
    ] = False,
) -> None:
    """Rewrite legacy checkpoints whose scaler pickled its parameters; change nothing else.

    Runs nothing from the file; the result is verified, then renamed into place atomically.

    Exit code: 0 all good or already current, 1 failed, 2 unusable input, 3 refused as unsafe.
    """
    from dppo_ckpt.checkpoint import migrate

    outcomes, code = migrate.migrate_paths(
        paths,
        out_dir=out_dir,
        in_place=in_place,
        backup_suffix=backup_suffix,
        dry_run=dry_run,
        force=force,
        static=static,
        recursive=recursive,
    )
    for outcome in outcomes:
        if outcome.exit_code != 0:
            typer.echo(f"error: {_printable(outcome.source)}: {_printable(outcome.message)}",
                       err=True)  # fmt: skip
    if fmt is MigrateFormat.json:
        from dppo_ckpt.checkpoint.report import migration_to_json

        sys.stdout.write(migration_to_json(outcomes, code, __version__) + "\n")
    else:
        from rich.console import Console

        from dppo_ckpt.checkpoint.report import render_migration

        render_migration(outcomes, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# cycle


class CycleFormat(str, Enum):
    """Output formats of ``cycle``."""

    table = "table"
    json = "json"
    junit = "junit"


@app.command("cycle", cls=_Command)
def cycle_command(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Start from this checkpoint instead of a fresh model.", show_default=False
        ),
    ] = None,
    env: Annotated[
        str | None,
        typer.Option(
            "--env", help=_ENV_HELP, show_default=f"MODEL's, else {defaults.DEFAULT_ENV_ID}"
        ),
    ] = None,
    env_kwargs: Annotated[str | None, _ENV_KWARGS_OPTION] = None,
    n_envs: Annotated[
        int | None,
        typer.Option("--n-envs", help="Parallel environments.", show_default="MODEL's, else 1"),
    ] = None,
    vec_env: Annotated[str | None, _vec_env_option("MODEL's, else dummy")] = None,
    normalize: Annotated[
        bool | None,
        _normalize_option("MODEL's, else no-normalize", "MODEL's, else VecNormalize's defaults"),
    ] = None,
    frame_stack: Annotated[int | None, _frame_stack_option("MODEL's, else 0")] = None,
    atari: Annotated[bool | None, _atari_option("MODEL's, else no-atari")] = None,
    cycles: Annotated[int, typer.Option("--cycles", help="Train-save-load cycles (K).")] = 3,
    steps: Annotated[int, typer.Option("--steps", help="Environment steps per cycle (N).")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model and environments.")] = 0,
    fmt: Annotated[
        CycleFormat, typer.Option("--format", "-f", help="Output format.")
    ] = CycleFormat.table,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the report to this file (atomically)."),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust", help="Load MODEL even with globals off the allow-list (may run code!)."
        ),
    ] = False,
    allow: Annotated[list[str] | None, _ALLOW_OPTION] = None,
    portable: Annotated[bool, _PORTABLE_OPTION] = True,
) -> None:
    """Save-load-train cycles with regression checks: the CI gate.

    K times: train N steps, save, load, check the loaded model, train on with it.

    MODEL's recorded environment stack is rebuilt (VecNormalize with its statistics beside
    it, frame stacking); options given here change it.

    Counters never reset; optimizer and scaler state survive; one set of parameter objects.

    K cycles of N steps must equal K*N uninterrupted steps, bit for bit.

    Exit code: 0 all good, 1 a check failed, 2 unusable input, 3 refused as unsafe.
    """
    from dppo_ckpt import cycles as cycles_module
    from dppo_ckpt import envs
    from dppo_ckpt.checkpoint.results import overall_exit_code

    env_options = envs.EnvOptions(
        env_id=env,
        n_envs=n_envs,
        env_kwargs=_env_kwargs(env_kwargs),
        vec_env=vec_env,
        normalize=normalize,
        frame_stack=frame_stack,
        atari=atari,
    )
    try:
        result = cycles_module.run_cycles(
            model,
            env_options=env_options,
            cycles=cycles,
            steps=steps,
            seed=seed,
            trust=trust,
            allow=_user_allow(allow),
            portable=portable,
            note=lambda line: typer.echo(f"note: {_printable(line)}", err=True),
        )
    except cycles_module.CycleError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(exc.exit_code) from None
    reports = [result]
    _emit(reports, fmt.value, "cycle", output)
    raise typer.Exit(overall_exit_code(reports))


@app.command("export", cls=_Command)
def export_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint zip to export.", show_default=False)],
    out: Annotated[
        Path,
        typer.Argument(help="Folder for policy.safetensors and policy.json.", show_default=False),
    ],
) -> None:
    """Write the policy as safetensors weights and a JSON description: no pickle at all.

    dppo_ckpt.load_policy(OUT) rebuilds it for prediction. The checkpoint is read with the
    allow-list loader. Exit code 2 when it cannot be used or exported, 3 when refused as unsafe.
    """
    from dppo_ckpt.checkpoint.archive import CheckpointError
    from dppo_ckpt.checkpoint.safe_pickle import UnsafePickleError
    from dppo_ckpt.export import ExportError, export_policy

    try:
        folder = export_policy(model, out)
    except UnsafePickleError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(3) from None
    except (CheckpointError, ExportError) as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: cannot write {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"exported {model} to {folder} (policy.safetensors, policy.json)")


def _static_verify_paths(argv: list[str]) -> list[str] | None:
    """The files of ``verify --static FILE...`` when ``argv`` is exactly that, else None.

    This is how the pre-commit hook calls us, on every commit. Typer builds a pydantic
    validator for each non-boolean parameter it parses, and importing pydantic and building
    those costs more than the static checks themselves; so this one shape of the command line
    goes straight to `verify`. Any other token (an option, ``--help``, ``--``, a name that
    starts with ``-``) leaves the whole command line to Typer.
    """
    if not argv or argv[0] != "verify" or "--static" not in argv[1:]:
        return None
    paths = [arg for arg in argv[1:] if arg != "--static"]
    if not paths or any(arg.startswith("-") for arg in paths):
        return None
    return paths


def _run_static_verify(paths: list[str]) -> None:
    """Run `verify --static` on ``paths`` and exit as Typer's standalone mode would."""
    import errno

    try:
        verify([Path(path) for path in paths], static=True)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        # A reader that went away (`| head`): stop quietly, as Typer does.
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(1)
    sys.exit(0)


# Options after which `verify` loads nothing in a child of the fork server.
_NO_LOAD_CHILDREN = frozenset({"--static", "--no-isolate", "--ray", "--help", "-h"})


def _loads_in_children(args: list[str]) -> bool:
    """Whether ``args`` look like a `verify` whose load checks will run in children.

    Then the fork server is started before Typer parses anything, so that its torch import
    overlaps the parsing. A wrong guess costs a server that is never used and exits with
    this process; the command itself is not changed by the guess.
    """
    return bool(args) and args[0] == "verify" and not _NO_LOAD_CHILDREN.intersection(args)


def main() -> None:
    """Entry point of the `dppo-ckpt` console script."""
    args = sys.argv[1:]
    paths = _static_verify_paths(args)
    if paths is not None:
        _run_static_verify(paths)
    if _loads_in_children(args):
        from dppo_ckpt.checkpoint.isolation import prestart

        prestart()
    app()


if __name__ == "__main__":
    main()
