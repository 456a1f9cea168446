"""The red-team sequence of issue 19 replayed against one server, in one test.

A real HTTP server over a TP=2 tiny-llama engine (two worker processes, gloo)
takes, all at once: streaming load (half of it cancelled mid-stream by the
client), hostile requests interleaved with it, and a SIGKILL of a TP worker
while that load runs. Then: no client waited past a bound, every hostile
request got a 4xx, every load request either finished or failed cleanly
(5xx in OpenAI shape for those the kill cut off), the server answers a normal
request again within ``RECOVERY_S``, and no block or request is left behind.
(A replica kill is the cluster suite's: tests/cluster/test_serve.py.)
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import httpx
import pytest

from radixserve.cluster.backend import LocalBackend
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine import AsyncLLMEngine
from tests.cpu.openai_harness import MODEL, serve, unique_ids, wait_idle

CLIENT_BOUND_S = 90.0  # no client waits longer than this, whatever happened to its request
RECOVERY_S = 60.0      # after the kill, a normal request succeeds within this
JSON = {"content-type": "application/json"}
HOSTILE = [
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "n": 100000}'),
    ("/v1/completions", '{"prompt": "hi \\ud800 there"}'),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e308}'),
    ("/v1/completions", '{"prompt": "x", "best_of": 1000000}'),
    ("/v1/chat/completions", '{"messages": [{"role": "hacker", "content": "x"}]}'),
    ("/v1/completions", '{"prompt": "x", "stop": ' + str(["s"] * 1000).replace("'", '"') + '}'),
    ("/v1/completions", '{"prompt": [' + ",".join(['"p"'] * 1000) + ']}'),
    ("/tokenize", '{"prompt": "%s"}' % ("q" * 70_000)),
    ("/v1/completions", '{"prompt": "x", "max_tokens": -1}'),
    ("/v1/completions", '{"model": "no-such-model", "prompt": "x"}'),
]


@pytest.fixture(scope="module")
def tp_server(tiny_dir):
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=512, tensor_parallel_size=2,
                                     engine_worker_queue_port=0, cache_queue_port=0, worker_timeout_s=20)
    try:
        with serve(build_app(LocalBackend(eng, model_name=MODEL), ServerConfig())) as base:
            yield base, eng
    finally:
        eng.shutdown()


def _stream(url: str, i: int) -> str:
    """One load request; odd ones hang up after their first chunk. Returns how it ended."""
    body = {"model": MODEL, "prompt": unique_ids(24), "max_tokens": 40, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=CLIENT_BOUND_S) as client, \
            client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            assert resp.status_code >= 500 and "error" in resp.json(), resp.text
            return "failed"
        for line in resp.iter_lines():
            if i % 2 and line.startswith("data: "):
                return "cancelled"  # leaving the block closes the connection mid-stream
            if '"error"' in line:
                return "failed"  # the kill cut it off: an error event, then the stream ends
    return "done"


def _hostile(url: str, item: tuple[str, str]) -> int:
    path, raw = item
    with httpx.Client(timeout=CLIENT_BOUND_S) as client:
        return client.post(url + path, content=raw, headers=JSON).status_code


def test_red_team_sequence(tp_server):
    url, eng = tp_server
    victim = eng.engine.executor.handles[1].pid
    killer = threading.Timer(1.5, lambda: os.kill(victim, signal.SIGKILL))
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        load = [pool.submit(_stream, url, i) for i in range(16)]
        killer.start()
        hostile = [pool.submit(_hostile, url, item) for item in HOSTILE]
        ends = [f.result(timeout=CLIENT_BOUND_S) for f in load]
        statuses = [f.result(timeout=CLIENT_BOUND_S) for f in hostile]
    killer.join()
    assert time.monotonic() - started < CLIENT_BOUND_S + 10, "a client hung"
    assert all(400 <= s < 500 for s in statuses), statuses
    assert set(ends) <= {"done", "cancelled", "failed"}

    _answers_again(url)
    assert eng.engine.executor.handles[1].pid != victim, "the killed rank was not replaced"
    free, total, live = wait_idle(eng, timeout=20)
    assert (free, live) == (total, 0)  # no block stays in use, no request is left


def test_a_rank_lost_while_idle_is_restarted(tp_server):
    # No step runs without work, so only the idle check can notice; before it the
    # server answered 503 "unhealthy" for good.
    url, eng = tp_server
    wait_idle(eng, timeout=20)
    victim = eng.engine.executor.handles[0].pid
    os.kill(victim, signal.SIGKILL)
    _answers_again(url)
    assert eng.engine.executor.handles[0].pid != victim


def _answers_again(url: str) -> None:
    """A normal request succeeds within RECOVERY_S."""
    deadline = time.monotonic() + RECOVERY_S
    with httpx.Client(timeout=30) as client:
        while True:
            r = client.post(f"{url}/v1/completions",
                            json={"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0})
            if r.status_code == 200:
                return
            assert time.monotonic() < deadline, f"no recovery within {RECOVERY_S} s: {r.text}"
            time.sleep(0.5)
