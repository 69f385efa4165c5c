"""The job process: ``python -m lungvit.cli.job_process --job-id N``.

:func:`lungvit.training.jobs.runner.launch_job` and ``resume_job`` start it, detached, for
the app and ``lungvit runs resume``; it runs one job from the tracking store with
:func:`~lungvit.training.jobs.runner.run_job` and exits with a code of
:mod:`lungvit.cli.exit_codes`: 0 the job succeeded, 3 it failed or could not run, 1 it was
cancelled or interrupted, 130 the process itself was interrupted (SIGINT).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from lungvit.cli import exit_codes
from lungvit.core.errors import LungViTError
from lungvit.training.jobs.runner import DEFAULT_HEARTBEAT_S, run_job

PROG = "python -m lungvit.cli.job_process"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run one queued LungViT fine-tune job from the tracking store (or resume "
        "an interrupted one) in this process. The app and `lungvit runs resume` start it.")
    parser.add_argument("--job-id", type=int, required=True, help="the job to run")
    parser.add_argument("--db", metavar="URL", help="the store (default: the user's SQLite "
                        "file)")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, metavar="S",
                        help=f"seconds between heartbeats (default {DEFAULT_HEARTBEAT_S:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one job here (``--job-id N [--db URL] [--heartbeat S]``); return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    # A process started in the background may inherit SIGINT ignored; cancelling relies on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = run_job(args.job_id, db_url=args.db, heartbeat_s=args.heartbeat)
    except LungViTError as exc:
        print(f"job {args.job_id}: {exc}", file=sys.stderr)
        return exit_codes.ERROR
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    print(f"job {args.job_id}: {status}")
    return exit_codes.of_job(status)


if __name__ == "__main__":
    sys.exit(main())
