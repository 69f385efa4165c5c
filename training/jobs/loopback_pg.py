"""torch.distributed on loopback: a job on a local Ray cluster listens on 127.0.0.1 only.

torch's ``env://`` rendezvous starts its store server (``TCPStore``) on every interface
(``::``), whatever ``MASTER_ADDR`` says, and gloo and NCCL choose their interface from the
host name, which may resolve to the machine's network address. So during every job a
training worker listened on ``*:PORT`` for anyone on the network. When ``MASTER_ADDR`` is a
loopback address (a local cluster: Ray's node address is 127.0.0.1), the process group
made here instead gets a store whose listening socket is bound to that address (handed to
``TCPStore`` as ``master_listen_fd``) and gloo and NCCL use the loopback interface.

This module imports torch and :mod:`lungvit.core.netaddr` only;
:mod:`lungvit.training.jobs.ray_train` runs :func:`install` in every Ray Train worker before
Ray sets the process group up.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lungvit.core.netaddr import is_loopback as is_loopback_address

DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch's own default for gloo and NCCL


def loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on BSD and macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def loopback_store(addr: str, port: int, world_size: int, rank: int,
                   timeout: timedelta | None = None) -> dist.TCPStore:
    """The rendezvous store of a process group whose master is on a loopback address.

    Rank 0 binds the listening socket to ``addr`` itself and hands it to ``TCPStore``
    (which otherwise listens on every interface); the other ranks connect to it.

    Args:
        addr: the master's loopback address (``MASTER_ADDR``).
        port: its port (``MASTER_PORT``).
        world_size: processes in the group.
        rank: this process's rank.
        timeout: how long to wait for the others.

    Returns:
        The store, for ``init_process_group(store=...)``.
    """
    timeout = timeout or DEFAULT_TIMEOUT
    host = addr.strip("[]")
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=max(128, world_size))
    return dist.TCPStore(host, port, world_size, True, timeout,
                         master_listen_fd=listener.detach())  # the store owns the socket now


def install() -> None:
    """Make ``torch.distributed.init_process_group`` of this process keep an ``env://``
    group with a loopback ``MASTER_ADDR`` on loopback (once per process; other groups,
    e.g. on a cluster of several machines, are set up as before)."""
    original = dist.init_process_group
    if getattr(original, "lungvit_loopback", False):
        return

    def init_process_group(backend: Any = None, init_method: str | None = None,
                           timeout: timedelta | None = None, world_size: int = -1,
                           rank: int = -1, store: Any = None, **kwargs: Any) -> Any:
        addr = os.environ.get("MASTER_ADDR", "")
        if store is None and init_method == "env://" and is_loopback_address(addr):
            interface = loopback_interface()
            if interface is not None:  # gloo's and NCCL's own sockets
                os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
                os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
            store = loopback_store(addr, int(os.environ["MASTER_PORT"]), world_size, rank,
                                   timeout)
            init_method = None
        return original(backend=backend, init_method=init_method, timeout=timeout,
                        world_size=world_size, rank=rank, store=store, **kwargs)

    init_process_group.lungvit_loopback = True  # type: ignore[attr-defined]
    dist.init_process_group = init_process_group
