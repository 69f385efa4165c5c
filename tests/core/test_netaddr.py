"""One loopback rule and one host parser for the app's Host check, Ray and torch.distributed."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from lungvit.core.netaddr import host_of, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.8.0.1", "127.255.255.254",
                                  "::1", "[::1]", " ::1 ", "0:0:0:0:0:0:0:1", "localhost",
                                  "LocalHost", " localhost "])
def test_loopback(host: str) -> None:
    assert is_loopback(host) is True


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.1.2.3", "192.168.0.5",
                                  "128.0.0.1", "2001:db8::1", "example.org", "", "   ",
                                  "127.0.0.1:80", "localhost:80", "localhost.example.org",
                                  "ip6-localhost", "127.0.0.1 evil"])
def test_not_loopback(host: str) -> None:
    assert is_loopback(host) is False


def test_names_are_not_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(*args: object, **kwargs: object) -> None:
        raise AssertionError("is_loopback must not ask DNS")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "gethostbyname", resolve)
    assert not is_loopback("a-name-in-etc-hosts-for-127.0.1.1")
    assert is_loopback("localhost")


def test_ipv4_mapped_loopback_follows_ipaddress() -> None:
    # ipaddress says True from Python 3.13 and False before; the rule adds nothing of its own.
    expected = ipaddress.ip_address("::ffff:127.0.0.1").is_loopback
    assert is_loopback("::ffff:127.0.0.1") is expected
    assert is_loopback("[::ffff:127.0.0.1]") is expected
    assert not is_loopback("::ffff:10.0.0.1")


@pytest.mark.parametrize("address, host", [
    ("127.0.0.1", "127.0.0.1"),                      # host
    ("127.0.0.1:7860", "127.0.0.1"),                 # host:port
    ("evil.example:80", "evil.example"),
    ("LocalHost", "localhost"),                      # lower-cased
    (" LocalHost:7860 ", "localhost"),
    ("[::1]:7860", "::1"),                           # [v6]:port
    ("[::1]", "::1"),                                # [v6]
    ("::1", "::1"),                                  # a bare IPv6 address
    ("fe80::1", "fe80::1"),
    ("http://127.0.0.1:8265/x", "127.0.0.1"),        # scheme://host:port/path
    ("http://127.0.0.1:8265", "127.0.0.1"),
    ("https://Example.org/a:b", "example.org"),
    ("http://[::1]:8265/", "::1"),
    ("ray://10.0.0.5:10001", "10.0.0.5"),
    ("http://localhost/", "localhost"),
    ("[::1", "[::1"),                                # unsplittable: whole
    ("127.0.0.1/x", "127.0.0.1/x"),                  # a path only after a scheme
    ("", ""),
])
def test_host_of(address: str, host: str) -> None:
    assert host_of(address) == host


def test_parser_and_rule_together() -> None:
    for address in ("127.0.0.1:6379", "[::1]:6379", "http://127.0.0.1:8265/x", "localhost:7860"):
        assert is_loopback(host_of(address)), address
    for address in ("0.0.0.0:6379", "[::]:6379", "http://10.0.0.5:8265", "evil.example:80"):
        assert not is_loopback(host_of(address)), address
