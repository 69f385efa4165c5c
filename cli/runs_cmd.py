"""``lungvit runs``: list, inspect, compare, cancel, resume and promote fine-tune jobs.

Also defines the job options of ``lungvit train`` (:func:`add_job_arguments`). Imported at
every CLI start, so only argparse is imported here; the store and the job machinery are
imported when a command runs.
"""
from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from typing import Any

from lungvit.cli.args import positive_int
from lungvit.cli import exit_codes

EVENTS_SHOWN = 15

DB_HELP = ("tracking store: sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB "
           "(default: lungvit.db in the LungViT data directory, $LUNGVIT_HOME or "
           "~/.local/share/lungvit)")


JOB_OPTIONS = ("workers", "gpu", "cpus_per_worker", "ray_address", "max_failures", "db",
               "mlflow", "no_ray", "in_process")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that make ``lungvit train`` a Ray Train job tracked in the store.

    Their defaults are None, so a command can tell given options from defaults; see
    :func:`take_job_options`.
    """
    g = parser.add_argument_group(
        "training on Ray (a job tracked in the store; `lungvit runs` to follow it)")
    g.add_argument("--workers", type=positive_int, metavar="N",
                   help="data-parallel Ray Train workers (turns on training on Ray)")
    g.add_argument("--gpu", action="store_true", default=None,
                   help="give each Ray worker a GPU")
    g.add_argument("--cpus-per-worker", type=float, metavar="N",
                   help="CPUs Ray reserves per worker (default 1)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="use this existing Ray cluster (default: $RAY_ADDRESS, else a local "
                   "one on 127.0.0.1 with token authentication and no dashboard)")
    g.add_argument("--max-failures", type=int, metavar="N",
                   help="times Ray may restart failed workers from the last checkpoint "
                   "(default 1)")
    g.add_argument("--db", metavar="URL", help=DB_HELP)
    g.add_argument("--mlflow", metavar="URI",
                   help="also log metrics to this MLflow tracking URI (needs mlflow)")
    g.add_argument("--no-ray", action="store_true", default=None,
                   help="train in this process without Ray, even with RAY_ADDRESS set")
    g.add_argument("--in-process", action="store_true", default=None,
                   help="a tracked job with one worker in the job process (Ray Train's local "
                   "mode): no cluster to start, so it trains within seconds")


def take_job_options(args: argparse.Namespace) -> argparse.Namespace | None:
    """Remove the job options from ``args``; return them if the command should run on Ray.

    Training runs on Ray with ``--workers``, ``--ray-address`` or ``--in-process`` (or
    ``RAY_ADDRESS`` set), unless ``--no-ray``; the other job options then apply.

    Raises:
        SystemExit: job options given with ``--no-ray`` or without a reason to use Ray
            (argparse-style usage error, exit code 2).
    """
    import os

    opts = argparse.Namespace(**{k: getattr(args, k, None) for k in JOB_OPTIONS},
                              verbose=bool(getattr(args, "verbose", False)))
    for k in JOB_OPTIONS:
        if hasattr(args, k):
            delattr(args, k)
    on_ray = not opts.no_ray and bool(opts.workers or opts.ray_address or opts.in_process
                                      or os.environ.get("RAY_ADDRESS"))
    if not on_ray:
        given = [f"--{k.replace('_', '-')}" for k in JOB_OPTIONS
                 if k != "no_ray" and getattr(opts, k) is not None]
        if given:
            print(f"lungvit train: {', '.join(given)} only apply to training on Ray "
                  "(--workers N or --ray-address ADDR)", file=sys.stderr)
            raise SystemExit(2)
        return None
    return opts


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``runs`` sub-command and its actions."""
    p = sub.add_parser(
        "runs", help="list, inspect, compare, cancel, resume and promote fine-tune jobs",
        description="Fine-tune jobs tracked in the store (started by `lungvit train --workers "
        "N` or by the app): their status, metrics, checkpoints and events.")
    actions = p.add_subparsers(dest="runs_action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text, description=help_text)
        a.add_argument("--db", metavar="URL", help=DB_HELP)
        return a

    a = action("list", "a table of jobs, newest first")
    a.add_argument("--status", nargs="+", metavar="STATUS",
                   choices=("queued", "running", "succeeded", "failed", "cancelled",
                            "interrupted"), help="only jobs in these states")
    a.add_argument("--limit", type=positive_int, default=50, metavar="N",
                   help="at most N jobs (default 50)")
    a.set_defaults(func=cmd_list)

    a = action("show", "one job: configuration, metrics, checkpoints and latest events")
    a.add_argument("job", type=int, metavar="ID")
    a.add_argument("--events", type=int, default=EVENTS_SHOWN, metavar="N",
                   help=f"latest events shown (default {EVENTS_SHOWN})")
    a.set_defaults(func=cmd_show)

    a = action("compare", "final metrics of two jobs side by side")
    a.add_argument("job_a", type=int, metavar="A")
    a.add_argument("job_b", type=int, metavar="B")
    a.set_defaults(func=cmd_compare)

    a = action("cancel", "ask a job to stop (a running one stops within seconds)")
    a.add_argument("job", type=int, metavar="ID")
    a.set_defaults(func=cmd_cancel)

    a = action("resume", "continue an interrupted job from its last checkpoint")
    a.add_argument("job", type=int, metavar="ID")
    a.add_argument("--wait", action="store_true",
                   help="run it here with a progress bar instead of in the background")
    a.set_defaults(func=cmd_resume)

    a = action("promote", "mark a checkpoint of a job as the promoted one; print its path")
    a.add_argument("job", type=int, metavar="ID")
    a.add_argument("--version", type=int, metavar="V",
                   help="checkpoint version (default: the job's final model)")
    a.set_defaults(func=cmd_promote)


# ------------------------------------------------------------------------------ helpers
def _store(args: argparse.Namespace) -> Any:
    from lungvit.training.store import open_store

    return open_store(args.db)


def _when(ts: datetime | None) -> str:
    if ts is None:
        return "-"
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _recover(args: argparse.Namespace) -> None:
    """Mark interrupted the running jobs whose process stopped beating, by the rule the app
    applies at start, so the command line sees (and resumes) them without the app."""
    from lungvit.training.jobs.runner import DEFAULT_STALE_AFTER_S, recover_interrupted

    recovered = recover_interrupted(args.db)
    if recovered:
        print(f"job(s) {', '.join(map(str, recovered))}: no heartbeat for "
              f"{DEFAULT_STALE_AFTER_S:g} s, marked interrupted (`lungvit runs resume ID` "
              "continues one)", file=sys.stderr)


# ----------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    _recover(args)
    with _store(args) as store:
        jobs = store.list_jobs(status=args.status, limit=args.limit)
    if not jobs:
        print("no jobs")
        return exit_codes.OK
    rows = []
    for j in jobs:
        metrics = j.final_metrics or {}
        rows.append([str(j.id), j.name or "-", str(j.status), str(j.attempt),
                     _when(j.created_at), _when(j.finished_at or j.heartbeat_at),
                     _num(metrics.get("test/acc")), str(j.request_config.get("train", {})
                                                        .get("data", "-"))])
    print(_table(rows, ["ID", "NAME", "STATUS", "ATTEMPT", "CREATED", "LAST SEEN",
                        "TEST ACC", "DATA"]))
    return exit_codes.OK


def cmd_show(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    _recover(args)
    with _store(args) as store:
        job = store.get_job(args.job)
        series = store.metrics(args.job)
        ckpts = store.checkpoints(args.job)
        events = store.events(args.job)[-args.events:] if args.events > 0 else []
    print(f"job {job.id}{f' ({job.name})' if job.name else ''}: {job.status}, "
          f"attempt {job.attempt}" + (", cancel requested" if job.cancel_requested
                                      and not job.is_terminal else ""))
    for label, value in (("created", _when(job.created_at)), ("started", _when(job.started_at)),
                         ("heartbeat", _when(job.heartbeat_at)),
                         ("finished", _when(job.finished_at)), ("process", (
                             f"{job.hostname} pid {job.pid}" if job.pid else "-")),
                         ("ray", job.ray_address or "-"), ("run dir", job.run_dir or "-"),
                         ("data fingerprint", job.dataset_fingerprint or "-"),
                         ("model", job.result_checkpoint_path or "-")):
        print(f"  {label + ':':18}{value}")
    if job.error_text:
        print("error:\n  " + "\n  ".join(job.error_text.strip().splitlines()[-12:]))
    print("request:\n  " + json.dumps(job.request_config, sort_keys=True, default=str))
    if series:
        rows = []
        for name, points in sorted(series.items()):
            rows.append([name, str(len(points)), str(points[-1][0]), _num(points[-1][1]),
                         _num(_best(name, [v for _, v in points]))])
        print("metrics:\n" + _indent(_table(rows, ["NAME", "POINTS", "LAST STEP", "LAST",
                                                   "BEST"])))
    if job.final_metrics:
        print("final metrics:\n" + _indent(_table(
            [[k, _num(v)] for k, v in sorted(job.final_metrics.items())], ["NAME", "VALUE"])))
    if ckpts:
        rows = [[str(c.version), _num(c.metric_value), "*" if c.is_best else "",
                 "*" if c.promoted else "", c.sha256[:12],
                 c.path + ("" if Path(c.path).exists() else "  (deleted)")] for c in ckpts]
        print("checkpoints:\n" + _indent(_table(rows, ["VERSION", "VAL LOSS", "BEST",
                                                       "PROMOTED", "SHA256", "PATH"])))
    if events:
        print("events:")
        for e in events:
            print(f"  {_when(e.ts)}  {e.level:7}  {e.message}")
    return exit_codes.OK


def _best(name: str, values: list[float]) -> float | None:
    """The best value of a metric series: lowest loss or ECE, highest accuracy-like."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return None
    if any(k in name for k in ("loss", "ece")):
        return min(values)
    if any(k in name for k in ("acc", "f1", "auc", "top5")):
        return max(values)
    return None  # e.g. the learning rate


def _indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")


def cmd_compare(args: argparse.Namespace) -> int:
    with _store(args) as store:
        pairs = store.compare(args.job_a, args.job_b)
    if not pairs:
        print(f"neither job {args.job_a} nor job {args.job_b} has metrics yet")
        return exit_codes.OK
    rows = []
    for name, (a, b) in pairs.items():
        diff = b - a if a is not None and b is not None else None
        rows.append([name, _num(a), _num(b), "-" if diff is None else f"{diff:+.4g}"])
    print(_table(rows, ["METRIC", f"JOB {args.job_a}", f"JOB {args.job_b}", "B - A"]))
    return exit_codes.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from lungvit.training.jobs.runner import cancel_job
    from lungvit.training.store import JobStatus

    status = cancel_job(args.job, db_url=args.db)
    if status is JobStatus.CANCELLED:
        print(f"job {args.job}: cancelled")
    elif status is JobStatus.RUNNING:
        print(f"job {args.job}: cancel requested; it stops within seconds")
    else:
        print(f"job {args.job} is already {status}; nothing to cancel")
    return exit_codes.OK


def cmd_resume(args: argparse.Namespace) -> int:
    from lungvit.training.jobs import runner as jobs
    _recover(args)
    if args.wait:
        from lungvit.training.jobs.ray_sessions import reap_job_session

        with _store(args) as store:
            job = store.get_job(args.job)
        if job.status.value != "interrupted":
            raise jobs.JobError(f"job {args.job} is {job.status}; only an interrupted job can "
                                "be resumed")
        reap_job_session(job)
        return exit_codes.of_job(jobs.run_in_foreground(
            args.job, db_url=args.db, worker_logs=bool(getattr(args, "verbose", False))))
    proc = jobs.resume_job(args.job, db_url=args.db)
    print(f"job {args.job}: resuming in process {proc.pid}; follow it with "
          f"`lungvit runs show {args.job}`")
    return exit_codes.OK


def cmd_promote(args: argparse.Namespace) -> int:
    from lungvit.training.jobs.runner import promote_checkpoint, promote_result
    from lungvit.training.store import JobNotFoundError

    if args.version is not None:
        record = promote_checkpoint(args.job, args.version, db_url=args.db)
    else:
        record = promote_result(args.job, db_url=args.db)
        if record is None:
            raise JobNotFoundError(f"job {args.job} has no final model yet; name a "
                                   "checkpoint with --version")
    print(record.path)
    print(f"job {args.job}: checkpoint v{record.version} promoted", file=sys.stderr)
    return exit_codes.OK
