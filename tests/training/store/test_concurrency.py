"""Several processes and threads writing one store at once, and a writer killed
mid-transaction, on SQLite and on a real PostgreSQL server. Real files, real processes;
expected counts computed independently."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from lungvit.training.store import Store, open_store

from .conftest import scalar, sql

WRITERS, ROWS_PER_WRITER = 3, 300
JOB_STEPS = 200  # 2 metrics per step, a checkpoint every 50 steps


def _integrity(db_url: str) -> str:
    """SQLite's integrity check ("ok"); PostgreSQL has none to run (its WAL recovers it)."""
    if not db_url.startswith("sqlite"):
        return "ok"
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


class Reader(threading.Thread):
    """Polls what the app polls until stopped; the counts it sees must never go down."""

    def __init__(self, store: Store, job_id: int) -> None:
        super().__init__(daemon=True)
        self.store, self.job_id = store, job_id
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.polls = 0

    def run(self) -> None:
        seen_rows = seen_events = 0
        while not self.stop.is_set():
            try:
                self.store.list_jobs()
                self.store.get_job(self.job_id)
                rows = sum(len(s) for s in self.store.metrics(self.job_id).values())
                events = len(self.store.events(self.job_id))
                if rows < seen_rows or events < seen_events:
                    self.errors.append(f"went back: {seen_rows}->{rows}, "
                                       f"{seen_events}->{events}")
                seen_rows, seen_events = rows, events
                self.polls += 1
            except Exception as exc:
                self.errors.append(repr(exc))
            time.sleep(0.01)


def test_writers_a_job_and_a_reader_at_once_lose_nothing(store: Store, db_url: str,
                                                         workers) -> None:
    job_id = store.create_job({"epochs": 1}, name="contended")
    procs = [workers.start("writer", db_url, job_id, k, ROWS_PER_WRITER)
             for k in range(WRITERS)]
    procs.append(workers.start("job", db_url, job_id, JOB_STEPS))
    reader = Reader(store, job_id)
    workers.go_when_ready()
    t0 = time.monotonic()
    reader.start()
    results = [workers.result(p, timeout=60) for p in procs]
    elapsed = time.monotonic() - t0
    reader.stop.set()
    reader.join(10)

    for r in results:
        assert r["errors"] == [], r["errors"][:5]
        assert r["lock_retries"] == 0
    assert reader.errors == [] and reader.polls > 0
    assert store.lock_retries == 0
    assert elapsed < 30, f"took {elapsed:.1f} s"

    checkpoints = JOB_STEPS // 50
    expected_metrics = WRITERS * ROWS_PER_WRITER + 2 * JOB_STEPS
    expected_events = (1 + 1  # queued, attempt started
                       + WRITERS * len(range(0, ROWS_PER_WRITER, 10))
                       + checkpoints + 1)  # checkpoint saves, running -> succeeded
    per_name = Counter(dict(sql(db_url, "SELECT name, count(*) FROM metrics GROUP BY name")))
    assert sum(per_name.values()) == expected_metrics
    assert per_name == {**{f"writer{k}/value": ROWS_PER_WRITER for k in range(WRITERS)},
                        "train/loss": JOB_STEPS, "train/acc": JOB_STEPS}
    assert scalar(db_url, "SELECT count(*) FROM events") == expected_events
    assert scalar(db_url, "SELECT count(*) FROM checkpoints") == checkpoints
    assert [c.is_best for c in store.checkpoints(job_id)] == [False] * (checkpoints - 1) + [True]
    assert store.get_job(job_id).status == "succeeded"
    assert _integrity(db_url) == "ok"


RACERS, RESTARTS = 6, 25


def test_concurrent_restarts_each_claim_an_attempt_of_their_own(store: Store, db_url: str,
                                                                 workers) -> None:
    job_id = store.create_job({})
    store.start_attempt(job_id, resolved_config={}, pid=77, hostname="owner")
    procs = [workers.start("restarter", db_url, job_id, 77, "owner", RESTARTS)
             for _ in range(RACERS)]
    workers.go_when_ready()
    results = [workers.result(p, timeout=60) for p in procs]
    for r in results:
        assert r["errors"] == [] and r["lock_retries"] == 0
    claimed = [a for r in results for a in r["attempts"]]
    total = RACERS * RESTARTS
    # Read-and-increment is one transaction: no number twice, none skipped.
    assert sorted(claimed) == list(range(2, 2 + total))
    assert store.get_job(job_id).attempt == 1 + total
    started = [m for (m,) in sql(db_url, "SELECT message FROM events WHERE job_id = :j",
                                 {"j": job_id}) if m.startswith("attempt ")]
    assert len(started) == len(set(started)) == 1 + total
    assert _integrity(db_url) == "ok"


def test_of_processes_resuming_one_job_at_once_exactly_one_claims_it(
        store: Store, db_url: str, workers) -> None:
    job_id = store.create_job({})
    store.start_attempt(job_id, resolved_config={})
    store.set_status(job_id, "interrupted")
    procs = [workers.start("claimer", db_url, job_id, 1) for _ in range(RACERS)]
    workers.go_when_ready()
    results = [workers.result(p, timeout=60) for p in procs]
    assert all(r["lock_retries"] == 0 for r in results)
    winners = [r for r in results if "attempt" in r]
    assert len(winners) == 1 and winners[0]["attempt"] == 2, results
    assert all("another process claimed it" in r["conflict"] for r in results
               if r is not winners[0])
    job = store.get_job(job_id)
    assert (job.status, job.attempt, job.pid) == ("running", 2, winners[0]["pid"])
    assert sum(e.message.startswith("attempt 2 started") for e in store.events(job_id)) == 1


def test_threads_share_one_store(store: Store, db_url: str) -> None:
    job_id = store.create_job({})
    errors: list[str] = []

    def work(k: int) -> None:
        for step in range(40):
            try:
                store.record_metrics(job_id, step, {f"thread{k}": float(step)})
                store.add_event(job_id, f"{k}:{step}")
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.lock_retries == 0
    series = store.metrics(job_id)
    assert {name: len(points) for name, points in series.items()} == {
        f"thread{k}": 40 for k in range(8)}
    assert len(store.events(job_id)) == 1 + 8 * 40


def _forked_child(store: Store, job_id: int) -> None:
    inherited = store._db._binds[0]  # noqa: SLF001 - the parent's engine, as forked
    for i in range(20):
        store.add_event(job_id, f"child {i}")
    if store.engine is inherited:
        raise SystemExit("the child reused its parent's engine")


def test_a_forked_child_opens_its_own_connections(store: Store, db_url: str) -> None:
    job_id = store.create_job({})
    store.add_event(job_id, "parent before fork")  # the parent's pool holds a connection
    child = multiprocessing.get_context("fork").Process(target=_forked_child,
                                                        args=(store, job_id))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    store.add_event(job_id, "parent after fork")
    messages = [e.message for e in store.events(job_id)]
    assert messages[:2] == ["job queued", "parent before fork"]
    assert messages[-1] == "parent after fork"
    assert sorted(messages[2:-1]) == sorted(f"child {i}" for i in range(20))
    if db_url.startswith("sqlite"):
        assert Path(db_url.removeprefix("sqlite:///") + "-wal").exists()  # parent's WAL intact
    assert _integrity(db_url) == "ok"


def test_a_writer_killed_mid_transaction_leaves_a_sound_database(store: Store, db_url: str,
                                                                 workers) -> None:
    job_id = store.create_job({})
    proc = workers.start("crash", db_url, job_id)
    workers.go_when_ready()
    last = -1
    for line in proc.stdout:
        last = int(line.split()[1])
        if last >= 150:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    assert _integrity(db_url) == "ok"
    steps = sql(db_url, "SELECT step, count(*) FROM metrics GROUP BY step ORDER BY step")
    # Every committed step is there, whole (3 names, one transaction), with no gaps.
    assert [s for s, _ in steps] == list(range(len(steps)))
    assert {n for _, n in steps} == {3}
    assert len(steps) > last
    reopened = open_store(db_url)
    reopened.record_metrics(job_id, len(steps), {"a": 1.0, "b": 2.0, "c": 3.0})
    assert len(reopened.metrics(job_id)["a"]) == len(steps) + 1
    reopened.close()
