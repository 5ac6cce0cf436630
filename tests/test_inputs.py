"""Folders on the command line: the checkpoints directly inside, or all below with -r."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from dppo_ckpt.checkpoint.inputs import checkpoint_files
from dppo_ckpt.cli import app
from fixtures.make_fixtures import FIXTURES_DIR


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(FIXTURES_DIR / "dppo_quantile_vgs.zip", root / "b.zip")
    shutil.copy(FIXTURES_DIR / "broken_not_a_zip.zip", root / "a.zip")
    shutil.copy(FIXTURES_DIR / "dppo_vgs_off.zip", root / "sub" / "c.zip")
    shutil.copy(FIXTURES_DIR / "sb3_ppo.zip", root / "sub" / "deeper" / "d.zip")
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)


def test_a_folder_gives_its_zips_sorted_and_recursive_goes_below(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert checkpoint_files([tmp_path]) == [tmp_path / "a.zip", tmp_path / "b.zip"]
    assert checkpoint_files([tmp_path], recursive=True) == [
        tmp_path / "a.zip",
        tmp_path / "b.zip",
        tmp_path / "sub" / "c.zip",
        tmp_path / "sub" / "deeper" / "d.zip",
    ]


def test_verify_takes_a_folder_and_names_the_failing_files(tmp_path: Path) -> None:
    _tree(tmp_path)
    result = CliRunner().invoke(app, ["verify", "--static", str(tmp_path)])
    assert result.exit_code == 2
    out = result.stdout
    assert f"not good: {tmp_path / 'a.zip'} (exit 2)" in out
    # The unusable file gets one row, not a row per skipped check.
    table_a = out.split(str(tmp_path / "b.zip"))[0]
    assert "DPPO001" in table_a and "DPPO002" not in table_a
    assert out.rstrip().splitlines()[-1].startswith("6 passed, 1 failed")


def test_an_empty_folder_is_unusable_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["verify", "--static", str(tmp_path)])
    assert result.exit_code == 2
    assert "no checkpoint" in result.stderr
