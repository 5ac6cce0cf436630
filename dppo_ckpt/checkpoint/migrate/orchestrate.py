"""Carry out migrations: the command line's jobs, one file at a time, atomically.

For each file the plan is worked out statically (:mod:`.plan`), the result is written to a
temporary file in the destination folder (:mod:`.zipcopy`), synced, verified (the static
checks always, the load checks when the classes import, in a child process) and renamed
over the destination; a crash at any moment leaves the destination either absent (or as it
was) or complete. ``--in-place`` first makes an atomic backup (a hard link). A later run
removes the temporaries an interrupted one left, and says so.
"""

from __future__ import annotations

import binascii
import contextlib
import glob
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from dppo_ckpt.atomic import fsync_directory
from dppo_ckpt.checkpoint.archive import ArchiveError, CheckpointError, open_checkpoint
from dppo_ckpt.checkpoint.contents import checkpoint_layout
from dppo_ckpt.checkpoint.inputs import checkpoint_files
from dppo_ckpt.checkpoint.metadata import LAYOUT_VERSION
from dppo_ckpt.checkpoint.migrate.errors import MigrationError, UsageError
from dppo_ckpt.checkpoint.migrate.plan import plan_migration
from dppo_ckpt.checkpoint.migrate.zipcopy import copy_range, write_zip
from dppo_ckpt.checkpoint.results import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_UNSAFE,
    EXIT_UNUSABLE,
    FileReport,
    Verdict,
    overall_exit_code,
)

__all__ = ["MigrationOutcome", "migrate_file", "migrate_paths", "resolve_jobs"]

_CHUNK: Final = 1 << 20
_TMP_SUFFIX: Final = ".migrate-tmp"


@contextlib.contextmanager
def _temporary(folder: Path, name: str, mode: int) -> Iterator[tuple[IO[bytes], Path]]:
    """A new file in ``folder``, removed again unless the caller renamed it away."""
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as handle:
            with contextlib.suppress(OSError):
                os.fchmod(handle.fileno(), mode)
            yield handle, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# Temporaries older than this are no longer being written by a running migrate.
_STALE_AFTER_S: Final = 600.0


def _remove_stale_temporaries(folder: Path, name: str) -> int:
    """Remove temporaries that an interrupted run left for ``name`` in ``folder``.

    Only files named as :func:`_temporary` names them (``.NAME.<random>.migrate-tmp``),
    regular, and untouched for :data:`_STALE_AFTER_S`; anything else is left alone.
    """
    removed = 0
    now = time.time()
    for candidate in folder.glob(f".{glob.escape(name)}.*{_TMP_SUFFIX}"):
        try:
            info = candidate.lstat()
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime > _STALE_AFTER_S:
                candidate.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _publish(tmp: Path, dst: Path, *, force: bool) -> None:
    """Move ``tmp`` to ``dst`` atomically; without ``force`` never replace an existing file."""
    if force:
        os.replace(tmp, dst)
    else:
        try:
            os.link(tmp, dst)  # fails if dst exists: no window in which it could be clobbered
        except FileExistsError:
            raise MigrationError(f"{dst} exists; pass --force to replace it", 2) from None
        except OSError:
            if dst.exists():
                raise MigrationError(f"{dst} exists; pass --force to replace it", 2) from None
            os.replace(tmp, dst)
        else:
            tmp.unlink()
    fsync_directory(dst.parent)


class _BackgroundCopy:
    """``src`` copied unchanged into a new temporary beside ``dst``, and synced, in a thread.

    For a file that is already current the copy is the whole migration: started before the
    plan is worked out, the kernel's copy and sync overlap the plan's reading of the file
    (both wait in the kernel, not on this interpreter). The temporary is removed on
    :meth:`close` unless it was renamed away.
    """

    def __init__(self, src: Path, dst: Path) -> None:
        mode = stat.S_IMODE(src.stat().st_mode)
        self._stack = contextlib.ExitStack()
        self._handle, self.tmp = self._stack.enter_context(_temporary(dst.parent, dst.name, mode))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy, args=(src,), daemon=True)
        try:
            self._thread.start()
        except BaseException:
            self._stack.close()
            raise

    def _copy(self, src: Path) -> None:
        try:
            with open(src, "rb") as original:
                # In the kernel where it can, as cp does: the bytes never pass through here.
                copy_range(original, self._handle, 0, os.fstat(original.fileno()).st_size)
            _sync(self._handle)
        except BaseException as exc:  # noqa: BLE001 - raised again by wait()
            self._error = exc

    def wait(self) -> Path:
        """The synced temporary, once the copy is done.

        :raises OSError: the copy or the sync failed.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.tmp

    def close(self) -> None:
        try:
            self._thread.join()
        finally:
            self._stack.close()


def _likely_current(archive: Any) -> bool:
    """Whether the file records the current layout: then the plan will most likely find
    nothing to change. A wrong guess only costs a copy that is thrown away."""
    try:
        return checkpoint_layout(archive) >= LAYOUT_VERSION
    except Exception:  # the plan reports what is wrong with the file
        return False


def _make_backup(src: Path, backup: Path) -> None:
    """Create ``backup`` as a complete copy of ``src`` in one atomic step, never replacing."""
    try:
        os.link(src, backup)
    except FileExistsError:
        raise MigrationError(
            f"backup {backup} exists; remove it or choose --backup-suffix", 2
        ) from None
    except OSError:
        with _temporary(backup.parent, backup.name, stat.S_IMODE(src.stat().st_mode)) as (
            handle,
            tmp,
        ):
            with open(src, "rb") as original:
                shutil.copyfileobj(original, handle, _CHUNK)
            _sync(handle)
            _publish(tmp, backup, force=False)
    fsync_directory(backup.parent)


def _verify(path: Path, *, static: bool, foreign: Sequence[str]) -> FileReport:
    """Run the verify checks on the result: static always, load checks when the classes
    import (no class of the file is named from a foreign module) and ``static`` is off."""
    from dppo_ckpt.checkpoint.checks import run_checks

    static = static or bool(foreign)
    if static:
        report = run_checks(path, static=True)
    else:
        from dppo_ckpt.checkpoint.budgets import DEFAULT_BUDGETS
        from dppo_ckpt.checkpoint.isolation import crash_report, run_isolated

        # The load checks of the result run in a child: a crash fails this file only.
        timeout = DEFAULT_BUDGETS.timeout
        outcome = run_isolated(run_checks, os.fspath(path), timeout=timeout + 5)
        report = outcome.value if outcome.ok else crash_report(os.fspath(path), outcome, timeout)
    problems = []
    for result in report.results:
        if result.verdict not in (Verdict.FAIL, Verdict.ERROR):
            continue
        refused = result.details.get("refused")
        if (
            result.check_id == "DPPO004"
            and refused
            and all(item.get("global") in foreign for item in refused)
        ):
            continue  # the same named classes the input was accepted with
        problems.append(f"{result.check_id} {result.title}: {result.message}")
    if problems:
        raise MigrationError("the result does not verify: " + "; ".join(problems))
    return report


# ---------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------


@dataclass
class MigrationOutcome:
    """What happened to one checkpoint.

    :param source: the input as given.
    :param destination: where the result went (or would go).
    :param status: ``migrated``, ``already current``, ``would migrate``, ``failed``,
        ``unusable`` or ``refused``.
    :param message: one line.
    :param exit_code: 0, 1, 2 or 3, as for ``verify``.
    :param facts: what changed (or would): removed keys, sizes, scaler class.
    :param backup: the backup made by ``--in-place``.
    :param checks: the verify report of the result, when checks ran.
    """

    source: str
    destination: str | None
    status: str
    message: str
    exit_code: int
    facts: dict[str, Any] = field(default_factory=dict)
    backup: str | None = None
    checks: FileReport | None = None

    def to_dict(self) -> dict[str, Any]:
        checks = None
        if self.checks is not None:
            checks = {
                "exit_code": self.checks.exit_code,
                "results": {r.check_id: r.verdict.value for r in self.checks.results},
            }
        return {
            "source": self.source,
            "destination": self.destination,
            "status": self.status,
            "message": self.message,
            "exit_code": self.exit_code,
            "facts": self.facts,
            "backup": self.backup,
            "checks": checks,
        }


def _summary(facts: dict[str, Any], verb: str = "removed") -> str:
    removed = facts.get("removed_state_keys") or []
    parts = []
    before_layout, after_layout = facts.get("layout_before"), facts.get("layout_after")
    if before_layout is not None and before_layout != after_layout:
        moved = "rewrote" if verb == "removed" else "rewrite"
        where = " (the scaler state as vgs.pth)" if facts.get("scaler_member_bytes") else ""
        parts.append(f"{moved} layout {before_layout} as layout {after_layout}{where}")
    if removed:
        part = f"{verb} {', '.join(removed)} from the scaler state"
        if facts.get("pickled_parameters"):
            part += f" ({facts['pickled_parameters']} stale parameter copies)"
        parts.append(part)
    before_version, after_version = (
        facts.get("state_version_before"),
        facts.get("state_version_after"),
    )
    if before_version is not None and before_version != after_version:
        upgrade = "upgraded" if verb == "removed" else "upgrade"
        parts.append(f"{upgrade} the scaler state from format {before_version} to {after_version}")
    text = "; ".join(parts) or "nothing to change in the scaler state"
    before, after = facts.get("data_bytes_before"), facts.get("data_bytes_after")
    if before is not None and after is not None:
        text += f"; data {before} -> {after} bytes"
    return text


def migrate_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str] | None = None,
    *,
    in_place: bool = False,
    backup_suffix: str = ".bak",
    dry_run: bool = False,
    force: bool = False,
    static: bool = False,
) -> MigrationOutcome:
    """Migrate one checkpoint; never raises for anything about the file.

    :param source: the legacy checkpoint.
    :param destination: where to write the result (not with ``in_place``).
    :param in_place: rewrite ``source`` itself, keeping ``source + backup_suffix``.
    :param backup_suffix: suffix of the backup made by ``in_place``.
    :param dry_run: work out and report the changes, write nothing.
    :param force: replace an existing ``destination``.
    :param static: verify the result with the static checks only (no torch import).
    """
    src = Path(source)
    dst = src if in_place else Path(destination) if destination is not None else None
    label = os.fspath(source)
    where = None if dst is None else os.fspath(dst)
    backup = Path(f"{src}{backup_suffix}") if in_place else None

    tidied: list[int] = []

    def outcome(status: str, message: str, code: int, **extra: Any) -> MigrationOutcome:
        if tidied and tidied[0]:
            message += f"; removed {tidied[0]} stale temporary file(s) of an interrupted run"
        return MigrationOutcome(label, where, status, message, code, **extra)

    try:
        if dst is None:
            raise UsageError("no destination: give NEW.zip, --out-dir or --in-place")
        if in_place and not backup_suffix:
            raise UsageError("--backup-suffix must not be empty")
        if not in_place and dst.is_dir():
            raise UsageError(f"{dst} is a folder; use --out-dir to write into it")
        if not in_place and dst.exists() and not force:
            raise MigrationError(f"{dst} exists; pass --force to replace it", EXIT_UNUSABLE)
        if not in_place and dst.exists() and dst.resolve() == src.resolve():
            raise UsageError("NEW is the same file as OLD; use --in-place")
        if not dst.parent.is_dir():
            raise UsageError(f"destination folder {dst.parent} does not exist")
        with contextlib.ExitStack() as copies:
            with open_checkpoint(src) as archive:
                copy = None
                if not (dry_run or in_place) and _likely_current(archive):
                    copy = copies.enter_context(contextlib.closing(_BackgroundCopy(src, dst)))
                plan = plan_migration(archive)
            del archive  # it caches the parsed `data`, which can be large
            if not dry_run:
                tidied.append(_remove_stale_temporaries(dst.parent, dst.name))
            facts = dict(plan.facts)
            if plan.foreign:
                facts["named_off_allow_list"] = plan.foreign
            if plan.current:
                if dry_run or in_place:
                    return outcome("already current", "already current: nothing to change", 0,
                                   facts=facts)  # fmt: skip
                if copy is None:
                    copy = copies.enter_context(contextlib.closing(_BackgroundCopy(src, dst)))
                _publish(copy.wait(), dst, force=force)
                return outcome("already current", "already current: copied unchanged", 0,
                               facts=facts)  # fmt: skip
        if backup is not None and (backup.exists() or backup.is_symlink()):
            raise MigrationError(
                f"backup {backup} exists; remove it or choose --backup-suffix", EXIT_UNUSABLE
            )
        if dry_run:
            return outcome("would migrate", "would " + _summary(facts, "remove"), 0, facts=facts,
                           backup=None if backup is None else os.fspath(backup))  # fmt: skip
        assert plan.edit is not None
        mode = stat.S_IMODE(src.stat().st_mode)
        with _temporary(dst.parent, dst.name, mode) as (handle, tmp):
            write_zip(src, handle, plan.edit)
            plan.edit = None  # written; the checks below read the file afresh
            _sync(handle)
            report = _verify(tmp, static=static, foreign=plan.foreign)
            if backup is not None:
                _make_backup(src, backup)
            _publish(tmp, dst, force=force or in_place)
        return outcome("migrated", _summary(facts), EXIT_OK, facts=facts, checks=report,
                       backup=None if backup is None else os.fspath(backup))  # fmt: skip
    except MigrationError as exc:
        status = {EXIT_UNUSABLE: "unusable", EXIT_UNSAFE: "refused"}.get(exc.exit_code, "failed")
        return outcome(status, exc.reason, exc.exit_code)
    except ArchiveError as exc:
        return outcome("unusable", str(exc), EXIT_UNUSABLE)
    except CheckpointError as exc:
        return outcome("unusable", exc.reason, EXIT_UNUSABLE)
    except OSError as exc:
        # A folder that cannot be written, a full disk: the input could not be used as asked.
        where_ = f" {exc.filename}" if exc.filename else ""
        return outcome("unusable", f"cannot write{where_}: {exc.strerror or exc}", EXIT_UNUSABLE)
    except (UnicodeDecodeError, binascii.Error) as exc:
        return outcome("failed", f"{type(exc).__name__}: {exc}", EXIT_CHECK_FAILED)
    except Exception as exc:  # a hostile file must give an exit code, never a traceback
        return outcome("failed", f"unexpected {type(exc).__name__}: {exc}", EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------
# Several files
# ---------------------------------------------------------------------------------------------


def resolve_jobs(
    paths: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    recursive: bool = False,
) -> list[tuple[Path, Path | None]]:
    """Turn the command line into ``(source, destination)`` pairs.

    ``OLD NEW``; or inputs (files, or folders whose ``*.zip`` files are taken, those of
    subfolders too with ``recursive``) with ``out_dir`` (same file names) or ``in_place``
    (destination ``None``).

    :raises UsageError: any other combination, or two inputs that would land on one output.
    """
    if out_dir is not None and in_place:
        raise UsageError("--out-dir and --in-place exclude each other")
    if not paths:
        raise UsageError("no input given")
    if out_dir is None and not in_place:
        if len(paths) != 2:
            raise UsageError("give OLD.zip NEW.zip, or several inputs with --out-dir/--in-place")
        old, new = Path(paths[0]), Path(paths[1])
        if old.is_dir() or new.is_dir():
            raise UsageError("folders need --out-dir or --in-place")
        return [(old, new)]
    sources = checkpoint_files(paths, recursive=recursive)
    if in_place:
        return [(source, None) for source in sources]
    assert out_dir is not None
    target = Path(out_dir)
    if not target.is_dir():
        raise UsageError(f"--out-dir {target} is not a folder")
    jobs = [(source, target / source.name) for source in sources]
    seen: dict[Path, Path] = {}
    for source, dst in jobs:
        if dst in seen:
            raise UsageError(f"{seen[dst]} and {source} would both be written to {dst}")
        seen[dst] = source
    return jobs


def migrate_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    backup_suffix: str = ".bak",
    dry_run: bool = False,
    force: bool = False,
    static: bool = False,
    recursive: bool = False,
) -> tuple[list[MigrationOutcome], int]:
    """Migrate every input named on the command line; return the outcomes and the exit code
    (the worst of them: 3 > 2 > 1 > 0)."""
    try:
        jobs = resolve_jobs(paths, out_dir=out_dir, in_place=in_place, recursive=recursive)
    except UsageError as exc:
        bad = MigrationOutcome(", ".join(map(os.fspath, paths)), None, "unusable", exc.reason, 2)
        return [bad], EXIT_UNUSABLE
    outcomes = [
        migrate_file(
            source,
            dst,
            in_place=in_place,
            backup_suffix=backup_suffix,
            dry_run=dry_run,
            force=force,
            static=static,
        )
        for source, dst in jobs
    ]
    code = overall_exit_code(FileReport(o.source, [], o.exit_code) for o in outcomes)
    return outcomes, code
