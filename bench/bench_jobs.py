"""How soon a fine-tune job trains after the button, and how soon Cancel stops it.

    .venv/bin/python bench/bench_jobs.py [--runs 3] [--runtime in-process cluster]
                                         [--cancel-after-steps 3] [--out FILE]

Each run goes through the app's own path: ``launch_job`` (what the Fine-tune button
calls) queues a job in a fresh SQLite store and starts its detached process, which
prepares the data, starts (or joins) Ray and trains ``lungvit_tiny`` from scratch on
synthetic phantoms (3 classes x 8, 64 px; ``lungvit demo-data``). Each ``--runtime`` is
measured ``--runs`` times, interleaved (run 1 of each, then run 2, ...): ``in-process``
(Ray Train's local mode in the job process; what the app's one-worker Fine-tune uses) and
``cluster`` (one Ray Train worker on a local Ray cluster the job starts). The store is
polled every 20 ms from this process, as the app's status does (the app polls every 1 s). Reported,
median of ``--runs`` (the first run also pays the OS's cold file cache):

- the milestones the job records (process started, data prepared, Ray attempt started,
  worker placed) and the first training step's loss in the store, in seconds after the
  launch;
- after ``--cancel-after-steps`` steps, Cancel (``cancel_job``, what the app's Cancel
  button calls): seconds until the job's status reads ``cancelled``, and until no
  process of the job (its Ray workers included) is left.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.02
MILESTONES = {  # event text -> column
    "job process": "process started",
    "preparing the data": "preparing data",
    "data:": "data prepared",
    "worker rank 0": "worker placed",
}


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def one_run(data: Path, tmp: Path, cancel_after: int, runtime: str) -> dict[str, float]:
    """One job from the button to cancelled; seconds per milestone."""
    from lungvit.training.jobs.runner import cancel_job, launch_job
    from lungvit.training.store import open_store

    url = f"sqlite:///{tmp / 'jobs.db'}"
    request = {"train": {"data": str(data), "variant": "lungvit_tiny", "input_size": 64,
                         "epochs": 200, "batch_size": 8, "augment": False},
               "workers": 1, "metrics_every_n_steps": 1, "runtime": runtime}
    t0 = time.monotonic()
    job_id = launch_job(request, db_url=url, name="bench")
    out: dict[str, float] = {"launch returned": time.monotonic() - t0}
    seen_events = 0
    first_step = None
    with open_store(url) as store:
        while True:
            now = time.monotonic() - t0
            for ev in store.events(job_id, since_id=seen_events):
                seen_events = ev.id
                for prefix, name in MILESTONES.items():
                    if ev.message.startswith(prefix) and name not in out:
                        out[name] = now
            job = store.get_job(job_id)
            if job.started_at is not None and "Ray attempt started" not in out:
                out["Ray attempt started"] = now
            steps = [s for s, _ in store.metrics(job_id, ["train/loss"]).get("train/loss", [])]
            if steps and first_step is None:
                first_step = now
                out["first step"] = now
            if steps and max(steps) >= cancel_after:
                break
            if str(job.status) in ("failed", "succeeded", "cancelled"):
                raise RuntimeError(f"job {job_id} ended before the cancel: {job.status} "
                                   f"{job.error_text}")
            if now > 300:
                raise RuntimeError(f"job {job_id} made no step in 300 s")
            time.sleep(POLL_S)
        pid = job.pid
        tree = [pid, *_descendants(pid)] if pid else []
        t1 = time.monotonic()
        cancel_job(job_id, db_url=url)
        while str(store.get_job(job_id).status) != "cancelled":
            if time.monotonic() - t1 > 120:
                raise RuntimeError(f"job {job_id} not cancelled in 120 s")
            time.sleep(POLL_S)
        out["cancel -> cancelled"] = time.monotonic() - t1
        while any(_alive(p) for p in tree):
            if time.monotonic() - t1 > 120:
                raise RuntimeError(f"job {job_id}'s processes still alive 120 s after cancel")
            time.sleep(POLL_S)
        out["cancel -> no process left"] = time.monotonic() - t1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", nargs="+", default=["in-process", "cluster"],
                        choices=["in-process", "cluster"])
    parser.add_argument("--cancel-after-steps", type=int, default=3)
    parser.add_argument("--out", help="also write the results (Markdown) here")
    args = parser.parse_args()
    from lungvit.cli.main import main as cli

    runs: dict[str, list[dict[str, float]]] = {r: [] for r in args.runtime}
    loads = []
    with tempfile.TemporaryDirectory(prefix="lungvit-bench-jobs-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        if cli(["demo-data", str(data), "--per-class", "8", "--size", "64", "--classes",
                "lung-normal", "lung-covid", "lung-oct-cnv"]) != 0:
            sys.exit("demo-data failed")
        for i in range(args.runs):
            for runtime in args.runtime:
                run_tmp = tmp / f"{runtime}-{i}"
                run_tmp.mkdir()
                load = os.getloadavg()[0]
                loads.append(load)
                runs[runtime].append(one_run(data, run_tmp, args.cancel_after_steps, runtime))
                print(f"{runtime} run {i + 1}: load {load:.1f} before; " + ", ".join(
                    f"{k} {v:.2f} s" for k, v in runs[runtime][-1].items()), flush=True)
    lines = [f"Command: `python bench/bench_jobs.py {' '.join(sys.argv[1:])}`  ",
             f"{platform.node()}: {os.cpu_count()} CPUs, load {min(loads):.1f}-{max(loads):.1f} "
             f"before the runs, {os.getloadavg()[0]:.1f} after; median of {args.runs} runs per "
             "runtime, interleaved", ""]
    for runtime, results in runs.items():
        lines += [f"**{runtime}**", "", "| seconds after the button | median | runs |",
                  "|---|---|---|"]
        for key in results[0]:
            values = [r[key] for r in results if key in r]
            lines.append(f"| {key} | {statistics.median(values):.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in values)} |")
        lines.append("")
    if len(runs) == 2:
        (a, ra), (b, rb) = runs.items()
        for key in ("first step", "cancel -> cancelled"):
            ma = statistics.median(r[key] for r in ra)
            mb = statistics.median(r[key] for r in rb)
            lines.append(f"{key}: {a} / {b} = {ma:.2f} / {mb:.2f} s = {ma / mb:.2f}x  ")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text("# Fine-tune jobs: first step and Cancel\n\n" + text)


if __name__ == "__main__":
    main()
