"""Which files a command line names: files as given, folders as the checkpoints inside."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["checkpoint_files"]


def checkpoint_files(
    paths: Iterable[str | os.PathLike[str]], *, recursive: bool = False
) -> list[Path]:
    """Every input, with each folder replaced by the ``*.zip`` regular files inside it.

    Files are kept as given, in order, whatever their name (a missing one is reported by the
    command that opens it). A folder contributes its ``*.zip`` files sorted by name, those of
    its subfolders too with ``recursive``; symbolic links to folders are not followed, so a
    link cycle cannot make the walk endless.
    """
    found: list[Path] = []
    for item in map(Path, paths):
        if not item.is_dir():
            found.append(item)
            continue
        if recursive:
            for folder, subfolders, names in os.walk(item):
                subfolders.sort()
                found += [
                    Path(folder) / name
                    for name in sorted(names)
                    if name.endswith(".zip") and (Path(folder) / name).is_file()
                ]
        else:
            found += sorted(p for p in item.iterdir() if p.suffix == ".zip" and p.is_file())
    return found
