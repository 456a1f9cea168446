"""ray_configs/launch_multinode.sh on one machine with two Ray nodes (head + worker)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "ray_configs" / "launch_multinode.sh"


def sh(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, "RAY_AUTH_MODE": "token"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_two_nodes_serve_and_stop_cleanly(tmp_path):
    port = free_port()
    cache = str(tmp_path / "models")
    try:
        up = sh("up", "--workers", "1", "--num-cpus", "1", "--http-port", str(port), "--model", "tiny-llama",
                "--cache-dir", cache, "--num-replicas", "2", "--max-model-len", "512",
                "--engine-worker-queue-port", "0", "--cache-queue-port", "0")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        replicas = set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for i in range(8):
                r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": f"node test {i} " * 5,
                                                    "max_tokens": 4})
                assert r.status_code == 200, r.text
                replicas.add(r.headers["x-radixserve-replica"])
        assert len(replicas) == 2
        # where do the replicas run? ask them through a driver on the cluster
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "RAY_AUTH_MODE": "token"})
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(set(nodes.values())) == 2, nodes  # one replica on each node
    finally:
        assert sh("stop").returncode == 0
        assert sh("stop").returncode == 0  # idempotent
    assert subprocess.run(["pgrep", "-f", "raylet"], capture_output=True).returncode == 1  # nothing left


PROBE = """
import json, ray
from ray import serve
from radixserve.cluster.replica_wire import decode_info
ray.init(address="auto", namespace="serve", logging_level="ERROR")
h = serve.get_deployment_handle("LLMServer", app_name="radixserve")
seen = {}
for _ in range(40):
    info = decode_info(h.get_info.remote().result())
    seen[info.replica_id] = info.node_id
    if len(seen) == 2:
        break
print(json.dumps(seen))
"""
