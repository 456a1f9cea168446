"""`radixserve serve` as a user runs it: its own local Ray, with the dashboard that
`serve status` talks to, and a clean stop on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from radixserve.engine.model.default_models import resolve_model
from tests.cluster.helpers import free_port


def test_serve_cli_starts_its_own_ray_with_a_dashboard(tmp_path):
    cache = str(tmp_path / "models")
    resolve_model("tiny-llama", cache)
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "radixserve.cli", "serve", "tiny-llama", "--port", str(port),
                             "--dashboard-port", str(dash), "--num-cpus", "2", "--cache-dir", cache,
                             "--max-model-len", "256", "--engine-worker-queue-port", "0", "--cache-queue-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        status = subprocess.run([sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "status",
                                 "--address", f"http://127.0.0.1:{dash}"], capture_output=True, text=True,
                                timeout=120, env={**env, "RAY_AUTH_MODE": "token"})  # Ray's dashboard token
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout + status.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
