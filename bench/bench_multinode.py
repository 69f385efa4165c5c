"""The same 2-worker fine-tune job on a Ray cluster of one node and of two nodes.

Each layout is a cluster started here with ``ray.cluster_utils.Cluster`` on 127.0.0.1 with
token authentication: a head without CPUs plus either one worker node of 2 CPUs (both
training workers on it) or two worker nodes of 1 CPU each (one worker on each). The job is
``lungvit train --workers 2 --ray-address ...`` on phantom scans, run ``--repeats`` times per
layout; training images/s is (optimizer steps x global batch) / the training's wall time as
the job records it (``train_time_s``, validation included), and "job s" is the whole
command (Ray workers starting, data, test, model writing). Medians over the repeats. On one
machine both layouts share the same cores, so the honest expectation is a ratio near 1x;
the figure shows what the second node's raylet and the cross-node process group cost.

    .venv/bin/python bench/bench_multinode.py --results bench/RESULTS-multinode.md
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

LAYOUTS = {"one node (2 CPUs)": [2], "two nodes (1 CPU each)": [1, 1]}


def run_layout(cpus: list[int], args: argparse.Namespace, data: Path, work: Path,
               token: str) -> list[dict]:
    """Start a cluster with worker nodes of ``cpus`` CPUs, run the job ``args.repeats`` times."""
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "temp_dir": str(work / "ray"),
              "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**common, "num_cpus": 0, "include_dashboard": False})
    for n in cpus:
        cluster.add_node(**common, num_cpus=n)
    cluster.wait_for_nodes()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "LUNGVIT_HOME": str(work / "home")}
    runs = []
    try:
        for r in range(args.repeats):
            # A store (and so a run folder) of its own: a Ray run started again in the same
            # folder under the same name would continue from the last one's checkpoints.
            db = f"sqlite:///{work / f'runs-{len(cpus)}-{r}' / 'lungvit.db'}"
            cmd = [sys.executable, "-m", "lungvit.cli.main", "train", "--data", str(data),
                   "--out", str(work / f"model-{len(cpus)}-{r}.safetensors"),
                   "--variant", args.variant, "--input-size", str(args.size),
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--no-augment", "--patience", "0", "--cache-dir", str(work / "cache"),
                   "--quiet", "--workers", "2", "--ray-address", cluster.address, "--db", db]
            load_before = os.getloadavg()[0]
            t0 = time.monotonic()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            wall = time.monotonic() - t0
            if done.returncode != 0:
                raise RuntimeError(f"the job failed: {done.stderr[-2000:]}")
            runs.append({"wall_s": wall, "load_before": load_before,
                         "load_after": os.getloadavg()[0], **job_figures(db)})
            print(json.dumps({"layout": cpus, **runs[-1]}), flush=True)
    finally:
        cluster.shutdown()
    return runs


def job_figures(db: str) -> dict:
    """Steps, global batch, training seconds and the worker nodes of the store's one job."""
    from lungvit.training.store import open_store

    with open_store(db) as store:
        (job,) = store.list_jobs()
        final = store.final_metrics(job.id)
        nodes = {m.split()[5] for m in (e.message for e in store.events(job.id))
                 if m.startswith("worker rank ")}
    steps, seconds = int(final["steps"]), float(final["train_time_s"])
    cfg = job.resolved_config["train"]
    images = steps * cfg["batch_size"] * job.resolved_config["workers"]
    return {"steps": steps, "train_s": seconds, "images_per_s": images / seconds,
            "worker_nodes": len(nodes)}


def report(results: dict[str, list[dict]], args: argparse.Namespace, command: str) -> str:
    rows = []
    for name, runs in results.items():
        rows.append((name, statistics.median(r["images_per_s"] for r in runs),
                     statistics.median(r["train_s"] for r in runs),
                     statistics.median(r["wall_s"] for r in runs),
                     sorted({r["worker_nodes"] for r in runs}),
                     min(r["load_before"] for r in runs), max(r["load_after"] for r in runs)))
    one, two = rows[0][1], rows[1][1]
    lines = [f"Command: `{command}`", "",
             f"{os.cpu_count()} CPUs; {args.repeats} runs per layout; {args.variant} at "
             f"{args.size} px, {args.epochs} epochs, batch {args.batch_size} per worker.", "",
             "| layout | training images/s (median) | training s | job s | worker nodes used "
             "| 1-min load (min before .. max after) |",
             "|---|---|---|---|---|---|"]
    for name, ips, train_s, wall, nodes, lo, hi in rows:
        lines.append(f"| {name} | {ips:.1f} | {train_s:.1f} | {wall:.1f} | "
                     f"{'/'.join(map(str, nodes))} | {lo:.2f} .. {hi:.2f} |")
    lines += ["", f"Two nodes / one node: **{two / one:.2f}x** training throughput.", "",
              "Every run:", "", "```"]
    lines += [json.dumps({"layout": name, **r}) for name, runs in results.items() for r in runs]
    return "\n".join([*lines, "```"]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--per-class", type=int, default=40, help="phantom scans per class")
    p.add_argument("--variant", default="lungvit_tiny")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--results", type=Path, help="write the Markdown report here")
    args = p.parse_args()
    command = "python bench/bench_multinode.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="lv-bench-") as tmp:
        work = Path(tmp)
        os.environ["RAY_TMPDIR"] = str(work)  # Ray's sessions and address file, not /tmp/ray
        data = work / "data"
        subprocess.run([sys.executable, "-m", "lungvit.cli.main", "demo-data", str(data),
                        "--per-class", str(args.per_class), "--size", "48"], check=True,
                       capture_output=True)
        token = secrets.token_hex(32)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # the nodes' token
        results = {name: run_layout(cpus, args, data, work, token)
                   for name, cpus in LAYOUTS.items()}
    text = report(results, args, command)
    print(text)
    if args.results:
        args.results.write_text("# Multi-node: one node vs two (issue 13)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
