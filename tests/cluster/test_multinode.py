"""ray_configs/launch_multinode.sh on one machine with two Ray nodes (head + worker)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.cluster.helpers import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "ray_configs" / "launch_multinode.sh"


def sh(*args, temp_dir: str, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, "RAY_AUTH_MODE": "token", "RAY_TEMP_DIR": temp_dir}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def ours(temp_dir: str) -> list[str]:
    """PIDs of processes under this test's Ray temp dir (other Ray clusters here are not ours)."""
    r = subprocess.run(["pgrep", "-f", temp_dir + "/"], capture_output=True, text=True)
    return r.stdout.split()


def test_two_nodes_serve_and_stop_cleanly(tmp_path_factory):
    port = free_port()
    cache = str(tmp_path_factory.mktemp("models"))
    # Short and unique: Ray's socket paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rsmn-", dir="/tmp")
    try:
        up = sh("up", "--workers", "1", "--num-cpus", "1", "--http-port", str(port), "--model", "tiny-llama",
                "--cache-dir", cache, "--num-replicas", "2", "--max-model-len", "512",
                "--engine-worker-queue-port", "0", "--cache-queue-port", "0", temp_dir=temp_dir)
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
        address = next(line.split("cluster address: ")[1].strip() for line in up.stdout.splitlines()
                       if line.startswith("cluster address: "))
        assert ours(temp_dir), "the Ray processes should run under the script's temp dir"
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": address})
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(set(nodes.values())) == 2, nodes  # one replica on each node
    finally:
        assert sh("stop", temp_dir=temp_dir).returncode == 0
        assert sh("stop", temp_dir=temp_dir).returncode == 0  # idempotent
        leftover = ours(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftover, f"processes left under {temp_dir}: {leftover}"


PROBE = """
import json, ray
from ray import serve
from radixserve.cluster.replica_wire import decode_info
ray.init(namespace="serve", logging_level="ERROR")  # RAY_ADDRESS: this test's cluster, not any other
h = serve.get_deployment_handle("LLMServer", app_name="radixserve")
seen = {}
for _ in range(40):
    info = decode_info(h.get_info.remote().result())
    seen[info.replica_id] = info.node_id
    if len(seen) == 2:
        break
print(json.dumps(seen))
"""
