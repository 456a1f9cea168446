"""Shared harness of the OpenAI HTTP tests: a real server over a real engine.

A uvicorn server on 127.0.0.1 (ephemeral port, background thread) serves
``build_app(LocalBackend(AsyncLLMEngine))`` on the embedded tiny model, so
streaming and client disconnects go through real sockets. The fixtures built
on it (``engine``, ``backend``, ``url``, ``keyed_url``, ``http``; module-scoped:
one engine per test module) live in tests/cpu/conftest.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import uvicorn

MODEL = "tiny-llama"
MAX_LEN = 2048  # room for the disconnect test's max_tokens=2000
KEYS = {"key-alice": "alice", "key-alice-2": "alice", "key-bob": "bob"}


# -- servers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- helpers ----------------------------------------------------------------------------------

def unique_ids(n: int) -> list[int]:
    """A prompt no other test sends, so its cache hits are its own."""
    rng = random.Random(uuid.uuid4().int)
    return [rng.randrange(10, 2000) for _ in range(n)]


def greedy(**extra) -> dict:
    return {"model": MODEL, "temperature": 0, "ignore_eos": True, **extra}


def read_sse(resp: httpx.Response) -> list:
    """Events of an SSE response: dicts, and the final "[DONE]"."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def post_sse(http: httpx.Client, url: str, body: dict, **kw) -> tuple[httpx.Response, list]:
    with http.stream("POST", url, json={**body, "stream": True}, **kw) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return resp, read_sse(resp)


def assert_error(resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None,
                 contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err
    return err


def engine_state(engine) -> tuple[int, int, int]:
    """(free blocks, all blocks, live requests), read between two engine steps."""
    async def get():
        return await engine.call(lambda e: (e.kv.num_free_blocks, e.kv.num_blocks,
                                            len(e.scheduler.requests)))
    return asyncio.run(get())


def wait_idle(engine, timeout: float = 10.0) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while True:
        free, total, live = state = engine_state(engine)
        if (free == total and live == 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def aborted(engine) -> float:
    return engine.engine.metrics.snapshot()["num_requests_aborted"]
