"""The user's key and the signatures that let a run folder vouch for its snapshots."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time

import pytest

from dppo_ckpt import signing

KEY = b"k" * 64


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    return tmp_path / "config"


def test_a_signed_document_verifies_and_any_change_breaks_it():
    document = {"env_id": "Pendulum-v1", "checkpoints": [{"file": "a.zip", "sha256": "00"}]}
    signed = signing.sign(document, KEY)
    assert signing.verify(signed, KEY) is None
    assert signing.sign(signed, KEY) == signed  # re-signing replaces, never nests
    changed = {**signed, "checkpoints": [{"file": "a.zip", "sha256": "01"}]}
    assert signing.verify(changed, KEY) == "was changed after it was signed"
    added = {**signed, "extra": 1}
    assert signing.verify(added, KEY) == "was changed after it was signed"
    assert signing.verify(document, KEY) == "is not signed"
    assert signing.verify(signed, b"x" * 64) == "was signed with another key than yours"
    forged = {**signed, "signature": {**signed["signature"], "algorithm": "none"}}
    assert "is signed with 'none'" in signing.verify(forged, KEY)


def test_the_key_file_is_created_on_first_use_with_mode_0600(config_home):
    key = signing.load_key()
    path = config_home / "dppo-ckpt" / "key"
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    assert len(key) == 64
    assert signing.load_key() == key  # created once


def test_the_environment_variable_wins(config_home, monkeypatch):
    monkeypatch.setenv(signing.KEY_ENV, "a cluster secret shared by its jobs")
    assert signing.load_key() == b"a cluster secret shared by its jobs"
    assert not (config_home / "dppo-ckpt" / "key").exists()


def test_a_key_readable_by_others_is_refused(config_home):
    signing.load_key()
    path = signing.key_path()
    os.chmod(path, 0o644)
    with pytest.raises(signing.SigningKeyError, match="readable by other users"):
        signing.load_key()


def test_a_short_key_file_is_refused(config_home):
    path = signing.key_path()
    path.parent.mkdir(parents=True)
    path.write_text("short\n")
    os.chmod(path, 0o600)
    with pytest.raises(signing.SigningKeyError, match="fewer than 32 characters"):
        signing.load_key()


def _watch_key_creation(path, monkeypatch, creators: int):
    """Start ``creators`` threads creating the key at once, with the key's generation slowed
    down, while another thread reads the key file as often as it can.

    :return: each creator's key (or its exception) and every content the reader saw
    """
    generate = signing.secrets.token_hex

    def slow_token_hex(nbytes):
        time.sleep(0.3)  # a wide moment of creation, in which the file must not be half there
        return generate(nbytes)

    monkeypatch.setattr(signing.secrets, "token_hex", slow_token_hex)
    seen: set[bytes] = set()
    results: list[object] = [None] * creators
    done = threading.Event()
    start = threading.Barrier(creators + 1)

    def read() -> None:
        start.wait()
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add(path.read_bytes())

    def create(index: int) -> None:
        start.wait()
        try:
            results[index] = signing.load_key()
        except signing.SigningKeyError as exc:
            results[index] = exc

    reader = threading.Thread(target=read)
    threads = [threading.Thread(target=create, args=(i,)) for i in range(creators)]
    for thread in (reader, *threads):
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    done.set()
    reader.join(timeout=30)
    return results, seen


def test_a_key_being_created_is_never_seen_empty_or_partial(config_home, monkeypatch):
    path = signing.key_path()
    results, seen = _watch_key_creation(path, monkeypatch, creators=2)
    assert all(isinstance(r, bytes) for r in results), results
    assert results[0] == results[1]  # two creators at once agree on one key
    assert path.read_bytes() == results[0] + b"\n"
    assert seen and all(re.fullmatch(rb"[0-9a-f]{64}\n", content) for content in seen), seen
    assert sorted(p.name for p in path.parent.iterdir()) == ["key"]  # no temporary file left
    assert (path.stat().st_mode & 0o777) == 0o600


def test_the_first_key_stays_when_another_run_creates_one_too(config_home):
    path = signing.key_path()
    first = signing.load_key()
    signing._create_key(path)  # a run that found no key a moment before
    assert signing.load_key() == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["key"]


def test_without_hard_links_the_key_is_still_created_once(config_home, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(signing.os, "link", no_links)
    key = signing.load_key()
    path = signing.key_path()
    assert path.read_bytes() == key + b"\n" and (path.stat().st_mode & 0o777) == 0o600
    signing._create_key(path)
    assert signing.load_key() == key
    assert sorted(p.name for p in path.parent.iterdir()) == ["key"]


def test_without_hard_links_a_failed_write_leaves_no_key_behind(config_home, monkeypatch):
    """A key file that could not be written whole is removed: every later run would refuse
    a short key, so the next one creates a new key instead."""

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    real_fsync, calls = signing.os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 2:  # the temporary file's fsync passes, the key file's fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(signing.os, "link", no_links)
    monkeypatch.setattr(signing.os, "fsync", full_disk)
    with pytest.raises(signing.SigningKeyError, match="No space left"):
        signing.load_key()
    path = signing.key_path()
    assert not path.exists()
    monkeypatch.setattr(signing.os, "fsync", real_fsync)
    assert len(signing.load_key()) >= 32
