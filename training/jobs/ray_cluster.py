"""Ray clusters for LungViT's jobs: a local one started safely, or an existing one.

:func:`connect` gives the job process a Ray cluster: by default a local one it starts
itself, listening on 127.0.0.1 only, without a dashboard, with token authentication on (a
fresh random token, handed to Ray's processes through the environment); or an existing
cluster (``--ray-address`` / ``RAY_ADDRESS``), whose security is its operator's.

A local cluster is kept on 127.0.0.1 the way Ray keeps one on a laptop (Ray's
``ENABLE_RAY_CLUSTER`` switch, also passed to its processes as
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and :func:`connect` checks the addresses it
came up on before using it. Training on the cluster is :mod:`lungvit.training.jobs.ray_train`.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants
from ray._raylet import AuthenticationMode, Config, get_authentication_mode

from lungvit.core.errors import LungViTError
from lungvit.core.netaddr import host_of as _host_of
from lungvit.core.netaddr import is_loopback
from lungvit.training.jobs.ray_address import check_address

log = logging.getLogger(__name__)


class RaySecurityError(LungViTError):
    """LungViT refuses to start Ray this way (authentication off, an exposed dashboard, ...)."""


@dataclass(frozen=True)
class ClusterOptions:
    """Which Ray cluster a job uses.

    Args:
        address: an existing cluster (``host:port`` or ``ray://...``); None: ``RAY_ADDRESS``
            if set, else a local cluster started by the job.
        num_cpus, num_gpus: resources of the local cluster (None: what the machine has).
        dashboard: start the local cluster's dashboard.
        dashboard_host: where the dashboard listens; must be a loopback address.
        log_to_driver: print the workers' output in this process (else it stays in Ray's
            session logs).
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    log_to_driver: bool = True

    def resolved_address(self, environ: Mapping[str, str] = os.environ) -> str | None:
        return self.address or environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class Cluster:
    """The cluster a job is connected to."""

    address: str
    local: bool
    resources: dict[str, float] = field(default_factory=dict)


def check_local_settings(opts: ClusterOptions, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse to start a local Ray with authentication off or a dashboard off loopback.

    Raises:
        RaySecurityError: saying which setting and what to do instead.
    """
    mode = environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        raise RaySecurityError(
            f"refusing to start Ray with RAY_AUTH_MODE={mode}: anyone who can reach its ports "
            "could run code as you. Unset RAY_AUTH_MODE (LungViT then uses token "
            "authentication) or set RAY_AUTH_MODE=token.")
    if opts.dashboard and not is_loopback(opts.dashboard_host):
        raise RaySecurityError(
            f"refusing to start the Ray dashboard on {opts.dashboard_host}: it would be "
            "reachable from other machines. Use 127.0.0.1 (and an SSH tunnel to reach it).")
    flag = environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "").strip().lower()
    if flag in ("1", "true", "yes"):
        raise RaySecurityError(
            "refusing to start Ray with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER set: it makes Ray "
            "listen on every network interface. Unset it, or start a cluster yourself and "
            "pass --ray-address.")


@contextmanager
def connect(opts: ClusterOptions) -> Iterator[Cluster]:
    """Connect this process to Ray for the duration of the block, then disconnect.

    A local cluster started here is shut down on exit (with every worker it ran).

    Raises:
        RaySecurityError: a local cluster would be unsafe, or did not come up loopback-only
            with token authentication.
        RayAddressError: the given cluster does not answer or refuses this process's token.
    """
    address = opts.resolved_address()
    local = address is None
    if local:
        check_local_settings(opts)
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Ray's single-machine mode: this node's address is 127.0.0.1 (its processes read
        # the variable, this one the constant, which Ray read when it was imported).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray caches its configuration; re-read it so this process talks in token mode too
        # (what ray.init does itself when it turns token authentication on).
        Config.initialize("")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ctx = ray.init(address="local", num_cpus=opts.num_cpus, num_gpus=opts.num_gpus,
                       include_dashboard=opts.dashboard, dashboard_host=opts.dashboard_host,
                       _node_ip_address="127.0.0.1", log_to_driver=opts.log_to_driver,
                       configure_logging=False)
    else:
        check_address(address)
        ctx = ray.init(address=address, log_to_driver=opts.log_to_driver,
                       configure_logging=False)
    try:
        gcs = ctx.address_info.get("gcs_address") or address or ""
        if local:
            _verify_local(ctx.address_info)
        resources = {k: float(v) for k, v in ray.cluster_resources().items()
                     if k in ("CPU", "GPU", "memory", "object_store_memory")}
        yield Cluster(address=gcs, local=local, resources=resources)
    finally:
        # Listed before the shutdown: once the raylet is gone its workers have a new parent.
        started = ray_descendants() if local else []
        ray.shutdown()
        _reap(started)


def _verify_local(info: Mapping[str, Any]) -> None:
    """Check that the cluster just started is loopback-only and token-protected."""
    for key in ("node_ip_address", "gcs_address"):
        value = str(info.get(key) or "")
        if not is_loopback(_host_of(value)):
            raise RaySecurityError(f"the local Ray cluster came up on {value} ({key}), not "
                                   "on 127.0.0.1; LungViT stopped it")
    if info.get("webui_url") and not is_loopback(_host_of(str(info["webui_url"]))):
        raise RaySecurityError(f"the Ray dashboard came up on {info['webui_url']}; stopped")
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise RaySecurityError("the local Ray cluster came up without token authentication; "
                               "LungViT stopped it")


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process (from /proc; empty where there is none)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            ppid = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.parent.name))
    return tree


def ray_descendants(pid: int | None = None) -> list[int]:
    """Ray's processes (raylet, GCS, workers, ...) below process ``pid`` (default: this one).

    Linux only (/proc); elsewhere an empty list.
    """
    tree, out, todo = _children(), [], [os.getpid() if pid is None else pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray" in cmd:  # ray::<actor>, .../ray/core/src/ray/raylet/raylet, ...
                out.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _reap(pids: list[int], timeout_s: float = 3.0) -> None:
    """Wait a moment for a stopped local cluster's processes to exit, then kill what is
    left, so a stopped job leaves no worker behind."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        log.warning("killed %d Ray process(es) that outlived ray.shutdown()", len(left))
