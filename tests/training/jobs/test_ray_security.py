"""The local Ray cluster: refused when unsafe; loopback-only and token-protected when started."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lungvit.training.jobs import ray_cluster
from lungvit.training.jobs.ray_cluster import ClusterOptions, RaySecurityError


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True),
                                            ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False),
                                            ("::", False), ("example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert ray_cluster.is_loopback(host) is loopback


def test_host_of_addresses() -> None:
    assert ray_cluster._host_of("127.0.0.1:6379") == "127.0.0.1"
    assert ray_cluster._host_of("http://127.0.0.1:8265/x") == "127.0.0.1"
    assert ray_cluster._host_of("[::1]:6379") == "::1"


@pytest.mark.parametrize("mode", ["disabled", "none", ""])
def test_refuses_authentication_off(mode: str) -> None:
    with pytest.raises(RaySecurityError, match="RAY_AUTH_MODE"):
        ray_cluster.check_local_settings(ClusterOptions(), {"RAY_AUTH_MODE": mode})


def test_accepts_token_mode_and_no_mode() -> None:
    ray_cluster.check_local_settings(ClusterOptions(), {"RAY_AUTH_MODE": "token"})
    ray_cluster.check_local_settings(ClusterOptions(), {})
    ray_cluster.check_local_settings(ClusterOptions(dashboard=True), {})  # on 127.0.0.1


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_refuses_a_dashboard_off_loopback(host: str) -> None:
    with pytest.raises(RaySecurityError, match="dashboard"):
        ray_cluster.check_local_settings(ClusterOptions(dashboard=True, dashboard_host=host),
                                          {})


def test_refuses_ray_listening_on_every_interface() -> None:
    with pytest.raises(RaySecurityError, match="every network interface"):
        ray_cluster.check_local_settings(ClusterOptions(),
                                          {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})


def test_connect_refuses_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaySecurityError):
        with ray_cluster.connect(ClusterOptions(num_cpus=1)):
            pytest.fail("connected")
    assert not ray_cluster.ray.is_initialized()


_CLUSTER = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    from lungvit.training.jobs.ray_cluster import ClusterOptions, connect, ray_descendants

    def listening(pids):
        inodes = set()
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").glob("*"):
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # LISTEN
                    found.append(f[1].split(":")[0])
        return found

    # A GCS client asks the cluster's control store for a key: it is refused at once
    # without the cluster's token (where ray.init would retry for minutes).
    probe = '''
    import sys
    from ray._raylet import GcsClient
    try:
        GcsClient(address=sys.argv[1]).internal_kv_get(b"probe", None, timeout=30)
    except Exception as exc:
        print(type(exc).__name__, exc)
        sys.exit(1)
    print("connected")
    '''
    with connect(ClusterOptions(num_cpus=1)) as cluster:
        hosts = listening([os.getpid(), *ray_descendants()])
        token = os.environ["RAY_AUTH_TOKEN"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        def run(extra):
            done = subprocess.run([sys.executable, "-c", probe, cluster.address], timeout=120,
                                  env={**env, **extra}, capture_output=True, text=True)
            return [done.returncode, done.stdout[:300]]
        wrong = run({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
        none = run({})
        right = run({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    print(json.dumps({"address": cluster.address, "hosts": hosts,
                      "wrong": wrong, "none": none, "right": right,
                      "left": ray_descendants()}))
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_cluster_is_loopback_only_and_needs_its_token(popen) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = popen([sys.executable, "-c", _CLUSTER], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["address"].startswith("127.0.0.1:")
    # Every listening socket of the cluster is on 127.0.0.1 (IPv4, or IPv4-mapped IPv6).
    assert result["hosts"] and all(h in ("0100007F", "0000000000000000FFFF00000100007F")
                                   for h in result["hosts"]), result["hosts"]
    for refused in ("wrong", "none"):
        code, text = result[refused]
        assert code == 1 and text.startswith("AuthenticationError"), result[refused]
    assert result["right"] == [0, "connected\n"], result["right"]
    assert result["left"] == []  # nothing outlives the cluster
