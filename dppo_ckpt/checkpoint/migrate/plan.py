"""Work out a migration, statically: is the file safe to touch, and what changes.

Migration refuses, like ``verify``, checkpoints whose pickles name globals off the allow-list,
with one difference: since nothing is executed, the scaler's own class (and the policy and
rollout-buffer classes of this package) may be named from any module (:func:`is_exempt`).

A layout-1 checkpoint (the scaler pickled in ``data``, see :mod:`dppo_ckpt.vgs_format`)
becomes layout 2: the scaler entry leaves ``data`` (cut out of the text, every other character
kept), its state becomes the member ``vgs.pth`` (:mod:`.scaler_rewrite`) and ``dppo_ckpt.json``
records layout 2. Everything else is copied byte for byte (:mod:`.zipcopy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from dppo_ckpt.checkpoint.archive import DATA_MEMBER, SERIALIZED_KEY, CheckpointArchive
from dppo_ckpt.checkpoint.contents import checkpoint_layout
from dppo_ckpt.checkpoint.metadata import LAYOUT_VERSION, METADATA_MEMBER, encode_metadata
from dppo_ckpt.checkpoint.migrate.errors import MigrationError
from dppo_ckpt.checkpoint.migrate.json_splice import remove_entry
from dppo_ckpt.checkpoint.migrate.scaler_rewrite import SCALER_CLASS, scaler_member
from dppo_ckpt.checkpoint.migrate.zipcopy import ZipEdit
from dppo_ckpt.checkpoint.results import EXIT_UNSAFE, EXIT_UNUSABLE
from dppo_ckpt.checkpoint.safe_pickle import Finding, PickleScanError, ScanReport, scan_checkpoint
from dppo_ckpt.checkpoint.stub_pickle import StubGlobal, StubPickleError, stub_loads
from dppo_ckpt.vgs_format import SCALER_ENTRY, SCALER_MEMBER

__all__ = ["MigrationPlan", "is_exempt", "plan_migration"]

#: Classes of this package that older code kept in other modules. Migration only *names*
#: them, so they are accepted from any module in these entries (see :func:`is_exempt`).
_NAMED_CLASSES: Final = {
    SCALER_ENTRY: SCALER_CLASS,
    "policy_class": "CustomActorCriticPolicy",
    "rollout_buffer_class": "DistributionalRolloutBuffer",
}
#: SB3 writes the torch-saved parameters in the order it declares them; vgs.pth follows
#: the optimizer's.
_SCALER_MEMBER_AFTER: Final = "policy.optimizer.pth"


def is_exempt(finding: Finding) -> bool:
    """Whether a refused global is accepted by migration although it is off the allow-list.

    Migration never imports or calls what a pickle names, so a class of this package that is
    merely *named* is harmless even from a module that does not exist here: the scaler's class
    in the scaler entry, the policy class in ``policy_class`` and the rollout buffer class in
    ``rollout_buffer_class``, at the top level of those pickles (not inside tensor blobs).
    Everything else follows the allow-list.
    """
    expected = _NAMED_CLASSES.get(finding.entry or "")
    if expected is None or finding.member != DATA_MEMBER or finding.path:
        return False
    module, _, qualname = finding.global_name.rpartition(".")
    return bool(module) and qualname == expected and finding.verdict.value == "not allowed"


def _refusal(scan: ScanReport) -> Finding | None:
    return next((f for f in scan.refused if not is_exempt(f)), None)


def _describe_finding(finding: Finding) -> str:
    where = f"member {finding.member!r}" + (f", entry {finding.entry!r}" if finding.entry else "")
    inside = f" ({' > '.join(finding.path)})" if finding.path else ""
    return f"unsafe pickle in {where}{inside}: {finding.global_name} is {finding.verdict.value}"


def _check_named_only(archive: CheckpointArchive, scan: ScanReport) -> None:
    """An exempt class in ``policy_class``/``rollout_buffer_class`` must be the whole pickle."""
    for finding in scan.refused:
        if finding.entry == SCALER_ENTRY or finding.entry not in _NAMED_CLASSES:
            continue
        # As the scan decoded it (cached): nothing is decoded again.
        payload = archive.serialized_entries()[finding.entry]
        try:
            root = stub_loads(payload)
        except (StubPickleError, RecursionError) as exc:
            raise MigrationError(f"entry {finding.entry!r}: {exc}", EXIT_UNUSABLE) from None
        if not isinstance(root, StubGlobal):
            raise MigrationError(_describe_finding(finding) + " (and is not a bare class)", 3)


@dataclass
class MigrationPlan:
    """What migrating one checkpoint changes, worked out without writing anything.

    :param current: the file needs no change.
    :param edit: the members replaced, dropped and added (``None`` when current).
    :param facts: layout before and after, scaler class, removed state keys, sizes.
    :param foreign: globals accepted although off the allow-list (see :func:`is_exempt`).
    """

    current: bool
    edit: ZipEdit | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)


def _metadata_bytes(archive: CheckpointArchive) -> tuple[dict[str, bytes], list[tuple[str, bytes]]]:
    """``dppo_ckpt.json`` recording layout 2: a replacement, or a new member when the file
    (older than this package's 0.2) has none."""
    metadata = archive.metadata
    if metadata is None:
        return {}, [(METADATA_MEMBER, encode_metadata({}, layout=LAYOUT_VERSION))]
    document = encode_metadata(
        metadata["numerics"], env=metadata.get("env"), run=metadata.get("run"),
        layout=LAYOUT_VERSION,
    )  # fmt: skip
    return {METADATA_MEMBER: document}, []


def plan_migration(archive: CheckpointArchive) -> MigrationPlan:
    """Work out the migration of an open checkpoint (static: no torch, nothing executed).

    :raises MigrationError: unsafe (3), or unusable (2) input.
    :raises ArchiveError: the zip or ``data`` is unusable, or its layout is unknown here.
    """
    # A layout-1 scaler is taken from `data`'s bytes, decoded, without its base64 text.
    outline = archive.detach_payload(SCALER_ENTRY)
    try:
        scan = scan_checkpoint(archive)
    except PickleScanError as exc:
        raise MigrationError(str(exc), EXIT_UNUSABLE) from None
    refused = _refusal(scan)
    if refused is not None:
        raise MigrationError(_describe_finding(refused), EXIT_UNSAFE)
    _check_named_only(archive, scan)
    foreign = sorted({f.global_name for f in scan.refused})
    layout = checkpoint_layout(archive)
    if layout >= LAYOUT_VERSION:
        facts = {"reason": f"layout {layout}", "layout_before": layout, "layout_after": layout}
        return MigrationPlan(True, facts=facts, foreign=foreign)
    data = archive.data
    if SCALER_ENTRY not in data:
        # Not a DistributionalPPO checkpoint (plain SB3): there is nothing of ours to move.
        return MigrationPlan(True, facts={"reason": "no scaler entry"}, foreign=foreign)
    entry = data[SCALER_ENTRY]
    facts: dict[str, Any] = {"layout_before": layout, "layout_after": LAYOUT_VERSION}
    added: list[tuple[str, bytes | memoryview]] = []
    if entry is not None:
        encoded = entry.get(SERIALIZED_KEY) if isinstance(entry, dict) else None
        if not isinstance(encoded, str):
            raise MigrationError(f"entry {SCALER_ENTRY!r} holds no pickle", EXIT_UNUSABLE)
        # Decoded by the scan already (and valid base64).
        payload = archive.serialized_entries()[SCALER_ENTRY]
        member = scaler_member(payload)
        facts.update(member.facts)
        added.append((SCALER_MEMBER, member.pth))
        del member, payload, encoded
    else:
        facts["reason"] = "the scaler is off"
    # What `data` must still say without the entry; then the archive's parsed copy (whose
    # scaler string is the bulk of the file, unless it was left out) and decoded payloads are
    # let go before the text is edited.
    expected = {key: value for key, value in data.items() if key != SCALER_ENTRY}
    del data, entry
    archive.drop_caches()
    if outline is not None:
        # The text without the payload: cutting the entry cuts its placeholder too.
        text, placeholder = outline.text, outline.placeholder
        del outline
    else:
        text, placeholder = archive.read_member(DATA_MEMBER).decode("utf-8"), None
    try:
        new_data = remove_entry(text, SCALER_ENTRY, expected)
    except ValueError as exc:
        raise MigrationError(f"cannot edit 'data': {exc}", EXIT_UNUSABLE) from None
    del text
    if placeholder is not None and placeholder.encode() in new_data:
        raise MigrationError("cannot edit 'data': the scaler entry was not cut", EXIT_UNUSABLE)
    replace, new_members = _metadata_bytes(archive)
    replace[DATA_MEMBER] = new_data
    facts["data_bytes_before"] = archive.member(DATA_MEMBER).uncompressed_size
    facts["data_bytes_after"] = len(new_data)
    edit = ZipEdit(replace=replace, add=added + new_members, add_after=_SCALER_MEMBER_AFTER)
    return MigrationPlan(False, edit=edit, facts=facts, foreign=foreign)
