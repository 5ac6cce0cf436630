"""Rewrite older checkpoints in the current layout, code-free and losslessly.

Checkpoints of layout 1 keep the Variance Gradient Scaler pickled inside ``data``; the oldest
of them also pickled copies of the policy's parameters (``_parameters``), stale by
construction after a load, and a format-1 state (an absolute cap on the noise ratio).
:func:`migrate_file` rewrites any of them in layout 2 (:mod:`dppo_ckpt.vgs_format`): the
scaler's state dict becomes the torch-saved member ``vgs.pth``, the entry leaves ``data``, and
``dppo_ckpt.json`` records the layout. Nothing else changes:

- *code-free*: the scaler entry is decoded into inert stand-ins and written back as a torch
  archive naming only what torch's weights-only loader accepts; nothing the file names is
  imported or called, so checkpoints whose classes live in modules that no longer exist
  migrate as well. Tensor bytes are copied as they are, so the statistics are bit for bit;
- *lossless*: every other zip member is copied with its raw compressed bytes and headers, and
  ``data`` loses only the scaler entry's characters;
- *atomic*: see :mod:`.orchestrate`.

The jobs live in one module each: :mod:`.plan` (safety and what changes), :mod:`.scaler_rewrite`
(the pickle graph), :mod:`.json_splice` (the ``data`` text), :mod:`.zipcopy` (the raw zip
copy) and :mod:`.orchestrate` (files, verification, several inputs).
"""

from __future__ import annotations

from dppo_ckpt.checkpoint.migrate.errors import MigrationError, UsageError
from dppo_ckpt.checkpoint.migrate.orchestrate import (
    MigrationOutcome,
    migrate_file,
    migrate_paths,
    resolve_jobs,
)
from dppo_ckpt.checkpoint.migrate.plan import MigrationPlan, is_exempt, plan_migration
from dppo_ckpt.checkpoint.migrate.scaler_rewrite import scaler_member
from dppo_ckpt.vgs_format import LEGACY_STATE_KEYS, SCALER_ENTRY

__all__ = [
    "DROPPED_STATE_KEYS",
    "SCALER_ENTRY",
    "MigrationError",
    "MigrationOutcome",
    "MigrationPlan",
    "UsageError",
    "is_exempt",
    "migrate_file",
    "migrate_paths",
    "plan_migration",
    "resolve_jobs",
    "scaler_member",
]

#: Attributes a scaler never pickles; a layout-1 entry holding any of them is legacy.
DROPPED_STATE_KEYS = LEGACY_STATE_KEYS
