"""Every command's ``--help`` at 80 columns: one default style, no ``<bool>``, nothing cut."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
import typer

from dppo_ckpt import run_plan
from dppo_ckpt.cli import app

_COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
_ROW_START = re.compile(r"^│ (--[\w-]+)")


def _help(*command: str) -> str:
    # A real process: the terminal width comes from COLUMNS, as in a shell.
    result = subprocess.run(
        [sys.executable, "-m", "dppo_ckpt.cli", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _option_rows(text: str) -> dict[str, str]:
    """Each option's row of the options panel, its lines joined into one line of text."""
    rows: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _ROW_START.match(line)
        if match:
            current = rows.setdefault(match.group(1), [])
        elif not line.startswith("│  "):
            current = None
        if current is not None:
            current.append(line.strip("│ "))
    return {name: " ".join(" ".join(lines).split()) for name, lines in rows.items()}


def _has_default(param: typer.core.TyperOption) -> bool:
    """Whether ``param`` has a default worth showing: a value, a described default, or the
    side of an on/off pair; a plain flag that is off unless given needs none."""
    if isinstance(param.show_default, str):
        return True
    if param.default is None or param.show_default is False:
        return False
    return not (param.is_flag and not param.secondary_opts and not param.default)


@pytest.mark.parametrize("command", ["", *_COMMANDS])
def test_help_fits_80_columns_with_one_default_style(command):
    args = [command] if command else []
    text = _help(*args)
    assert "Traceback" not in text
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long
    assert "(default" not in text
    assert "<bool>" not in text
    assert "…" not in text, "a cut word"
    click_command = typer.main.get_command(app)
    if command:
        click_command = click_command.commands[command]  # type: ignore[attr-defined]
    rows = _option_rows(text)
    options = [p for p in click_command.params if isinstance(p, typer.core.TyperOption)]
    assert "--help" in rows and all(p.opts[0] in rows for p in options), sorted(rows)
    for param in options:
        row = rows[param.opts[0]]
        if _has_default(param):
            assert "[default: " in row, row
        else:
            assert "[default" not in row, row
    for row in rows.values():
        assert "[default: (" not in row, row  # a described default reads like a value


def test_train_help_shows_the_real_defaults():
    from dppo_ckpt.ppo import DistributionalPPO

    rows = _option_rows(_help("train"))
    parameters = inspect.signature(DistributionalPPO.__init__).parameters
    expected = {
        "--critic": parameters["critic"].default,
        "--vgs-alpha": parameters["vgs_alpha"].default,
        "--vgs-warmup-steps": parameters["vgs_warmup_steps"].default,
        "--vgs": "vgs" if parameters["variance_gradient_scaling"].default else "no-vgs",
        "--timesteps": run_plan.DEFAULT_TIMESTEPS,
        "--checkpoint-every": run_plan.DEFAULT_CHECKPOINT_EVERY,
        "--eval-episodes": run_plan.DEFAULT_EVAL_EPISODES,
        "--env": run_plan.DEFAULT_ENV_ID,
        "--seed": 0,
    }
    for option, value in expected.items():
        assert f"[default: {value}]" in rows[option], rows[option]
    # Markup characters in help texts are shown, not swallowed.
    assert "config's [normalize])" in rows["--normalize"]
    assert "[tool.dppo-ckpt] allow" in rows["--allow"]
