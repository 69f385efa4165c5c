"""Fixtures of the app tests: a tiny checkpoint, phantom scans and a running app."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

PHI_NAME = "Doe^Sentinel"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained lungvit_tiny checkpoint (64 px, nine classes, seeded)."""
    import torch

    from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
    from lungvit.core.model.network import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, create_model("lungvit_tiny").eval(),
                    CheckpointInfo(notes="test model trained on nothing"))
    return path


@pytest.fixture(scope="session")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom DICOM carrying a PHI sentinel, a PNG, and a non-scan text file."""
    from PIL import Image

    from lungvit.synthetic.dicom_write import write_dicom

    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    body = ((np.hypot(yy - 48, xx - 40) < 34) * 2500 + rng.integers(0, 300, (96, 80)))
    dcm = root / "chest.dcm"
    write_dicom(dcm, body.astype(np.uint16), bits_stored=12, window_center=1400,
                window_width=2800, phi={"PatientName": PHI_NAME, "PatientID": "SENTINEL-42"})
    png = root / "retina.png"
    Image.fromarray((rng.random((72, 72)) * 255).astype(np.uint8)).save(png)
    txt = root / "notes.dcm"
    txt.write_text("this is not a scan\n")
    return {"dicom": dcm, "png": png, "text": txt}


@pytest.fixture(scope="module")
def running_app(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[str, object]]:
    """The app served in-process on a free loopback port: (base URL, context)."""
    from lungvit.app.state import make_context
    from lungvit.app.ui import build_app, launch_options, serve

    ctx = make_context(tiny_checkpoint, data_dir=tmp_path_factory.mktemp("appdata"))
    app = build_app(ctx)
    serve(app, launch_options(app, port=free_port()))
    try:
        yield f"http://127.0.0.1:{app.server_port}/", ctx
    finally:
        app.close()
