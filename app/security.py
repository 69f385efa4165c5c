"""What keeps the app safe to run on a workstation: loopback checks, auth, Host and
Origin checks.

A local web app is reachable from every page the user's browser opens. DNS rebinding lets
such a page talk to ``127.0.0.1`` under a foreign name, so every request whose ``Host``
header is not the loopback name or a name the server was bound to is refused. A page can
also send a plain form POST to ``http://127.0.0.1:7860/`` under the right name (the
browser does not ask first), so every state-changing request (any method but GET, HEAD
and OPTIONS, and every websocket) whose ``Origin`` (or, without one, ``Referer``) is not
the app's own origin is refused. Clients that are not browsers (``gradio_client``,
``curl``) send neither header and are not affected.
"""
from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lungvit.core.errors import LungViTError
from lungvit.core.netaddr import host_of, is_loopback  # noqa: F401 (is_loopback: for app.main)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


class AuthError(ValueError):
    """An ``--auth`` value that cannot be used (the message says why)."""


class AccessRefused(LungViTError, PermissionError):
    """A request this server is not set up to allow (the message says which option would)."""


@dataclass(frozen=True)
class ServerPolicy:
    """What a client of the app may ask of the server it runs on.

    On loopback (the default) the user sits at the server: any folder of it can be a
    dataset and patient identifiers are shown on request. A server reachable from the
    network (``exposed``) reads folders only under ``data_roots`` (``--data-root``; uploaded
    zips always work) and shows identifiers only when started with ``--allow-phi``.

    Attributes:
        exposed: the server listens on a non-loopback address.
        allow_phi: identifiers may be shown on request even though it is exposed.
        data_roots: folders under which datasets may be read; when given they apply on
            loopback too.
    """

    exposed: bool = False
    allow_phi: bool = False
    data_roots: tuple[Path, ...] = ()

    @property
    def phi_allowed(self) -> bool:
        """Whether clients may ask to see patient identifiers (loopback, or ``--allow-phi``)."""
        return not self.exposed or self.allow_phi

    def check_phi(self, requested: bool) -> None:
        """Refuse a request to show patient identifiers that this server may not grant.

        Raises:
            AccessRefused: identifiers were requested from an exposed server started
                without ``--allow-phi``.
        """
        if requested and not self.phi_allowed:
            raise AccessRefused("This server does not show patient identifiers: it is "
                                "reachable from the network and was started without "
                                "--allow-phi")

    def check_folder(self, folder: str | Path) -> Path:
        """The dataset folder a client named, if this server may read it.

        Args:
            folder: a folder on the server.

        Returns:
            The folder, resolved (symbolic links followed).

        Raises:
            AccessRefused: it is outside the configured roots, or the server is exposed and
                has none.
        """
        path = Path(folder).expanduser().resolve()
        if not self.data_roots and not self.exposed:
            return path
        if not self.data_roots:
            raise AccessRefused("This server reads no folders of its own: it is reachable "
                                "from the network and was started without --data-root. "
                                "Upload the dataset as a zip instead")
        if any(path.is_relative_to(root.expanduser().resolve()) for root in self.data_roots):
            return path
        roots = ", ".join(str(r) for r in self.data_roots)
        raise AccessRefused(f"This server reads dataset folders only under {roots} "
                            "(--data-root); upload other datasets as a zip")


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


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(header: str, default_port: int | None) -> tuple[str, int | None]:
    """``host[:port]`` -> (lower-case host, port or ``default_port``)."""
    name = host_of(header)
    header = header.strip().lower()
    tail = header[header.find("]") + 1:] if header.startswith("[") else (
        header if header.count(":") == 1 else "")
    port = tail.rsplit(":", 1)[1] if ":" in tail else ""
    return name, int(port) if port.isdigit() else default_port


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a request's ``Origin`` (or ``Referer``) is the origin the request was sent to.

    Args:
        origin: the header's value (``http://127.0.0.1:7860``, a full Referer URL, ``null``).
        host_header: the request's ``Host`` header.

    Returns:
        True when the scheme is http(s) and the origin's host and port are the Host
        header's (the port defaulting to the scheme's). ``null`` and anything else: False.
    """
    try:
        parts = urlsplit(origin.strip())
        default = DEFAULT_PORTS.get(parts.scheme.lower())
        if default is None or not parts.hostname:
            return False
        return (parts.hostname.lower(), parts.port or default) == _host_port(host_header,
                                                                              default)
    except ValueError:  # a malformed port or address
        return False


class HostCheckMiddleware:
    """ASGI middleware refusing HTTP and websocket requests with a foreign ``Host``, and
    state-changing requests from another origin (see the module docstring).

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
            raw_host = headers.get(b"host", b"").decode("latin-1")
            # A Host header is host[:port]; host_of would also read a URL's host, which
            # this check has always refused.
            if "://" in raw_host or host_of(raw_host) not in self.allowed:
                await self._refuse(scope, receive, send, 421,
                                   "this LungViT server does not answer to that host name")
                return
            writes = scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS
            source = headers.get(b"origin", headers.get(b"referer"))
            if writes and source is not None and not same_origin(source.decode("latin-1"),
                                                                 raw_host):
                await self._refuse(scope, receive, send, 403,
                                   "this LungViT server takes no requests from other sites")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int,
                      why: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = f"Refused: {why}.\n".encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
