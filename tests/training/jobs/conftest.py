"""Fixtures of the job tests: phantom data sets, a fresh store, and cleanup of job processes.

Jobs run in processes of their own sessions (``start_new_session``); every process of such a
session (the job, its local Ray cluster, the workers) is killed when a test ends, so no Ray
process outlives a test even when it fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lungvit.cli.main import main as lungvit

EPOCH_NAMES = ("train/loss_epoch", "train/acc_epoch")
VAL_NAMES = ("val/loss", "val/acc", "val/top5", "val/macro_f1", "val/balanced_acc",
             "val/macro_auc", "val/ece")
STEPS_PER_EPOCH = 4  # 50 training images over 2 workers, batches of 8: 4 steps an epoch


def train_request(data: Path, cache: Path, *, epochs: int, **job: Any) -> dict[str, Any]:
    """A job request for the tiny variant at 32 px on 2 CPU workers."""
    return {"train": {"data": str(data), "variant": "lungvit_tiny", "input_size": 32,
                      "epochs": epochs, "batch_size": 8, "cache_dir": str(cache),
                      "augment": False, "early_stopping_patience": 0},
            "workers": 2, **job}


def expected_metric_keys(steps: int, steps_per_epoch: int = STEPS_PER_EPOCH
                         ) -> set[tuple[int, str]]:
    """Every (step, name) the store must hold for a run of ``steps`` optimizer steps."""
    keys = {(s, n) for s in range(1, steps + 1) for n in ("train/loss", "lr")}
    for end in range(steps_per_epoch, steps + 1, steps_per_epoch):
        keys |= {(end, n) for n in VAL_NAMES + EPOCH_NAMES}
    return keys


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of the live processes of session ``sid`` (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z" and cmd:
            found[int(stat.parent.name)] = cmd
    return found


def ray_workers(sid: int) -> dict[int, str]:
    return {p: c for p, c in session_processes(sid).items() if "RayTrainWorker" in c}


def kill_session(sid: int) -> None:
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(condition: Callable[[], Any], timeout: float, message: str,
             interval: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s: {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def png_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "png"
    assert lungvit(["demo-data", str(root), "--per-class", "8", "--size", "48"]) == 0
    return root


@pytest.fixture(scope="session")
def dicom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "dicom"
    assert lungvit(["demo-data", str(root), "--per-class", "8", "--size", "48",
                    "--dicom"]) == 0
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preprocess-cache")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'lungvit.db'}"


@pytest.fixture
def sessions() -> Iterator[list[int]]:
    """Session ids (job pids) to kill entirely when the test ends."""
    started: list[int] = []
    yield started
    for sid in started:
        kill_session(sid)


@pytest.fixture
def popen(sessions: list[int]) -> Callable[..., subprocess.Popen[str]]:
    """Start a command in a session of its own, killed (with its Ray) after the test."""
    def start(cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, start_new_session=True, text=True, **kwargs)
        sessions.append(proc.pid)
        return proc
    return start
