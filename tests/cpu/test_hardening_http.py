"""The HTTP half of the hardening issue: limits, access, leaks, adapter ownership, a stalled engine.

Each test sends what broke the server on main (a 20 MB body, a huge prompt, Infinity, another
tenant's adapter, a path outside the adapter roots, a Ray error text) and checks the refusal,
then that ordinary requests still succeed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

import httpx
import pytest

from radixserve.cluster.backend import BackendUnavailableError, LocalBackend
from radixserve.cluster.metrics_merge import merge
from radixserve.cluster.openai_api.adapters import PATH_REFUSED
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine import AsyncLLMEngine, SamplingParams
from radixserve.engine.model.hf_config import load_arch_config
from tests.cpu.helpers import write_adapter
from tests.cpu.openai_harness import KEYS, MAX_LEN, MODEL, assert_error, serve, unique_ids, wait_idle

JSON = {"content-type": "application/json"}
COMP = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def ok(resp: httpx.Response) -> httpx.Response:
    assert resp.status_code == 200, resp.text
    return resp


# -- item 4: body size, length before tokenizing, tokenization off the loop -------------------------

def test_a_body_over_the_limit_is_413(http, backend):
    with serve(build_app(backend, ServerConfig(max_request_body_bytes=4096))) as base:
        big = {**COMP, "prompt": "x" * 8000}
        assert_error(http.post(f"{base}/v1/completions", json=big), 413, contains="4096 bytes")

        def chunks():  # no Content-Length: counted as it arrives
            body = httpx.Request("POST", base, json=big).content
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]
        assert_error(http.post(f"{base}/v1/completions", content=chunks(), headers=JSON), 413)
        ok(http.post(f"{base}/v1/completions", json=COMP))


def test_text_too_long_for_the_context_is_refused_before_tokenizing(http, url, backend):
    limit = MAX_LEN * backend.tokenizer.max_token_chars
    text = "a" * (limit + 1)
    for path, body, param in [("/v1/completions", {**COMP, "prompt": text}, "prompt"),
                              ("/v1/completions", {**COMP, "prompt": ["ok", text]}, "prompt"),
                              ("/v1/chat/completions", {"model": MODEL, "max_tokens": 1,
                                                        "messages": [{"role": "user", "content": text}]}, "messages"),
                              ("/tokenize", {"prompt": text}, "prompt")]:
        assert_error(http.post(url + path, json=body), 400, param=param, code="context_length_exceeded",
                     contains=f"{limit + 1} characters")
    assert http.post(f"{url}/tokenize", json={"prompt": "a b " * 100}).json()["count"] > 100


def test_tokenizing_a_long_text_does_not_stall_other_requests(http, backend):
    config = ServerConfig(max_prompt_chars=10**8, max_request_body_bytes=2**26)
    # ~15 M characters: seconds of tokenizing even on a quiet machine, so the models request at 0.5 s
    # lands inside it (with ~4 M, tokenizing could end first and both answers leave together)
    text = "hello world, this is some text! " * 480_000
    with serve(build_app(backend, config)) as base:
        done: dict[str, float] = {}

        def tokenize():
            ok(http.post(f"{base}/tokenize", json={"prompt": text}))
            done["tokenize"] = time.monotonic()
        worker = threading.Thread(target=tokenize)
        worker.start()
        time.sleep(0.5)  # the body is uploaded and being tokenized
        ok(http.get(f"{base}/v1/models"))
        done["models"] = time.monotonic()
        worker.join(timeout=60)
    assert done["models"] < done["tokenize"]  # answered while the tokenizer was still busy


# -- item 11: absurd values and sizes --------------------------------------------------------------

@pytest.mark.parametrize("raw,param", [
    ('{"model": "%s", "prompt": "hi", "temperature": Infinity}' % MODEL, None),
    ('{"model": "%s", "prompt": "hi", "temperature": 1e308}' % MODEL, None),
    ('{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL, None),
    ('{"model": "%s", "prompt": "hi", "repetition_penalty": Infinity}' % MODEL, None),
    ('{"model": "%s", "max_tokens": 1, "messages": [{"role": "hacker", "content": "x"}]}' % MODEL, "messages"),
])
def test_absurd_values_are_a_400(http, url, raw, param):
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    assert_error(http.post(url + path, content=raw, headers=JSON), 400, param=param)


def test_list_sizes_are_capped(http, backend):
    config = ServerConfig(max_prompts_per_request=4, max_stop_sequences=3)
    with serve(build_app(backend, config)) as base:
        for body, param in [({**COMP, "prompt": ["a"] * 5}, "prompt"), ({**COMP, "prompt": [[5, 6]] * 5}, "prompt"),
                            ({**COMP, "stop": ["x", "y", "z", "w"]}, "stop"),
                            ({**COMP, "stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids")]:
            assert_error(http.post(f"{base}/v1/completions", json=body), 400, param=param, contains="limit")
        ok(http.post(f"{base}/v1/completions", json={**COMP, "prompt": ["a"] * 4, "stop": ["x", "y", "z"]}))
    assert ServerConfig().max_prompts_per_request == 256 and ServerConfig().max_stop_sequences == 64
    for bad in [dict(max_request_body_bytes=0), dict(max_prompts_per_request=-1), dict(max_prompt_chars=0),
                dict(metrics_api_key=""), dict(allowed_lora_roots=("relative/dir",)), dict(allowed_lora_roots="/x")]:
        with pytest.raises(ValueError):
            ServerConfig(**bad)


def test_cluster_config_carries_the_limits():
    from radixserve.cluster.config import ClusterConfig
    limits = ClusterConfig(max_stop_sequences=8, allowed_lora_roots=("/srv/adapters",)).server_limits()
    assert ServerConfig(**limits).max_stop_sequences == 8  # every key is a ServerConfig field
    for bad in [dict(max_request_body_bytes=0), dict(allowed_lora_roots=("adapters",)), dict(stall_timeout_s=-1)]:
        with pytest.raises(ValueError):
            ClusterConfig(**bad)


# -- item 7: /metrics and /openapi.json ---------------------------------------------------------------

def test_metrics_key(http, backend):
    with serve(build_app(backend, ServerConfig(api_keys=KEYS, metrics_api_key="scrape-me"))) as base:
        assert_error(http.get(f"{base}/metrics"), 401)
        assert_error(http.get(f"{base}/metrics", headers={"Authorization": "Bearer key-bob"}), 401)  # a tenant's
        assert "radixserve:" in ok(http.get(f"{base}/metrics", headers={"Authorization": "Bearer scrape-me"})).text
        ok(http.get(f"{base}/health"))
    with serve(build_app(backend, ServerConfig())) as base:  # an open server stays open
        assert "/v1/completions" in ok(http.get(f"{base}/openapi.json")).json()["paths"]
        assert http.get(f"{base}/docs").status_code == 404


# -- item 10: no internals in client-visible errors -------------------------------------------------

RAY_TEXT = ("\x1b[36mray::ServeReplica:radixserve:LLMServer.generate()\x1b[39m (pid=4242, ip=10.1.2.3, "
            "actor_id=5c5d0a9e5f1b2f3c01000000)\nTraceback (most recent call last):\n  File \"x.py\", line 1")


class _Wrapped(ValueError):
    """What Ray raises for a replica's ValueError: its text is the traceback, .cause the error."""

    def __init__(self, cause: ValueError):
        super().__init__(RAY_TEXT)
        self.cause = cause


class _LeakyBackend(LocalBackend):
    def __init__(self, engine, exc: BaseException):
        super().__init__(engine, MODEL)
        self.exc = exc

    async def generate(self, *args, **kwargs):
        raise self.exc


@pytest.mark.parametrize("exc,status", [(RuntimeError(RAY_TEXT), 500), (BackendUnavailableError(RAY_TEXT), 503),
                                        (_Wrapped(ValueError("n is too large")), 400)])
def test_errors_carry_no_internals(http, engine, caplog, exc, status):
    with serve(build_app(_LeakyBackend(engine, exc), ServerConfig())) as base, caplog.at_level(logging.WARNING):
        for stream in (False, True):
            resp = http.post(f"{base}/v1/completions", json={**COMP, "stream": stream})
            err = assert_error(resp, status)
            for leak in ("pid=", "10.1.2.3", "actor_id", "\x1b[", "Traceback", "ray::"):
                assert leak not in err["message"], err
            if status >= 500:  # a short message and the request id; the details are in the log
                rid = resp.headers["x-request-id"]
                assert f"request id: {rid}" in err["message"]
                assert any(rid in r.getMessage() and "pid=4242" in r.getMessage() for r in caplog.records)
            else:
                assert err["message"] == "n is too large"


# -- item 6: adapter ownership and allowed roots ----------------------------------------------------

@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_dir):
    arch = load_arch_config(tiny_dir)
    root, outside = tmp_path_factory.mktemp("lora-root"), tmp_path_factory.mktemp("lora-outside")
    for name, seed in (("a1", 1), ("a2", 2), ("b1", 3)):
        write_adapter(root / name, arch, seed)
    write_adapter(outside / "op", arch, 4)
    write_adapter(outside / "secret", arch, 5)
    return root, outside


@pytest.fixture(scope="module")
def owned_url(tiny_dir, roots):
    root, outside = roots
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=256, enable_lora=True, max_loras=2,
                                     lora_modules=[f"op={outside / 'op'}"])
    config = ServerConfig(api_keys=KEYS, allowed_lora_roots=(str(root),))
    with serve(build_app(LocalBackend(eng, model_name=MODEL), config)) as base:
        yield base
    eng.shutdown()


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _load(http, base, key, name, path):
    return http.post(f"{base}/v1/load_lora_adapter", headers=_as(key), json={"lora_name": name, "lora_path": str(path)})


def _unload(http, base, key, name):
    return http.post(f"{base}/v1/unload_lora_adapter", headers=_as(key), json={"lora_name": name})


def _gen(http, base, key, model, prompt):
    return http.post(f"{base}/v1/completions", headers=_as(key),
                     json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})


def test_adapters_belong_to_the_tenant_that_loaded_them(http, owned_url, roots):
    root, _ = roots
    base, prompt = owned_url, unique_ids(20)
    ok(_load(http, base, "key-alice", "a1", root / "a1"))
    text = ok(_gen(http, base, "key-alice", "a1", prompt)).json()["choices"][0]["text"]
    bob_sees = [m["id"] for m in ok(http.get(f"{base}/v1/models", headers=_as("key-bob"))).json()["data"]]
    assert bob_sees == [MODEL, "op"]  # the operator's adapter, not alice's
    assert_error(_gen(http, base, "key-bob", "a1", prompt), 404, code="model_not_found")
    assert_error(_load(http, base, "key-bob", "a1", root / "b1"), 403, code="adapter_not_owned")  # no hijack
    assert_error(_unload(http, base, "key-bob", "a1"), 404)  # as if it did not exist
    assert_error(_unload(http, base, "key-bob", "op"), 403)
    assert_error(_load(http, base, "key-bob", "op", root / "b1"), 403)
    assert ok(_gen(http, base, "key-alice-2", "a1", prompt)).json()["choices"][0]["text"] == text  # unchanged
    ok(_gen(http, base, "key-bob", "op", prompt))
    ok(_load(http, base, "key-alice", "a1", root / "a2"))  # the owner may reload ...
    ok(_unload(http, base, "key-alice", "a1"))  # ... and unload
    ok(_load(http, base, "key-bob", "a1", root / "b1"))  # then the name is free again
    ok(_unload(http, base, "key-bob", "a1"))


def test_runtime_loads_only_from_allowed_roots_with_one_answer(http, owned_url, roots):
    root, outside = roots
    (root / "escape").symlink_to(outside / "secret")  # inside by name, outside in fact
    half = root / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")  # no weights
    refusals = [outside / "secret", "/etc", "/nonexistent", root / "nothing-here", root / "escape", half,
                root / ".." / outside.name / "secret", "rel/path", "a\x00b"]
    for path in refusals:
        err = assert_error(_load(http, owned_url, "key-bob", "x", path), 403, param="lora_path")
        assert err["message"] == PATH_REFUSED, path
    ok(_gen(http, owned_url, "key-bob", MODEL, [5, 6, 7]))
    assert "x" not in [m["id"] for m in http.get(f"{owned_url}/v1/models", headers=_as("key-bob")).json()["data"]]


def test_runtime_loading_is_off_without_roots(http, tiny_dir, roots):
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=128, enable_lora=True, max_loras=1)
    with serve(build_app(LocalBackend(eng, model_name=MODEL), ServerConfig())) as base:
        resp = http.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(roots[0] / "a1")})
        assert assert_error(resp, 403)["message"] == PATH_REFUSED
    eng.shutdown()


def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- item 3 (health half): an engine with work but no progress ---------------------------------------

def test_a_stalled_engine_reports_it(engine):
    _until(lambda: engine.stalled_for() < 2)  # idle: the loop stamps progress every half second
    release = threading.Event()

    async def hang_in_the_loop() -> float:
        blocker = asyncio.ensure_future(engine.call(lambda e: release.wait(60)))  # as a step that hangs
        await asyncio.sleep(1.5)
        stalled = engine.stalled_for()
        release.set()
        await blocker
        return stalled
    assert asyncio.run(hang_in_the_loop()) >= 1.0
    _until(lambda: engine.stalled_for() < 1.0)  # progress again

    async def steps_that_schedule_nothing() -> tuple[float, bool]:
        core, outs = engine.engine, []
        real = core.step
        core.step = lambda: []  # the loop calls engine.step() afresh each time: work queued, none done

        async def run() -> None:
            async for out in engine.generate(None, SamplingParams(max_tokens=2, ignore_eos=True), "stuck",
                                             prompt_token_ids=[5, 6, 7]):
                outs.append(out)
        task = asyncio.ensure_future(run())
        try:
            await asyncio.sleep(1.5)
            stalled = engine.stalled_for()
        finally:
            core.step = real
        await asyncio.wait_for(task, 60)
        return stalled, outs[-1].finished
    stalled, finished = asyncio.run(steps_that_schedule_nothing())
    assert stalled >= 1.0 and finished
    _until(lambda: engine.stalled_for() < 1.0)
    assert wait_idle(engine)[2] == 0


# -- item 11: the routers' lines about a dead replica ------------------------------------------------

def test_metrics_of_a_dead_replica_are_dropped():
    router = ('# HELP radixserve:router_inflight i\n# TYPE radixserve:router_inflight gauge\n'
              'radixserve:router_inflight{router="r",replica="alive"} 1\n'
              'radixserve:router_inflight{router="r",replica="dead"} 3\n')
    text = merge([('replica="alive"', "radixserve:x 1\n"), ("", router)], live_replicas={"alive"})
    assert 'replica="alive"' in text and "dead" not in text
    assert "dead" in merge([("", router)])  # no live set given: everything kept


# -- fault injection: bad inputs interleaved with good ones -------------------------------------------

BAD = [
    ("/v1/completions", '{"prompt": "hi \\ud800", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "hi", "n": 1000, "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "hi", "temperature": Infinity}'),
    ("/v1/completions", '{"prompt": [5, 99999]}'),
    ("/v1/completions", '{"prompt": [5, 6], "max_tokens": 999999}'),
    ("/v1/completions", '{"prompt": "%s"}' % ("z" * 70_000)),
    ("/v1/completions", '{"prompt": "hi", "stop": [%s]}' % ",".join(['"s"'] * 100)),
    ("/v1/chat/completions", '{"messages": [{"role": "hacker", "content": "x"}]}'),
    ("/v1/chat/completions", '{"messages": []}'),
    ("/v1/completions", '{not json'),
    ("/tokenize", '{"prompt": "%s"}' % ("q" * 70_000)),
    ("/v1/completions", '{"prompt": "hi", "stream": true, "max_tokens": 0}'),
]


def test_bad_inputs_interleaved_with_good_ones_leave_nothing_behind(url, engine):
    good = [{"model": MODEL, "prompt": unique_ids(12), "max_tokens": 6, "ignore_eos": True, "stream": i % 2 == 0}
            for i in range(12)]

    def send(item) -> int:
        with httpx.Client(timeout=60) as client:
            if isinstance(item, dict):
                return client.post(f"{url}/v1/completions", json=item).status_code
            path, raw = item
            return client.post(url + path, content=raw, headers=JSON).status_code
    mixed = [x for pair in zip(good, BAD) for x in pair]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(send, mixed, timeout=120))
    assert time.monotonic() - started < 120  # nothing hung
    assert statuses[0::2] == [200] * len(good)
    assert all(400 <= s < 500 for s in statuses[1::2]), statuses
    free, total, live = wait_idle(engine)
    assert (free, live) == (total, 0)  # no block stays in use, no request is left
