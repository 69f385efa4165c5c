"""Which host an address names, and whether it is loopback: one rule for the app and Ray.

The rule is literal: a loopback IP address (127.0.0.0/8, ``::1``, as :mod:`ipaddress`
says) or the name ``localhost``. Other names are not resolved: an answer that depends on
DNS at the moment of asking could differ from what a later bind or connect resolves, and
these answers guard what is reachable from the network.
"""
from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only.

    Args:
        host: an address or name without a port (``127.0.0.1``, ``::1``, ``[::1]``,
            ``localhost``, ``0.0.0.0``...); surrounding spaces and brackets are ignored.

    Returns:
        True for loopback IP addresses and ``localhost`` (any case); False for every other
        name (not resolved), for ``0.0.0.0`` and ``::`` (every interface) and for text that
        is no address.
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """The host in an address, lower-case, without brackets, port or path.

    Args:
        address: ``host``, ``host:port``, ``[v6]``, ``[v6]:port``, a bare IPv6 address, or
            ``scheme://`` followed by one of those and an optional ``/path`` (a path is
            only looked for after a scheme, as an HTTP ``Host`` header has none).

    Returns:
        ``127.0.0.1:7860`` -> ``127.0.0.1``, ``[::1]:6379`` -> ``::1``,
        ``http://LocalHost:8265/x`` -> ``localhost``. Text it cannot split (``[::1`` without
        its ``]``) comes back whole, lower-cased.
    """
    text = address.strip().lower()
    if "://" in text:
        text = text.split("://", 1)[1].split("/", 1)[0]
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
