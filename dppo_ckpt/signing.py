"""The user's own key, and HMAC-SHA256 signatures of the run manifests written with it.

A run folder's environment snapshot is a pickle: loading it runs code. ``train --resume``
loads one only when the folder's manifest proves that ``train`` wrote it for this user, and
files cannot vouch for themselves: whoever hands over a folder can also write its ``run.json``.
So the manifest carries an HMAC-SHA256 over its own canonical JSON, keyed with a secret that
never lives in a run folder:

- ``DPPO_CKPT_KEY`` (the key as text), for clusters whose jobs share a secret; else
- the key file ``$XDG_CONFIG_HOME/dppo-ckpt/key`` (``~/.config/dppo-ckpt/key``), created with
  32 random bytes and mode 0600 on first use.

To resume a run on another machine, give both machines the same key (copy the key file, or
set ``DPPO_CKPT_KEY`` from the cluster's secret store). A folder edited by hand, or signed
with someone else's key, no longer verifies; ``train`` then restarts the environments fresh
and says why.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dppo_ckpt.atomic import TEMP_SUFFIX, fsync_directory

__all__ = [
    "KEY_ENV",
    "SIGNATURE_KEY",
    "SigningKeyError",
    "key_path",
    "load_key",
    "sign",
    "verify",
]

KEY_ENV = "DPPO_CKPT_KEY"
#: The manifest field holding the signature; the signature covers every other field.
SIGNATURE_KEY = "signature"
_ALGORITHM = "hmac-sha256"
_KEY_BYTES = 32
# What link() fails with where the file system has no hard links (FAT, some network shares).
_NO_HARD_LINKS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS")
    if hasattr(errno, name)
)


class SigningKeyError(RuntimeError):
    """The user's key cannot be read or created."""


def key_path() -> Path:
    """Where the key file lives: ``$XDG_CONFIG_HOME/dppo-ckpt/key``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "dppo-ckpt" / "key"


def _create_key(path: Path) -> None:
    """Create the key file unless it exists; the first run to create it sets everyone's key.

    The key is written to a private temporary file beside it, synced, then hard-linked into
    place. The link appears complete or not at all, and fails if another run's key got there
    first, so a concurrent reader never sees an empty or partial key and no key is replaced.
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkstemp creates the file with mode 0600.
    text = secrets.token_hex(_KEY_BYTES) + "\n"
    fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp_name, path)
        except FileExistsError:
            return  # another run created the key first: its key is the one
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            _create_key_exclusively(path, text)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
    fsync_directory(folder)


def _create_key_exclusively(path: Path, text: str) -> None:
    # Where the file system has no hard links: O_EXCL still keeps the first creator's key,
    # but a reader may see the file before its key is written.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        # A half-written key would be refused by every later run: leave none behind.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def load_key() -> bytes:
    """The user's key: ``DPPO_CKPT_KEY``, else the key file (created on first use).

    :raises SigningKeyError: the key file cannot be created or read, or is readable by others
    """
    text = os.environ.get(KEY_ENV)
    if text:
        return text.encode("utf-8")
    path = key_path()
    try:
        if not path.exists():
            _create_key(path)
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SigningKeyError(
                f"key file {path} is readable by other users (mode {mode & 0o777:o}): "
                f"chmod 600 {path}"
            )
        key = path.read_text("ascii").strip()
    except OSError as exc:
        raise SigningKeyError(f"cannot read or create the key file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise SigningKeyError(f"key file {path} is not text") from None
    if len(key) < 32:
        raise SigningKeyError(
            f"key file {path} holds fewer than 32 characters: delete it to create a new key "
            "(what it signed must then be signed again)"
        )
    return key.encode("ascii")


def _canonical(document: Mapping[str, Any]) -> bytes:
    unsigned = {key: value for key, value in document.items() if key != SIGNATURE_KEY}
    text = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), default=str)
    return text.encode("utf-8")


def _key_id(key: bytes) -> str:
    # Names the key in a message without revealing it.
    return hashlib.sha256(b"dppo-ckpt key id\0" + key).hexdigest()[:12]


def sign(document: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``document`` with a ``signature`` field over all its other fields."""
    mac = hmac.new(key, _canonical(document), hashlib.sha256).hexdigest()
    signature = {"algorithm": _ALGORITHM, "key_id": _key_id(key), "value": mac}
    return {**{k: v for k, v in document.items() if k != SIGNATURE_KEY}, SIGNATURE_KEY: signature}


def verify(document: Mapping[str, Any], key: bytes) -> str | None:
    """``None`` when ``document`` carries a valid signature made with ``key``; otherwise the
    reason, as a phrase to follow "the manifest ..."."""
    signature = document.get(SIGNATURE_KEY)
    if not isinstance(signature, dict) or not isinstance(signature.get("value"), str):
        return "is not signed"
    if signature.get("algorithm") != _ALGORITHM:
        return f"is signed with {signature.get('algorithm')!r}, not {_ALGORITHM}"
    if signature.get("key_id") != _key_id(key):
        return "was signed with another key than yours"
    expected = hmac.new(key, _canonical(document), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature["value"]):
        return "was changed after it was signed"
    return None
