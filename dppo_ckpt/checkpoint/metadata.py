"""The checkpoint's own plain-JSON member, ``dppo_ckpt.json``: what this package records.

SB3 owns every other member of a checkpoint. What this package adds about a checkpoint lives
in this one member, never pickled, so that reading it runs nothing and needs no torch: the
numerics fingerprint of :mod:`dppo_ckpt.numerics` always, and for checkpoints that ``train``
wrote, the environment spec (:mod:`dppo_ckpt.envs`) and the run's targets::

    {"format": 1, "layout": 2, "requires": "dppo-ckpt>=0.3",
     "numerics": {"numerics": "portable", "torch": "2.13.0+cpu", ...},
     "env": {"env_id": "CartPole-v1", "n_envs": 4, ...},
     "run": {"timesteps": 100000, "checkpoint_every": 10000, "seed": 0}}

``env`` and ``run`` are optional, so a checkpoint saved without them (by
``DistributionalPPO.save``) has the same bytes as before they existed.

``layout`` is the checkpoint layout: where this package's state sits in the zip. Layout 1 (no
``layout`` key, or no member at all) kept the scaler pickled inside ``data``; layout 2 keeps
it as the torch-saved parameter ``vgs.pth`` and ``data`` holds only configuration. It is not
the scaler's own state format (:mod:`dppo_ckpt.vgs_format`). ``requires`` names the release
that reads the layout, so that a reader that does not know it can say which one to install
(:func:`check_layout`).

A checkpoint without the member (plain SB3, files older than this package's 0.2) is valid;
:func:`parse_metadata` accepts only the shape written here, within small limits, so a hostile
member cannot cost more than reading a few kilobytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "LAYOUT_REQUIRES",
    "LAYOUT_VERSION",
    "LayoutError",
    "METADATA_FORMAT_VERSION",
    "METADATA_MEMBER",
    "MAX_METADATA_BYTES",
    "MetadataError",
    "check_layout",
    "encode_metadata",
    "layout_of",
    "parse_metadata",
]

METADATA_MEMBER = "dppo_ckpt.json"
METADATA_FORMAT_VERSION = 1
#: The checkpoint layout this package writes, and the newest it reads.
LAYOUT_VERSION = 2
#: The first release that reads (and writes) :data:`LAYOUT_VERSION`.
LAYOUT_REQUIRES = "dppo-ckpt>=0.3"
#: The member is a few hundred bytes; anything far larger was not written by this package.
MAX_METADATA_BYTES = 64 * 1024
_MAX_KEYS = 64
_MAX_TEXT = 512
_MAX_DEPTH = 8
_MAX_ITEMS = 1024
_SCALARS = (str, int, float, bool, type(None))


class MetadataError(ValueError):
    """The member does not have the shape this package writes."""


class LayoutError(MetadataError):
    """The checkpoint has a layout newer than this package reads (one line, naming the
    release it needs)."""


def encode_metadata(
    numerics: Mapping[str, Any],
    env: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
    layout: int | None = LAYOUT_VERSION,
) -> bytes:
    """The member's bytes (sorted keys, so equal inputs give equal bytes).

    :param layout: the checkpoint layout to record (with :data:`LAYOUT_REQUIRES` for the
        current one); ``None`` writes a layout-1 member, which has neither key

    :param numerics: the numerics fingerprint (flat)
    :param env: the environment spec as plain JSON; left out when ``None``
    :param run: the run's targets (flat); left out when ``None``
    """
    document: dict[str, Any] = {"format": METADATA_FORMAT_VERSION, "numerics": dict(numerics)}
    if layout is not None and layout > 1:
        document["layout"] = layout
        document["requires"] = LAYOUT_REQUIRES
    if env is not None:
        document["env"] = _bounded_json(dict(env), "env")
    if run is not None:
        document["run"] = _flat_object(dict(run), "run")
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MetadataError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _flat_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MetadataError(f"{where} must be a JSON object, found {type(value).__name__}")
    if len(value) > _MAX_KEYS:
        raise MetadataError(f"{where} holds {len(value)} keys, more than {_MAX_KEYS}")
    for key, item in value.items():
        if len(key) > _MAX_TEXT:
            raise MetadataError(f"{where} has a key longer than {_MAX_TEXT} characters")
        if not isinstance(item, _SCALARS):
            raise MetadataError(f"{where}.{key} must be a plain value, found {type(item).__name__}")
        if isinstance(item, str) and len(item) > _MAX_TEXT:
            raise MetadataError(f"{where}.{key} is longer than {_MAX_TEXT} characters")
    return value


def _bounded_json(value: Any, where: str, depth: int = 0, budget: list[int] | None = None) -> Any:
    """``value`` when it is plain JSON within small limits (depth, items, text length)."""
    budget = budget if budget is not None else [_MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        raise MetadataError(f"{where} holds more than {_MAX_ITEMS} values")
    if depth > _MAX_DEPTH:
        raise MetadataError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        raise MetadataError(f"{where} is longer than {_MAX_TEXT} characters")
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list):
        return [_bounded_json(v, f"{where}[{i}]", depth + 1, budget) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or len(key) > _MAX_TEXT:
                raise MetadataError(f"{where} has a key that is not a short string")
        return {k: _bounded_json(v, f"{where}.{k}", depth + 1, budget) for k, v in value.items()}
    raise MetadataError(f"{where} must be plain JSON, found {type(value).__name__}")


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """Parse and validate the member's bytes.

    :return: ``{"format": int, "numerics": {flat fingerprint}}``, plus ``"env"`` (a JSON
        object, checked for shape only: :class:`dppo_ckpt.envs.EnvSpec` reads its fields) and
        ``"run"`` (flat) when the member holds them
    :raises MetadataError: too large, not UTF-8 JSON, duplicate keys, or another shape
    """
    if len(raw) > MAX_METADATA_BYTES:
        raise MetadataError(f"{len(raw):,} bytes, more than {MAX_METADATA_BYTES:,}")
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError as exc:
        raise MetadataError(f"not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise MetadataError("nested too deeply") from None
    except ValueError as exc:
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(f"not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MetadataError(f"must be a JSON object, found {type(document).__name__}")
    version = document.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MetadataError("'format' must be a positive integer")
    if version > METADATA_FORMAT_VERSION:
        raise MetadataError(
            f"format {version} is newer than this dppo-ckpt reads ({METADATA_FORMAT_VERSION})"
        )
    layout = document.get("layout", 1)
    if not isinstance(layout, int) or isinstance(layout, bool) or layout < 1:
        raise MetadataError("'layout' must be a positive integer")
    requires = document.get("requires")
    if requires is not None and not (isinstance(requires, str) and len(requires) <= 64):
        raise MetadataError("'requires' must be a short string")
    check_layout(layout, requires)
    numerics = _flat_object(document.get("numerics"), "numerics")
    parsed: dict[str, Any] = {"format": version, "layout": layout, "numerics": numerics}
    if requires is not None:
        parsed["requires"] = requires
    if document.get("env") is not None:
        env = _bounded_json(document["env"], "env")
        if not isinstance(env, dict):
            raise MetadataError(f"env must be a JSON object, found {type(env).__name__}")
        parsed["env"] = env
    if document.get("run") is not None:
        parsed["run"] = _flat_object(document["run"], "run")
    return parsed


def check_layout(layout: int, requires: str | None = None) -> None:
    """Refuse a checkpoint layout newer than :data:`LAYOUT_VERSION`, in one line that names
    the release it needs (as the file records it, else by its layout number).

    :raises LayoutError: the layout is unknown here
    """
    if layout <= LAYOUT_VERSION:
        return
    needed = _printable(requires) if requires else f"a dppo-ckpt that reads layout {layout}"
    raise LayoutError(
        f"checkpoint layout {layout} is newer than this dppo-ckpt reads (layouts 1-"
        f"{LAYOUT_VERSION}); it needs {needed}: upgrade dppo-ckpt"
    )


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def layout_of(metadata: Mapping[str, Any] | None) -> int:
    """The checkpoint layout of a parsed member (1 when the file has none)."""
    return 1 if metadata is None else int(metadata.get("layout", 1))
