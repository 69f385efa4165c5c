"""A process group with a loopback MASTER_ADDR listens on loopback only (no ``*:PORT``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from lungvit.training.jobs.loopback_pg import is_loopback_address, loopback_interface

_GROUP = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
if sys.argv[2] == "loopback":
    from lungvit.training.jobs import loopback_pg
    loopback_pg.install()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the listing's own descriptor, closed since
        continue
    if link.startswith("socket:["):
        inodes.add(link[8:-1])
found = [line.split()[1] for table in ("/proc/net/tcp", "/proc/net/tcp6")
         for line in Path(table).read_text().splitlines()[1:]
         if line.split()[3] == "0A" and line.split()[9] in inodes]
dist.destroy_process_group()
print(json.dumps(found))
"""
LOOPBACK = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")


def _listening(mode: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    done = subprocess.run([sys.executable, "-c", _GROUP, str(port), mode], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc")
def test_process_group_listens_on_loopback_only() -> None:
    found = _listening("loopback")
    assert found and all(addr.split(":")[0] in LOOPBACK for addr in found), found
    # torch's own env:// rendezvous: its store listens on every interface ("::").
    plain = _listening("plain")
    assert any(addr.split(":")[0].strip("0") == "" for addr in plain), plain


def test_loopback_names() -> None:
    assert is_loopback_address("127.0.0.1") and is_loopback_address("::1")
    assert not is_loopback_address("10.0.0.5") and not is_loopback_address("0.0.0.0")
    assert loopback_interface() in ("lo", "lo0", None)
