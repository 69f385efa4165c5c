"""Is there a Ray cluster at ``--ray-address``, and does it take this process's token?

Asked once, before a job is queued or connects (``ray.init`` itself retries an address that
does not answer, or refuses the token, for minutes): each problem is one line saying what to
fix (:class:`RayAddressError`, exit code 3 in the CLI).
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lungvit.core.errors import LungViTError


class RayAddressError(LungViTError):
    """The Ray cluster at ``--ray-address`` / ``RAY_ADDRESS`` does not answer or refuses us."""


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send this process's file descriptor 2 to /dev/null for the block (C++ logging)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """Check that a Ray cluster answers at ``address`` and accepts this process's token.

    ``ray.init`` retries a cluster that does not answer (or refuses the token) for minutes;
    this asks the cluster's control store (GCS) for a key once, which a cluster with token
    authentication refuses at once without its token. ``auto`` and ``ray://`` addresses
    are left to Ray (the second only has its port checked).

    Raises:
        RayAddressError: one line saying what is wrong and what to fix.
    """
    address = address.strip()
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    netloc = address.removeprefix("ray://").split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in netloc:
        raise RayAddressError(f"--ray-address {address!r} is not HOST:PORT (the head node's "
                              "GCS address, e.g. 127.0.0.1:6379, printed by `ray start "
                              "--head`)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayAddressError(f"no Ray cluster answers at {netloc} ({exc.strerror or exc}): "
                              "start it (`ray start --head`) or fix --ray-address / "
                              "RAY_ADDRESS") from None
    if client:
        return
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_stderr():  # Ray's C++ client logs its refusal there too
            client_ = GcsClient(address=netloc)
            client_.internal_kv_get(b"lungvit-probe", None, timeout=timeout_s)
            del client_
    except AuthenticationError:
        raise RayAddressError(f"the Ray cluster at {netloc} refused this process's token: "
                              "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                              "RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
    except Exception as exc:  # a timeout, or another service on that port
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RayAddressError(f"no Ray cluster answers at {netloc} ({first}): check "
                              "--ray-address / RAY_ADDRESS") from None
