"""A real job end to end: ``lungvit train --workers 2`` on Ray (CPU), DICOM phantoms.

The one Ray-backed test of the default run: the job completes; its metrics, checkpoints
and final model land in the store with its comparison against a given model (one that
reads 64 px scans, the job 32 px) on its test split; the model loads and predicts; the
database holds none of the phantoms' patient data; every socket the job's processes listen
on while it trains is on loopback; no Ray process is left.
"""
from __future__ import annotations

import csv
import ipaddress
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lungvit.synthetic.dicom_write import PHI_SENTINELS
from lungvit.core.predict import Predictor
from lungvit.training.data.discover import file_sha256
from lungvit.training.store import JobStatus, open_store

from .conftest import expected_metric_keys, session_processes

EPOCHS = 2


@pytest.mark.timeout(600)
def test_train_on_ray_lands_in_the_store(tmp_path: Path, dicom_data: Path, cache_dir: Path,
                                         popen) -> None:
    db = tmp_path / "store" / "lungvit.db"
    url = f"sqlite:///{db}"
    out = tmp_path / "model.safetensors"
    other = _other_model(tmp_path / "other.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = popen([sys.executable, "-m", "lungvit.cli.main", "train", "--data", str(dicom_data),
                  "--out", str(out), "--variant", "lungvit_tiny", "--input-size", "32",
                  "--epochs", str(EPOCHS), "--batch-size", "8", "--no-augment",
                  "--patience", "0", "--cache-dir", str(cache_dir),
                  "--workers", "2", "--db", url, "--compare-to", str(other)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    listening, workers_seen, done = set(), [], threading.Event()

    def watch_sockets() -> None:  # what the job's processes listen on while it trains
        while not done.wait(0.5):
            procs = session_processes(proc.pid)
            workers_seen.extend(p for p, c in procs.items() if "RayTrainWorker" in c)
            listening.update(_listening(procs))

    watcher = threading.Thread(target=watch_sockets, daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=560)
    finally:
        done.set()
        watcher.join(timeout=30)
    assert proc.returncode == 0, stderr[-4000:]
    assert workers_seen and listening
    exposed = sorted(a for a in listening if not ipaddress.ip_address(a[0]).is_loopback)
    assert not exposed, f"sockets beyond loopback during the job: {exposed}"
    assert f"model: {out}" in stdout and "job 1: succeeded" in stderr

    with open_store(url) as store:
        job = store.get_job(1)
        series = store.metrics(1)
        ckpts = store.checkpoints(1)
        messages = [e.message for e in store.events(1)]
    assert (job.status, job.attempt, job.pid) == (JobStatus.SUCCEEDED, 1, proc.pid)
    assert job.ray_address.startswith("127.0.0.1:")
    assert job.hardware["workers"] == 2 and job.hardware["local_cluster"] is True
    assert job.dataset_fingerprint and job.heartbeat_at and job.finished_at
    assert job.resolved_config["train"]["accelerator"] == "cpu"

    # Metrics: every optimizer step once, every evaluation once, nothing else.
    steps = int(job.final_metrics["steps"])
    assert steps % EPOCHS == 0 and steps >= EPOCHS
    # The steps the attempt expected (the app's progress bar): no early stop, so all taken.
    assert job.resolved_config["expected_steps"] == steps
    keys = [(step, name) for name, points in series.items() for step, _ in points]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected_metric_keys(steps, steps // EPOCHS)

    # Checkpoints: one resumable checkpoint per validation (Ray's copies), then the model.
    per_epoch = steps // EPOCHS
    assert [c.version for c in ckpts] == [per_epoch, steps, steps + 1]
    for c in ckpts[:-1]:
        assert Path(c.path).name == "checkpoint.ckpt"
        assert Path(c.path).parent.name == f"checkpoint_step{c.version:08d}"
        assert c.metric_name == "val/loss" and c.metric_value > 0
    final = ckpts[-1]
    assert final.path == job.result_checkpoint_path == str(out.resolve())
    assert final.is_best and not any(c.is_best for c in ckpts[:-1])
    for c in ckpts:
        assert c.sha256 == file_sha256(c.path)
    assert any(m.startswith("final model written") for m in messages)

    # The final model loads and predicts (calibrated, the data's classes).
    predictor = Predictor.from_checkpoint(job.result_checkpoint_path)
    assert len(predictor.labels) == 9 and predictor.temperature > 0
    scan = next(p for p in sorted(dicom_data.rglob("*.dcm")))
    prediction = next(iter(predictor.predict_files([scan])))
    assert prediction.label in predictor.labels

    # No PHI in the store: not in the database file, its WAL or its shared memory.
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for value in PHI_SENTINELS.values():
        assert value.encode() not in stored, value

    # The comparison with the given model, recomputed through the app's decoding path.
    with open(Path(job.run_dir) / "split.csv", newline="") as f:
        test = [(dicom_data / r["path"], r["label"]) for r in csv.DictReader(f)
                if r["split"] == "test"]
    base = Predictor.from_checkpoint(other)
    right = sum(next(iter(base.predict_files([p]))).label == y for p, y in test)
    final = job.final_metrics
    assert final["compare/n_test"] == len(test) == final["compare/n_test_total"]
    assert final["compare/base_acc"] == pytest.approx(right / len(test), abs=1 / len(test))
    assert final["compare/tuned_acc"] == pytest.approx(final["test/acc"], abs=1 / len(test))
    assert any(m.startswith("transfer policy: none") for m in messages)
    assert any(f"on {len(test)} test scans" in m for m in messages)
    assert f"on {len(test)} test scans (" in stdout

    assert session_processes(proc.pid) == {}, "Ray processes outlived the job"


def _listening(pids: object) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets these processes listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:  # type: ignore[attr-defined]
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.add((str(ip), int(hex_port, 16)))
    return found


def _other_model(path: Path) -> Path:
    """An untrained 64 px model of the nine classes to compare the job's model with."""
    import torch

    from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
    from lungvit.core.model.network import create_model

    torch.manual_seed(3)
    save_checkpoint(path, create_model("lungvit_tiny").eval(), CheckpointInfo())
    return path
