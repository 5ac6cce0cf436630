"""The `dppo-ckpt` command line: thin Typer commands that call library functions."""

from __future__ import annotations

from typing import Annotated

import typer

from dppo_ckpt import __version__

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


def main() -> None:
    """Entry point of the `dppo-ckpt` console script."""
    app()


if __name__ == "__main__":
    main()
