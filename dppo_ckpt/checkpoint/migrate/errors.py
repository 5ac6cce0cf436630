"""Why a migration did not happen, with the exit code that says so."""

from __future__ import annotations

from dppo_ckpt.checkpoint.archive import CheckpointError
from dppo_ckpt.checkpoint.results import EXIT_CHECK_FAILED, EXIT_UNUSABLE

__all__ = ["MigrationError", "UsageError"]


class MigrationError(CheckpointError):
    """The migration could not be carried out (exit code ``exit_code``).

    :param reason: one line.
    :param exit_code: 1 (the result failed verification or could not be written), 2 (unusable
        input or arguments), 3 (refused as unsafe).
    """

    def __init__(self, reason: str, exit_code: int = EXIT_CHECK_FAILED) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class UsageError(MigrationError):
    """The command line does not describe a migration (exit code 2)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, EXIT_UNUSABLE)
