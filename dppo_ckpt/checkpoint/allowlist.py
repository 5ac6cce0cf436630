"""The user's own allow-list entries: exact ``module.Name`` pairs, never a deny-list.

Projects pickle classes of their own (rl-zoo3's ``SimpleLinearSchedule``, a custom feature
extractor). ``--allow module.Name`` (repeatable) and an ``allow = [...]`` list in the
``[tool.dppo-ckpt]`` table of the nearest ``pyproject.toml`` add them. An entry admits that
one pair and nothing else: no prefixes, no module wildcards. A user entry is allowed as a
value and may be created empty and then get a checked ``BUILD`` (the way plain classes
pickle); it is never called with arguments. Names that run or reach code are refused as
entries, whoever asks.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "AllowListError",
    "UserAllowList",
    "UserEntry",
    "entry_problem",
    "find_pyproject",
    "user_allow_list",
]

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")

#: Modules whose every name runs code, reaches the file system or the process, or imports.
_CODE_MODULES: Final = frozenset(
    {
        "builtins", "__builtin__", "os", "posix", "nt", "subprocess", "importlib", "pkgutil",
        "runpy", "sys", "shutil", "io", "_io", "pickle", "_pickle", "marshal", "types",
        "ctypes", "code", "codeop", "pty", "socket", "cloudpickle", "dill", "functools",
        "operator", "inspect", "threading", "multiprocessing", "signal", "webbrowser",
        "tempfile", "pathlib", "glob", "copyreg", "_codecs", "codecs", "torch.storage",
        "numpy.lib.format", "numpy.testing", "torch.hub", "torch.serialization",
    }
)  # fmt: skip


class AllowListError(ValueError):
    """An entry of the user's allow-list cannot be accepted (exit code 2)."""


@dataclass(frozen=True)
class UserAllowList:
    """The extra pairs one run admits, and where they came from.

    :param pairs: the ``(module, name)`` pairs.
    :param source: the ``pyproject.toml`` they were read from (``None`` when only ``--allow``
        gave them).
    """

    pairs: frozenset[tuple[str, str]] = frozenset()
    source: str | None = None

    @property
    def names(self) -> list[str]:
        """The entries as ``module.Name``, sorted (for reports)."""
        return sorted(f"{m}.{n}" for m, n in self.pairs)

    def merged(self, base: Mapping[tuple[str, str], str]) -> Mapping[tuple[str, str], str]:
        """``base`` with these pairs added, each justified by where it came from."""
        why = UserEntry(f"allowed by the user ({self.source or '--allow'})")
        return MappingProxyType({**base, **{pair: why for pair in self.pairs}})


def _parse(entry: Any, where: str) -> tuple[str, str]:
    if not isinstance(entry, str) or not _NAME.fullmatch(entry):
        raise AllowListError(
            f"{where}: allow entry {str(entry)[:80]!r} is not an exact module.Name pair"
        )
    module, _, name = entry.rpartition(".")
    top = module.split(".")[0]
    if module in _CODE_MODULES or top in _CODE_MODULES:
        raise AllowListError(
            f"{where}: allow entry {entry!r} names a module whose objects run or reach code; "
            "it cannot be allowed (use --trust for a file you trust)"
        )
    # No module is imported here: reading the list must not run the code it names.
    dunder = any(part.startswith("__") for part in entry.split("."))
    if dunder or name in {"eval", "exec", "getattr", "setattr"}:
        raise AllowListError(f"{where}: allow entry {entry!r} names a code-running callable")
    return module, name


class UserEntry(str):
    """Why a pair is allowed, when the user's list admitted it.

    The loader tells user entries apart by this type: it requires them to resolve to a class
    (:func:`entry_problem`), which only an import can tell, so it is checked where the file is
    loaded, in the load check's child, and only for a pair the file names.
    """


def entry_problem(target: Any) -> str | None:
    """Why a user entry that resolved to ``target`` cannot be allowed, or None for a class of a
    module that is not code.

    An allowed value reaches SB3 as it is, and SB3 calls schedules and classes it finds in
    ``data``: an allowed function (``time.sleep``, or ``sys.exit`` re-exported by a module of
    the user's) would be called with the file's arguments.
    """
    if not isinstance(target, type):
        kind = "module" if isinstance(target, types.ModuleType) else type(target).__name__
        return f"the allow entry is a {kind}, not a class; only classes can be allowed"
    defined_in = str(getattr(target, "__module__", ""))
    if defined_in in _CODE_MODULES or defined_in.split(".")[0] in _CODE_MODULES:
        return (
            f"the allow entry is {defined_in}.{target.__qualname__}, from a module whose "
            "objects run or reach code"
        )
    return None


def find_pyproject(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` from ``start`` (the current directory) upward."""
    folder = Path(start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        path = candidate / "pyproject.toml"
        if path.is_file():
            return path
    return None


def _from_pyproject(path: Path) -> list[Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AllowListError(f"{path}: cannot read: {exc}") from None
    table = document.get("tool", {}).get("dppo-ckpt", {})
    entries = table.get("allow", []) if isinstance(table, dict) else []
    if not isinstance(entries, list):
        raise AllowListError(f"{path}: [tool.dppo-ckpt] allow must be a list of module.Name")
    return entries


def user_allow_list(
    flags: Iterable[str] = (), *, start: str | os.PathLike[str] | None = None
) -> UserAllowList:
    """The run's extra allow entries: ``--allow`` flags plus the nearest pyproject's list.

    :raises AllowListError: an entry is malformed or names code.
    """
    pairs = {_parse(flag, "--allow") for flag in flags}
    source = None
    pyproject = find_pyproject(start)
    if pyproject is not None:
        entries = _from_pyproject(pyproject)
        if entries:
            source = str(pyproject)
            pairs |= {_parse(entry, f"{pyproject} [tool.dppo-ckpt] allow") for entry in entries}
    return UserAllowList(frozenset(pairs), source)
