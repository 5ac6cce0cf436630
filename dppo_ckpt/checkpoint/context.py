"""What the verify checks of one file share: the open archive, the scan, the loaded model.

Every check of :data:`~dppo_ckpt.checkpoint.registry.VERIFY` takes one :class:`CheckContext`.
The runner (:func:`~dppo_ckpt.checkpoint.checks.run_checks`) makes one per file; the earlier
checks fill it in (DPPO001 opens the archive and scans it, DPPO007 loads the model) for the
later ones. :func:`~dppo_ckpt.checkpoint.checks.model_checks` makes one around a model that
is already loaded, with the scaler state to compare it with.

This module imports nothing heavy (no torch), as the static checks must not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dppo_ckpt.checkpoint.allowlist import UserAllowList
from dppo_ckpt.checkpoint.budgets import DEFAULT_BUDGETS, Budgets
from dppo_ckpt.checkpoint.safe_pickle import ALLOWED_GLOBALS

if TYPE_CHECKING:
    from dppo_ckpt.checkpoint.archive import CheckpointArchive
    from dppo_ckpt.checkpoint.safe_pickle import ScanReport

__all__ = ["CheckContext"]


@dataclass
class CheckContext:
    """The inputs of one verification and what its checks found so far.

    :param path: the checkpoint as the user named it
    :param static: only the static checks run (no torch)
    :param trust: globals off the allow-list are accepted
    :param quick: the save/load round trip (DPPO012) is skipped
    :param env: the environment handed to the loader
    :param stored_scaler: for a model checked in memory: the scaler's ``state_dict()`` as
        its checkpoint stores it (with an archive, DPPO010 reads it from the file instead)
    """

    path: str = "<memory>"
    static: bool = False
    trust: bool = False
    quick: bool = False
    env: Any = None
    budgets: Budgets = DEFAULT_BUDGETS
    user_allow: UserAllowList = field(default_factory=UserAllowList)
    archive: CheckpointArchive | None = None
    unusable: str | None = None
    scan: ScanReport | None = None
    missing: tuple[str, ...] = ()
    refused: bool = False
    algorithm: str | None = None
    model: Any = None
    load_blocker: str | None = None
    load_warnings: list[str] = field(default_factory=list)
    stored_scaler: dict[str, Any] | None = None

    @property
    def allow(self) -> Mapping[tuple[str, str], str]:
        """The built-in allow-list with the user's entries."""
        return self.user_allow.merged(ALLOWED_GLOBALS)
