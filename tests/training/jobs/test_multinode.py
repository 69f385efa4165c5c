"""Jobs on a Ray cluster of several nodes: a head and worker nodes on this machine
(``ray.cluster_utils.Cluster``, all on 127.0.0.1, token authentication), reached with
``lungvit train --ray-address``. One worker per node, DDP across them, checkpoints on the
storage every node sees, metrics in the store; a worker node killed mid-training (slow).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from lungvit.training.data.discover import file_sha256
from lungvit.training.store import JobStatus, open_store

from .conftest import STEPS_PER_EPOCH, expected_metric_keys, kill_session, wait_for

CLUSTER = Path(__file__).parents[2] / "_ray_cluster.py"
RANK_EVENT = re.compile(r"worker rank (\d+) on node ([0-9a-f]+) \(([^,]+), pid \d+\)")


@dataclass
class RayCluster:
    address: str
    workers: list[str]  # node ids of the worker nodes
    token: str
    proc: subprocess.Popen[str]

    def env(self, home: Path) -> dict[str, str]:
        """The environment of a LungViT process that uses this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                # Ray's single-machine mode: this process's node address is 127.0.0.1 too.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "LUNGVIT_HOME": str(home)}

    def kill(self, index: int) -> None:
        """Kill worker node ``index`` at once (raylet and workers, no goodbye)."""
        self.proc.stdin.write(f"kill {index}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == f"killed {index}"


@contextmanager
def start_cluster(worker_nodes: int) -> Iterator[RayCluster]:
    temp = Path(tempfile.mkdtemp(prefix="lv-ray-"))  # short: Ray's socket paths live here
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, str(CLUSTER), str(worker_nodes), str(temp)],
                            env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the Ray cluster did not start (exit {proc.wait(60)})"
        info = json.loads(line)
        yield RayCluster(info["address"], info["workers"], token, proc)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """A head (no CPUs) and two worker nodes of one CPU each: 2 workers land one a node."""
    with start_cluster(2) as started:
        yield started


def train_cmd(data: Path, cache: Path, out: Path, cluster_address: str, db: str, *,
              epochs: int, max_failures: int = 1) -> list[str]:
    return [sys.executable, "-m", "lungvit.cli.main", "train", "--data", str(data),
            "--out", str(out), "--variant", "lungvit_tiny", "--input-size", "32",
            "--epochs", str(epochs), "--batch-size", "8", "--no-augment", "--patience", "0",
            "--cache-dir", str(cache), "--quiet", "--workers", "2",
            "--ray-address", cluster_address, "--db", db,
            "--max-failures", str(max_failures)]


def metric_rows(url: str, job_id: int) -> list[tuple[int, str, int]]:
    """(step, name, attempt) of every metric row, read outside the store."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                text("SELECT step, name, attempt FROM metrics WHERE job_id = :j"),
                {"j": job_id})]
    finally:
        engine.dispose()


def placements(messages: list[str]) -> list[tuple[int, str, str]]:
    """(rank, node id, node address) of each worker start the job recorded."""
    return [(int(m.group(1)), m.group(2), m.group(3))
            for m in map(RANK_EVENT.fullmatch, messages) if m]


@pytest.mark.timeout(300)
def test_a_job_on_a_cluster_runs_one_worker_per_node(cluster: RayCluster, png_data: Path,
                                                     cache_dir: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'store' / 'lungvit.db'}"
    epochs = 1
    t0 = time.monotonic()
    done = subprocess.run(train_cmd(png_data, cache_dir, tmp_path / "model.safetensors",
                                    cluster.address, db, epochs=epochs),
                          env=cluster.env(tmp_path / "home"), capture_output=True, text=True,
                          timeout=280)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    with open_store(db) as store:
        (job,) = store.list_jobs()
        messages = [e.message for e in store.events(job.id)]
        checkpoints = store.checkpoints(job.id)
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 1), job.error_text
    assert job.ray_address == cluster.address
    assert job.hardware["local_cluster"] is False and job.hardware["cluster"]["CPU"] == 2
    # One worker on each worker node (the head has no CPU to give a worker).
    placed = placements(messages)
    assert sorted(rank for rank, _, _ in placed) == [0, 1]
    assert sorted(node for _, node, _ in placed) == sorted(cluster.workers)
    assert {addr for _, _, addr in placed} == {"127.0.0.1"}
    # The DDP run's metrics, every step once; checkpoints on the storage path, intact.
    steps = epochs * STEPS_PER_EPOCH
    keys = [(s, n) for s, n, _ in metric_rows(db, job.id)]
    assert len(keys) == len(set(keys)) and set(keys) == expected_metric_keys(steps)
    storage = Path(job.run_dir) / "ray"
    resumable = [c for c in checkpoints if c.path.endswith(".ckpt")]
    assert [c.version for c in resumable] == [STEPS_PER_EPOCH]
    for c in resumable:
        assert Path(c.path).is_relative_to(storage) and file_sha256(c.path) == c.sha256
    assert Path(job.result_checkpoint_path).is_file()
    print(f"multi-node job: {elapsed:.1f} s")


@pytest.mark.timeout(120)
def test_a_cluster_that_refuses_the_token_is_one_line_and_exit_3(
        cluster: RayCluster, png_data: Path, cache_dir: Path, tmp_path: Path) -> None:
    store_file = tmp_path / "store" / "lungvit.db"
    env = {**cluster.env(tmp_path / "home"), "RAY_AUTH_TOKEN": "0" * 64}
    done = subprocess.run(train_cmd(png_data, cache_dir, tmp_path / "m.safetensors",
                                    cluster.address, f"sqlite:///{store_file}", epochs=1),
                          env=env, capture_output=True, text=True, timeout=100)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3, done.stderr[-3000:]
    assert len(lines) == 1 and "refused this process's token" in lines[0], lines
    assert cluster.address in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
    assert "0" * 64 not in lines[0]  # a token is never printed
    assert not store_file.exists()  # nothing written


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_worker_node_killed_mid_training_and_the_job_continues_from_its_checkpoint(
        postgres_url: str, png_data: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Three worker nodes; the node of rank 1 is killed after the first checkpoint is in the
    (PostgreSQL) store: Ray restarts the workers on the two nodes left, from that checkpoint,
    and the store ends with every metric and checkpoint once."""
    epochs = 6
    with start_cluster(3) as cl:
        proc = subprocess.Popen(train_cmd(png_data, cache_dir, tmp_path / "model.safetensors",
                                          cl.address, postgres_url, epochs=epochs),
                                env=cl.env(tmp_path / "home"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            with open_store(postgres_url) as store:
                job_id = wait_for(lambda: [j.id for j in store.list_jobs()], 120, "the job")[0]
                wait_for(lambda: store.checkpoints(job_id), 400, "the first checkpoint",
                         interval=0.1)
                placed = placements([e.message for e in store.events(job_id)])
                node = dict((r, n) for r, n, _ in placed)[1]
                newest_before = max(c.version for c in store.checkpoints(job_id))
                cl.kill(cl.workers.index(node))
                newest_after = max(c.version for c in store.checkpoints(job_id))
            out, err = proc.communicate(timeout=700)
        finally:
            kill_session(proc.pid)
    with open_store(postgres_url) as store:
        tail = [e.message for e in store.events(job_id)][-25:]
    assert proc.returncode == 0, (err[-3000:], tail)
    with open_store(postgres_url) as store:
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
        checkpoints = store.checkpoints(job_id)
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 2), (job.error_text,
                                                                  messages[-25:])
    # From the newest checkpoint the store held when the workers restarted (the node's
    # workers may still finish a step or two while it is being killed).
    restart = next(i for i, m in enumerate(messages) if m.endswith("workers restarted)"))
    saved = [int(m.group(1)) for m in map(re.compile(r"checkpoint v(\d+) saved.*").fullmatch,
                                          messages[:restart]) if m]
    resumed = [int(m.group(1)) for m in map(
        re.compile(r"continuing from checkpoint checkpoint_step(\d+)").fullmatch, messages)
        if m]
    assert newest_before in saved and resumed == [max(saved)], (resumed, saved, newest_after)
    killed_after = resumed[0]
    after = placements(messages)[2:]  # the restarted group, on the nodes left
    assert sorted(r for r, _, _ in after) == [0, 1] and node not in {n for _, n, _ in after}
    steps = epochs * STEPS_PER_EPOCH
    rows = metric_rows(postgres_url, job_id)
    keys = [(s, n) for s, n, _ in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected_metric_keys(steps)
    # Steps up to the checkpoint were written by attempt 1 and never again;
    assert all(a == 1 for s, _, a in rows if s <= killed_after)
    assert all(a == 2 for s, _, a in rows if s > killed_after)  # the rest again, by 2
    versions = [c.version for c in checkpoints if c.path.endswith(".ckpt")]
    assert len(versions) == len(set(versions))
    assert set(versions) <= set(range(STEPS_PER_EPOCH, steps + 1, STEPS_PER_EPOCH))
    assert job.final_metrics["steps"] == steps
