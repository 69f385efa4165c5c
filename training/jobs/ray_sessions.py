"""Ray processes that outlived a killed job: found through its session folder, and ended.

A job process killed without warning (SIGKILL, the OOM killer) cannot shut its local Ray
cluster down. Most of Ray's processes follow it, but some (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) keep running under PID 1, one of them listening on loopback, and
ignore SIGTERM. When such a job is recovered (marked interrupted) or resumed, they are
ended: the processes of *that* cluster only, found through its session folder (Ray names
it ``session_<time>_<pid of the process that started it>`` under its temporary folder,
and every Ray process of the cluster writes its logs there), never by name.

Linux only (it reads ``/proc``); elsewhere nothing is found and nothing is ended. This
module does not import Ray (the app recovers jobs without loading it).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def ray_temp_root() -> Path:
    """Ray's temporary folder on this machine (Ray's own rule: ``$RAY_TMPDIR``, else
    ``$TMPDIR`` on Linux, else ``/tmp``; then ``ray``)."""
    base = os.environ.get("RAY_TMPDIR")
    if base is None and sys.platform.startswith("linux"):
        base = os.environ.get("TMPDIR")
    return Path(base or "/tmp") / "ray"


def session_dirs(pid: int, gcs_port: int | None = None,
                 root: Path | None = None) -> list[Path]:
    """The session folders of the clusters started by process ``pid``.

    Args:
        pid: the process that called ``ray.init`` (a job process).
        gcs_port: the cluster's GCS port, if known: a folder whose recorded port differs
            (a cluster of an older process that had the same pid) is left out.
        root: Ray's temporary folder (default :func:`ray_temp_root`).

    Returns:
        The folders (usually one).
    """
    root = root or ray_temp_root()
    found = []
    for folder in sorted(root.glob(f"session_*_{int(pid)}")):
        if folder.is_symlink() or not folder.is_dir():
            continue  # session_latest
        if gcs_port is not None:
            ports = {p.read_text().strip() for p in folder.glob("gcs_server_port_*")
                     if p.is_file()}
            if ports and str(gcs_port) not in ports:
                continue
        found.append(folder)
    return found


def session_processes(session_dir: Path) -> list[int]:
    """This user's processes (other than this one) that write to files inside
    ``session_dir``: the processes of that Ray cluster (each writes its logs there; a
    program merely reading a log is not one)."""
    inside = str(session_dir.resolve()) + os.sep
    me, uid = os.getpid(), os.getuid()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        try:
            if pid == me or proc.stat().st_uid != uid:
                continue
            fds = os.listdir(proc / "fd")
        except OSError:  # gone, or not ours to read
            continue
        if any(_writes_inside(proc, fd, inside) for fd in fds):
            pids.append(pid)
    return pids


def _writes_inside(proc: Path, fd: str, inside: str) -> bool:
    """Whether descriptor ``fd`` of ``proc`` is a file under ``inside`` open for writing."""
    try:
        if not os.readlink(proc / "fd" / fd).startswith(inside):
            return False
        flags = next(line.split()[1] for line in (proc / "fdinfo" / fd).read_text()
                     .splitlines() if line.startswith("flags:"))
    except (OSError, StopIteration, IndexError):  # closed or gone since
        return False
    return int(flags, 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; its parent has yet to collect it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def end_processes(pids: Iterable[int], grace_s: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, then SIGKILL those still running after ``grace_s`` seconds.

    Returns:
        The pids that were running.
    """
    running = [p for p in pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in running:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p) for p in running):
            time.sleep(0.05)
        if not any(_alive(p) for p in running):
            break
    return running


def reap_job_session(job: Any, root: Path | None = None) -> list[int]:
    """End what is left of the local Ray cluster of a job whose process is gone.

    Nothing is done for a job that ran on another machine or on an existing cluster (not
    on loopback), or whose process still runs (its cluster is its own to stop).

    Args:
        job: the job's record (``pid``, ``hostname``, ``ray_address``).
        root: Ray's temporary folder (default :func:`ray_temp_root`).

    Returns:
        The pids ended.
    """
    pid, address = getattr(job, "pid", None), getattr(job, "ray_address", None) or ""
    if not pid or getattr(job, "hostname", None) != socket.gethostname() or _alive(pid):
        return []
    host, _, port = address.rpartition(":")
    try:
        if not ipaddress.ip_address(host.strip("[]")).is_loopback:
            return []
    except ValueError:
        return []
    pids = sorted({p for folder in session_dirs(pid, int(port) if port.isdigit() else None,
                                                root)
                   for p in session_processes(folder)})
    ended = end_processes(pids)
    if ended:
        log.info("ended %d Ray process(es) left by job %s's killed process: %s",
                 len(ended), getattr(job, "id", "?"), ended)
    return ended
