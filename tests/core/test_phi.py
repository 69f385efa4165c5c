"""Patient keys: HMAC under a per-installation secret kept owner-only in the data directory."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lungvit.core.io import phi
@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh installation: its data directory (not created yet), no key file override."""
    monkeypatch.delenv(phi.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("LUNGVIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_key_is_an_hmac_under_a_secret_created_owner_only(home: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        key = phi.patient_key(" 1234567 ")
    finally:
        os.umask(old_umask)
    secret_file = home / phi.KEY_FILE_NAME
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    secret = bytes.fromhex(secret_file.read_text().strip())
    assert len(secret) == 32
    expected = hmac.new(secret, phi.PATIENT_KEY_CONTEXT + b"1234567", hashlib.sha256)
    assert key == expected.hexdigest()[:phi.PATIENT_KEY_HEX_CHARS]
    # Not the public salted hash any more: knowing the code is not enough to reverse it.
    public = hashlib.sha256(b"lungvit/patient-key/v1\x00" + b"1234567").hexdigest()[:20]
    assert key != public and "1234567" not in key
    assert phi.patient_key("  ") is None and phi.patient_key(None) is None


def test_keys_are_stable_on_one_installation_and_differ_across(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = phi.patient_key("PID-42")
    phi._secrets.clear()  # as a new process would: read the file again
    assert phi.patient_key("PID-42") == first
    code = "from lungvit.core.io.phi import patient_key; print(patient_key('PID-42'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == first
    secret = phi.installation_secret()
    monkeypatch.setenv("LUNGVIT_HOME", str(tmp_path / "other"))
    assert phi.patient_key("PID-42") != first and phi.installation_secret() != secret


def test_unusable_secret_means_no_key_not_a_failure(
        home: Path, caplog: pytest.LogCaptureFixture) -> None:
    home.mkdir()
    (home / phi.KEY_FILE_NAME).write_text("not hex\n")
    caplog.set_level(logging.WARNING, logger="lungvit.core.io.phi")
    assert phi.patient_key("PID-42") is None and phi.patient_key("PID-43") is None
    warned = [r for r in caplog.records if "patient keys are off" in r.getMessage()]
    assert len(warned) == 1 and "PID-4" not in warned[0].getMessage()
