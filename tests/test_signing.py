"""The user's key and the signatures that let a run folder vouch for its snapshots."""

from __future__ import annotations

import os

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
