"""A Ray cluster of several nodes on this machine for the tests (run as a script).

    python _ray_cluster.py WORKER_NODES TEMP_DIR

Starts a head node without CPUs (it runs Ray's own actors, never a training worker) and
WORKER_NODES worker nodes of one CPU each, all with ``ray.cluster_utils.Cluster`` on
127.0.0.1 only (Ray's single-machine mode keeps every node's address on loopback) and with
token authentication (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from the environment).
Prints one JSON line: ``{"address": ..., "workers": [node ids]}``, then obeys lines on
stdin: ``kill I`` kills worker node I at once (its raylet and its workers, as if the machine
died) and prints ``killed I``; end of input shuts the cluster down.
"""
from __future__ import annotations

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if len(sys.argv) > 2:  # sessions, sockets and the address file there, not in /tmp/ray
    os.environ["RAY_TMPDIR"] = sys.argv[2]

from ray.cluster_utils import Cluster  # noqa: E402


def main() -> None:
    n, temp_dir = int(sys.argv[1]), sys.argv[2]
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        raise SystemExit("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
    common = {"node_ip_address": "127.0.0.1", "temp_dir": os.path.join(temp_dir, "ray"),
              "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**common, "num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(**common, num_cpus=1) for _ in range(n)]
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address,
                      "workers": [node.node_id for node in workers]}), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "kill":
            cluster.remove_node(workers[int(arg)], allow_graceful=False)
            print(f"killed {arg}", flush=True)
    cluster.shutdown()


if __name__ == "__main__":
    main()
