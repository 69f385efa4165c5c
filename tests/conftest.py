"""Fixtures of every test: nothing is written to the user's own data directory."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _patient_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Decoding a DICOM creates the installation's patient-key secret (lungvit.core.phi);
    the tests (and the processes they start) use one of their own."""
    name = "LUNGVIT_PATIENT_KEY_FILE"
    before = os.environ.get(name)
    if before is None:
        os.environ[name] = str(tmp_path_factory.mktemp("patient-key") / "patient-key.secret")
    yield
    if before is None:
        os.environ.pop(name, None)
