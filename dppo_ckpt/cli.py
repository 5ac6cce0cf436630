"""The `dppo-ckpt` command line: thin Typer commands that call library functions."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dppo_ckpt import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from dppo_ckpt.checkpoint.results import FileReport

app = typer.Typer(
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


def _failed_run_report(path: str, reason: str) -> FileReport:
    """The report of a file whose checks could not run at all (e.g. a worker died)."""
    from dppo_ckpt.checkpoint.checks import CHECKS
    from dppo_ckpt.checkpoint.results import FileReport

    return FileReport.from_results(path, [CHECKS["DPPO001"].errored(reason)])


def _verify_all(
    paths: list[str], *, static: bool, trust: bool, quick: bool, jobs: int
) -> list[FileReport]:
    """Run the checks on every file, in worker processes when ``jobs > 1``; input order."""
    from dppo_ckpt.checkpoint.checks import run_checks

    options: dict[str, Any] = {"static": static, "trust": trust, "quick": quick}
    if jobs <= 1 or len(paths) <= 1:
        return [run_checks(path, **options) for path in paths]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: torch and forked worker processes do not mix well.
    context = multiprocessing.get_context("spawn")
    reports: list[FileReport] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(paths)), mp_context=context) as pool:
        futures = [pool.submit(run_checks, path, **options) for path in paths]
        for path, future in zip(paths, futures, strict=True):
            try:
                reports.append(future.result())
            except Exception as exc:
                reports.append(_failed_run_report(path, f"the check process failed: {exc!r}"))
    return reports


def _render(reports: list[FileReport], fmt: VerifyFormat, console: Console | None) -> str:
    from dppo_ckpt.checkpoint import report

    if fmt is VerifyFormat.json:
        return report.to_json(reports, __version__, "verify") + "\n"
    if fmt is VerifyFormat.junit:
        return report.to_junit(reports, "verify")
    if fmt is VerifyFormat.sarif:
        return report.to_sarif(reports, __version__) + "\n"
    import io

    from rich.console import Console

    buffer = io.StringIO()
    report.render_table(reports, Console(file=buffer, width=120, color_system=None))
    return buffer.getvalue()


@app.command()
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
) -> None:
    """Check checkpoints: archive, safety, legacy layout, parameter links, statistics.

    Exit code: 0 all good, 1 a check failed, 2 a file could not be used, 3 refused as unsafe.
    """
    from dppo_ckpt.checkpoint.results import overall_exit_code

    paths = [str(path) for path in models]
    reports = _verify_all(paths, static=static, trust=trust, quick=quick, jobs=jobs)
    code = overall_exit_code(reports)
    for rep in reports:
        # The reason a file could not be used, on one line where scripts look for errors.
        first = rep.results[0] if rep.results else None
        if first is not None and first.check_id == "DPPO001" and first.verdict.value != "pass":
            typer.echo(f"error: {_printable(first.message)}", err=True)
    if output is not None:
        try:
            _write_atomic(output, _render(reports, fmt, None))
        except OSError as exc:
            typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
        from dppo_ckpt.checkpoint.report import summary_line

        typer.echo(f"{summary_line(reports)} (report written to {output})")
    elif fmt is VerifyFormat.table:
        from rich.console import Console

        from dppo_ckpt.checkpoint.report import render_table

        render_table(reports, Console())
    else:
        sys.stdout.write(_render(reports, fmt, None))
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# inspect


def _printable(value: Any) -> str:
    """Names from a hostile file may hold control characters: show them escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode()
        for ch in text
    )


def _render_inspection(info: dict[str, Any], console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    def table(title: str, *columns: str) -> Table:
        out = Table(title=Text(title, style="bold"), title_justify="left")
        for column in columns:
            out.add_column(column)
        return out

    def row(out: Table, *values: Any) -> None:
        out.add_row(*(Text(_printable(v)) for v in values))

    console.print(Text(_printable(info["path"]), style="bold"))
    members = table("Members", "Name", "Size", "Stored", "Compression")
    for m in info["members"]:
        row(members, m["name"], m["size"], m["compressed_size"], m["compression"])
    console.print(members)
    overview = table("Checkpoint", "Field", "Value")
    for key, value in info["versions"].items():
        row(overview, f"{key} version", value if value is not None else "not recorded")
    row(overview, "algorithm", info["algorithm"] or "unknown")
    row(overview, "policy class", info["policy_class"] or "unknown")
    row(overview, "legacy scaler entry", "yes: run `dppo-ckpt migrate`" if info["legacy"] else "no")
    row(overview, "all globals allow-listed", "yes" if info["safe"] else "NO")
    console.print(overview)
    hyper = table("Hyperparameters (plain JSON values of data)", "Key", "Value")
    for key, value in info["hyperparameters"].items():
        text = repr(value)
        row(hyper, key, text if len(text) <= 80 else text[:77] + "...")
    for key, kind in info["pickled_entries"].items():
        row(hyper, key, f"pickled {kind or ''}".strip())
    console.print(hyper)
    vgs = info["vgs"]
    scaler = table("Variance Gradient Scaler", "Field", "Value")
    if vgs is None:
        row(scaler, "scaler", "none (off, or not a DistributionalPPO checkpoint)")
    elif "error" in vgs:
        row(scaler, "scaler", f"cannot decode: {vgs['error']}")
    else:
        version = vgs["state_version"]
        old = " (before the running level: `dppo-ckpt migrate` rewrites it)"
        row(scaler, "state format", f"{version}{old if version == 1 else ''}")
        for key, value in vgs["config"].items():
            row(scaler, key, value)
        for key in ("step_count", "scaling_factor", "noise_ratio", "level"):
            row(scaler, key, vgs[key])
        row(scaler, "updates after warm-up", vgs["updates_after_warmup"])
        for key, label in (
            ("at_min_share", "share at min_scale"),
            ("at_one_share", "share at 1"),
            ("scale_mean", "mean factor"),
        ):
            value = vgs[key]
            row(scaler, label, "n/a" if value is None else f"{value:.3f}")
        for key in ("tensors", "elements"):
            row(scaler, key, vgs[key])
    console.print(scaler)
    numerics = table("Numerics (what bit-for-bit results depend on)", "Field", "Value")
    if info["numerics"] is None:
        row(numerics, "fingerprint", "not recorded (plain SB3, or dppo-ckpt < 0.2)")
    else:
        for key, value in info["numerics"].items():
            row(numerics, key, value)
    console.print(numerics)
    globals_table = table("Globals referenced", "Global", "Verdict", "Where")
    for g in info["globals"]:
        where = g["member"] + (f" / {g['entry']}" if g["entry"] else "")
        if g["path"]:
            where += " > " + " > ".join(g["path"])
        verdict = Text(g["verdict"], style="green" if g["verdict"] == "allowed" else "bold red")
        globals_table.add_row(Text(_printable(g["global"])), verdict, Text(_printable(where)))
    console.print(globals_table)


@app.command()
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
    import json

    from dppo_ckpt.checkpoint.archive import CheckpointError
    from dppo_ckpt.checkpoint.contents import inspect_checkpoint

    try:
        info = inspect_checkpoint(model)
    except CheckpointError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(2) from None
    if fmt is InspectFormat.json:
        sys.stdout.write(json.dumps(info, indent=2, ensure_ascii=True, default=str) + "\n")
        return
    from rich.console import Console

    _render_inspection(info, Console())


# ---------------------------------------------------------------------------------------------
# train


_PORTABLE_OPTION = typer.Option(
    "--portable/--no-portable",
    help="Portable numerics: the same bits on any x86-64 CPU (one thread, CPU-independent "
    "kernels); --no-portable uses this CPU's fastest kernels.",
)


@app.command("train")
def train_command(
    env: Annotated[
        str | None, typer.Option("--env", help="Gymnasium environment id. (default Pendulum-v1)")
    ] = None,
    timesteps: Annotated[
        int | None,
        typer.Option(
            "--timesteps",
            help="Total environment steps of the run; a resumed run trains the rest. "
            "(default 100000)",
        ),
    ] = None,
    n_envs: Annotated[
        int | None,
        typer.Option("--n-envs", help="Parallel environments. (default 4 for Pendulum-v1, else 1)"),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed. (default 0)")] = None,
    critic: Annotated[
        str | None,
        typer.Option("--critic", help="quantile or categorical. (default quantile)"),
    ] = None,
    vgs: Annotated[
        bool | None,
        typer.Option("--vgs/--no-vgs", help="Variance Gradient Scaler on or off. (default on)"),
    ] = None,
    vgs_alpha: Annotated[
        float | None, typer.Option("--vgs-alpha", help="Strength of the gradient scaling.")
    ] = None,
    vgs_warmup_steps: Annotated[
        int | None, typer.Option("--vgs-warmup-steps", help="Optimizer steps before scaling.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file of DistributionalPPO keywords.", metavar="FILE"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder. (default runs/run-DATE-TIME)", metavar="DIR"),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            "--checkpoint-every",
            help="Checkpoint every STEPS steps (at the next rollout boundary). (default 10000)",
            metavar="STEPS",
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
) -> None:
    """Train a DistributionalPPO agent with the scaler, into a run folder of checkpoints.

    Checkpoints are written atomically, beside an environment snapshot, and verified.

    --resume continues bit for bit; the checkpoint loads through the allow-list loader, and
    the environment snapshot only from a run folder signed with your key.

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
        seed=seed,
        critic=critic,
        vgs=vgs,
        vgs_alpha=vgs_alpha,
        vgs_warmup_steps=vgs_warmup_steps,
        config=config,
        out=out,
        checkpoint_every=checkpoint_every,
        resume=resume,
        eval_episodes=eval_episodes,
        tensorboard=tensorboard,
        portable=portable,
        trust=trust,
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
# migrate


class MigrateFormat(str, Enum):
    """Output formats of ``migrate``."""

    table = "table"
    json = "json"


@app.command("migrate")
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
    )
    for outcome in outcomes:
        if outcome.exit_code != 0:
            typer.echo(f"error: {_printable(outcome.source)}: {_printable(outcome.message)}",
                       err=True)  # fmt: skip
    if fmt is MigrateFormat.json:
        sys.stdout.write(migrate.outcomes_to_json(outcomes, code, __version__) + "\n")
    else:
        from rich.console import Console

        migrate.render_outcomes(outcomes, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# cycle


class CycleFormat(str, Enum):
    """Output formats of ``cycle``."""

    table = "table"
    json = "json"
    junit = "junit"


@app.command("cycle")
def cycle_command(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Start from this checkpoint instead of a fresh model.", show_default=False
        ),
    ] = None,
    env: Annotated[str, typer.Option("--env", help="Gymnasium environment id.")] = "Pendulum-v1",
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
    portable: Annotated[bool, _PORTABLE_OPTION] = True,
) -> None:
    """Save-load-train cycles with regression checks: the CI gate.

    K times: train N steps, save, load, check the loaded model, train on with it.

    Counters never reset; optimizer and scaler state survive; one set of parameter objects.

    K cycles of N steps must equal K*N uninterrupted steps, bit for bit.

    Exit code: 0 all good, 1 a check failed, 2 unusable input, 3 refused as unsafe.
    """
    from dppo_ckpt import cycles as cycles_module
    from dppo_ckpt.checkpoint import report
    from dppo_ckpt.checkpoint.results import overall_exit_code

    try:
        result = cycles_module.run_cycles(
            model,
            env_id=env,
            cycles=cycles,
            steps=steps,
            seed=seed,
            trust=trust,
            portable=portable,
            note=lambda line: typer.echo(f"note: {_printable(line)}", err=True),
        )
    except cycles_module.CycleError as exc:
        typer.echo(f"error: {_printable(exc)}", err=True)
        raise typer.Exit(exc.exit_code) from None
    reports = [result]
    code = overall_exit_code(reports)
    if fmt is CycleFormat.json:
        text = report.to_json(reports, __version__, "cycle") + "\n"
    elif fmt is CycleFormat.junit:
        text = report.to_junit(reports, "cycle")
    else:
        import io

        from rich.console import Console

        buffer = io.StringIO()
        report.render_table(reports, Console(file=buffer, width=120, color_system=None))
        text = buffer.getvalue()
    if output is not None:
        try:
            _write_atomic(output, text)
        except OSError as exc:
            typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{report.summary_line(reports)} (report written to {output})")
    elif fmt is CycleFormat.table:
        from rich.console import Console

        report.render_table(reports, Console())
    else:
        sys.stdout.write(text)
    raise typer.Exit(code)


def main() -> None:
    """Entry point of the `dppo-ckpt` console script."""
    app()


if __name__ == "__main__":
    main()
