"""What keeps the app safe to run on a workstation: loopback checks, auth, Host checks.

A local web app is reachable from every page the user's browser opens. DNS rebinding lets
such a page talk to ``127.0.0.1`` under a foreign name, so every request whose ``Host``
header is not the loopback name or a name the server was bound to is refused.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


class AuthError(ValueError):
    """An ``--auth`` value that cannot be used (the message says why)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine.

    Args:
        host: ``127.0.0.1``, ``::1``, ``localhost``, ``0.0.0.0``, a host name...

    Returns:
        True for loopback addresses and names that resolve only to loopback addresses.
        ``0.0.0.0`` and ``::`` (every interface) are not loopback.
    """
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addresses)


def _parse_pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise AuthError(f"{where}: expected USER:PASSWORD")
    if len(password) < 8:
        raise AuthError(f"{where}: the password of {user.strip()!r} is shorter than 8 "
                        "characters")
    return user.strip(), password


def parse_auth(value: str) -> list[tuple[str, str]]:
    """Read ``--auth``: ``USER:PASSWORD``, or a file with one ``USER:PASSWORD`` per line.

    A value that names an existing file is read as a file (blank lines and ``#`` comments
    skipped), so a password never has to appear on the command line.

    Args:
        value: the option's value.

    Returns:
        The (user, password) pairs, at least one.

    Raises:
        AuthError: malformed pairs, short passwords, or an empty file.
    """
    path = Path(value).expanduser()
    if path.is_file():
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                pairs.append(_parse_pair(line, f"{path.name} line {n}"))
        if not pairs:
            raise AuthError(f"{path.name} holds no USER:PASSWORD line")
        return pairs
    return [_parse_pair(value, "--auth")]


def allowed_host_names(bound_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` names the app answers to: loopback names plus the bound host's own."""
    names = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in extra}
    bound = bound_host.lower().strip("[]")
    if bound not in ("0.0.0.0", "::", ""):
        names.add(bound)
    else:  # every interface: the machine's own names and addresses
        names.add(socket.gethostname().lower())
        names.add(socket.getfqdn().lower())
        try:
            names.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
        except socket.gaierror:
            pass
    return frozenset(names)


def host_of(header: str) -> str:
    """The name in a ``Host`` header, without the port (``[::1]:7860`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    """ASGI middleware refusing HTTP and websocket requests with a foreign ``Host``.

    Args:
        app: the wrapped ASGI application.
        allowed: host names (no ports) that are accepted.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                await self._refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"Refused: this LungViT server does not answer to that host name.\n"
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
