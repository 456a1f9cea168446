"""The OpenAI-compatible HTTP layer over a real engine, through real HTTP:
completions and chat (JSON and SSE), logprobs, n > 1, the prefix cache per
tenant and cache salt, the other endpoints, client disconnects, and the
official ``openai`` client. Prompts are unique per test: the engine and its
prefix cache are shared by the whole module.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.hashing import cache_namespace, prompt_block_hashes, request_namespace
from tests.cpu.openai_harness import MAX_LEN, MODEL, aborted, greedy, post_sse, unique_ids, wait_idle


@pytest.fixture(scope="module")
def offline(tiny_dir):
    llm = LLM(str(tiny_dir), max_model_len=MAX_LEN)
    yield llm
    llm.shutdown()



# -- completions ----------------------------------------------------------------------------------

def test_completion_json_matches_offline(http, url, offline):
    prompt = "The quick brown fox jumps over"
    resp = http.post(f"{url}/v1/completions", json=greedy(prompt=prompt, max_tokens=12))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-") and resp.headers["x-request-id"] == body["id"]
    assert resp.headers["x-radixserve-replica"] == "local"
    want = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["text"] == want.outputs[0].text
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(want.prompt_token_ids) and usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}


def test_token_id_prompts_match_offline(http, url, offline):
    a, b = unique_ids(20), unique_ids(7)
    resp = http.post(f"{url}/v1/completions", json=greedy(prompt=[a, b], max_tokens=6))
    assert resp.status_code == 200, resp.text
    texts = [c["text"] for c in sorted(resp.json()["choices"], key=lambda c: c["index"])]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert texts == [o.outputs[0].text for o in offline.generate([a, b], params)]
    single = http.post(f"{url}/v1/completions", json=greedy(prompt=a, max_tokens=6)).json()
    assert single["choices"][0]["text"] == texts[0] and single["usage"]["prompt_tokens"] == 20


def test_completion_stream_matches_json(http, url):
    body = greedy(prompt=unique_ids(30), max_tokens=10, stream_options={"include_usage": True})
    full = http.post(f"{url}/v1/completions", json=body | {"stream_options": None}).json()
    resp, events = post_sse(http, f"{url}/v1/completions", body)
    assert resp.headers["x-radixserve-replica"] == "local"
    assert resp.headers["x-request-id"].startswith("cmpl-")
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert usage["usage"]["prompt_tokens"] == 30
    assert all(c["object"] == "text_completion" and c["id"] == resp.headers["x-request-id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_multi_prompt_stream_matches_json(http, url):
    body = greedy(prompt=[unique_ids(12), unique_ids(30), unique_ids(5)], max_tokens=7)
    full = {c["index"]: c["text"] for c in http.post(f"{url}/v1/completions", json=body).json()["choices"]}
    _, events = post_sse(http, f"{url}/v1/completions", body)
    texts = {0: "", 1: "", 2: ""}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] += c["text"]
    assert texts == full


def test_concurrent_streams_are_independent(http, url):
    prompts = [unique_ids(10 + 5 * i) for i in range(6)]
    want = [http.post(f"{url}/v1/completions", json=greedy(prompt=p, max_tokens=12)).json()["choices"][0]["text"]
            for p in prompts]

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> str:
        text = ""
        async with client.stream("POST", f"{url}/v1/completions",
                                 json=greedy(prompt=prompt, max_tokens=12, stream=True)) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))
    assert asyncio.run(all_at_once()) == want


def test_stream_without_usage_ends_with_done(http, url):
    _, events = post_sse(http, f"{url}/v1/completions", greedy(prompt="no usage here", max_tokens=3))
    assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])


def test_n2_json_and_stream(http, url):
    body = {"model": MODEL, "prompt": "Two ways:", "n": 2, "max_tokens": 5, "temperature": 1.0,
            "seed": 7, "ignore_eos": True}
    resp = http.post(f"{url}/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert sorted(c["index"] for c in data["choices"]) == [0, 1]
    assert data["usage"]["completion_tokens"] == 10
    _, events = post_sse(http, f"{url}/v1/completions", body)
    by_index: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for e in events[:-1]:
        (c,) = e["choices"]
        by_index[c["index"]] += c["text"]
        if c["finish_reason"]:
            finished.add(c["index"])
    assert finished == {0, 1}
    assert by_index == {c["index"]: c["text"] for c in data["choices"]}  # same seed, same samples


def test_completion_logprobs_shape(http, url):
    resp = http.post(f"{url}/v1/completions", json=greedy(prompt="Logprobs please", max_tokens=5, logprobs=3))
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"])
    for tok, top, x in zip(lp["tokens"], lp["top_logprobs"], lp["token_logprobs"]):
        assert 3 <= len(top) <= 4 and top[tok] == x  # greedy: the sampled token is the best one
        assert max(top.values()) == x
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0

    echo = http.post(f"{url}/v1/completions", json=greedy(prompt="Logprobs please", max_tokens=5,
                                                          logprobs=1, echo=True)).json()
    choice2 = echo["choices"][0]
    assert choice2["text"] == "Logprobs please" + choice["text"]
    lp2 = choice2["logprobs"]
    n_prompt = echo["usage"]["prompt_tokens"]
    assert len(lp2["tokens"]) == n_prompt + 5
    assert lp2["token_logprobs"][0] is None and lp2["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp2["token_logprobs"][1:])
    assert lp2["tokens"][n_prompt:] == lp["tokens"]
    # text_offset points into the echoed text (BOS is in the tokens, not in the text).
    for token, offset in zip(lp2["tokens"][1:n_prompt], lp2["text_offset"][1:n_prompt]):
        assert choice2["text"][offset:offset + len(token)] == token
    assert lp2["text_offset"][n_prompt] == len("Logprobs please")

    _, events = post_sse(http, f"{url}/v1/completions", greedy(prompt="Logprobs please", max_tokens=5,
                                                               logprobs=3))
    streamed = [t for e in events[:-1] if e["choices"][0]["logprobs"]
                for t in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


# -- chat --------------------------------------------------------------------------------------

def test_chat_json_and_stream_match_offline(http, url, offline):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                             {"type": "text", "text": "there"}]}]
    body = greedy(messages=messages, max_completion_tokens=8)
    resp = http.post(f"{url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert resp.headers["x-radixserve-replica"] == "local"
    flat = [messages[0], {"role": "user", "content": "Hello\nthere"}]
    want = offline.chat(flat, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": want.outputs[0].text}
    assert choice["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 8
    assert data["usage"]["prompt_tokens"] == len(want.prompt_token_ids)

    resp, events = post_sse(http, f"{url}/v1/chat/completions",
                            body | {"stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks + [usage])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.outputs[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_return_token_ids_completions(http, url, offline):
    prompt = unique_ids(18)
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    plain = http.post(f"{url}/v1/completions", json=greedy(prompt=prompt, max_tokens=7)).json()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]
    body = greedy(prompt=prompt, max_tokens=7, return_token_ids=True)
    (choice,) = http.post(f"{url}/v1/completions", json=body).json()["choices"]
    assert choice["prompt_token_ids"] == prompt and choice["token_ids"] == want.outputs[0].token_ids
    _, events = post_sse(http, f"{url}/v1/completions", body)
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c.get("token_ids", [])] == want.outputs[0].token_ids


def test_return_token_ids_chat(http, url, offline):
    messages = [{"role": "user", "content": f"token ids please {uuid.uuid4().hex[:6]}"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    body = greedy(messages=messages, max_tokens=6, return_token_ids=True)
    data = http.post(f"{url}/v1/chat/completions", json=body).json()
    assert data["prompt_token_ids"] == want.prompt_token_ids
    assert data["choices"][0]["token_ids"] == want.outputs[0].token_ids
    _, events = post_sse(http, f"{url}/v1/chat/completions", body)
    chunks = events[:-1]
    assert chunks[0]["prompt_token_ids"] == want.prompt_token_ids
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == want.outputs[0].token_ids
    plain = http.post(f"{url}/v1/chat/completions", json=greedy(messages=messages, max_tokens=2)).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_chat_n2_stream_interleaves_indices(http, url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Pick two"}], "n": 2, "max_tokens": 4,
            "ignore_eos": True, "seed": 3}
    _, events = post_sse(http, f"{url}/v1/chat/completions", body)
    choices = [e["choices"][0] for e in events[:-1]]
    roles = [c["index"] for c in choices if c["delta"].get("role") == "assistant"]
    assert roles == [0, 1] and choices[0]["index"] == 0 and choices[1]["index"] == 1
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1]


def test_chat_logprobs_shape(http, url):
    body = greedy(messages=[{"role": "user", "content": "Scores"}], max_tokens=4, logprobs=True, top_logprobs=2)
    data = http.post(f"{url}/v1/chat/completions", json=body).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy
    plain = http.post(f"{url}/v1/chat/completions", json=body | {"top_logprobs": None}).json()
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


# -- prefix cache, tenants, salts --------------------------------------------------------------------

def cached_tokens(http: httpx.Client, url: str, prompt: list[int], **extra) -> int:
    resp = http.post(f"{url}/v1/completions", json=greedy(prompt=prompt, max_tokens=2) | extra)
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cached_tokens_on_repeated_prefix(http, url):
    prompt = unique_ids(200)
    assert cached_tokens(http, url, prompt) == 0
    assert cached_tokens(http, url, prompt) == 192  # 12 full blocks of 16
    chat = greedy(messages=[{"role": "system", "content": "shared system prompt " * 40},
                            {"role": "user", "content": str(uuid.uuid4())}], max_tokens=2)
    http.post(f"{url}/v1/chat/completions", json=chat)
    again = http.post(f"{url}/v1/chat/completions", json=chat).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_tenants_never_share_cached_prefixes(http, keyed_url):
    prompt = unique_ids(100)

    def as_key(key: str) -> int:
        resp = http.post(f"{keyed_url}/v1/completions", json=greedy(prompt=prompt, max_tokens=2),
                         headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert as_key("key-alice") == 0
    assert as_key("key-bob") == 0  # same prompt, other tenant: no hit
    assert as_key("key-alice-2") == 96  # same tenant, other key: hit
    assert as_key("key-bob") == 96


def test_router_hashes_match_the_engine(http, keyed_url, engine, backend):
    """request_namespace + prompt_block_hashes is how the router will find cached prefixes."""
    prompt = unique_ids(64)
    resp = http.post(f"{keyed_url}/v1/completions", json=greedy(prompt=prompt, max_tokens=1),
                     headers={"Authorization": "Bearer key-bob"})
    assert resp.status_code == 200, resp.text

    def cached(namespace: tuple[str, ...]) -> list[bool]:
        hashes = prompt_block_hashes(prompt, backend.block_size, namespace)

        async def look():
            return await engine.call(lambda e: [e.kv.tree.get(h) is not None for h in hashes])
        return asyncio.run(look())
    assert cached(request_namespace("bob", None)) == [True] * 4
    assert cached(request_namespace("alice", None)) == [False] * 4
    assert cached(()) == [False] * 4


def test_cache_salt_isolates(http, url):
    prompt = unique_ids(64)
    assert cached_tokens(http, url, prompt, cache_salt="s1") == 0
    assert cached_tokens(http, url, prompt, cache_salt="s2") == 0
    assert cached_tokens(http, url, prompt) == 0
    assert cached_tokens(http, url, prompt, cache_salt="s1") == 48  # 64 tokens: last block recomputed


def test_request_and_cache_namespace():
    assert request_namespace(None, None) == ()
    assert request_namespace("alice", None) == ("tenant:alice",)
    assert request_namespace(None, "x") == ("salt:x",)
    assert cache_namespace("lora:a:12ab", request_namespace("alice", "x")) == ("lora:a:12ab", "tenant:alice", "salt:x")
    assert cache_namespace(None, ("tenant:alice",)) == ("tenant:alice",)


# -- other endpoints ----------------------------------------------------------------------------------

def test_models_tokenize_detokenize_health_metrics(http, url, backend):
    models = http.get(f"{url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(MODEL, "model", MAX_LEN)]
    tok = http.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "hello world",
                                             "return_token_strs": True}).json()
    assert tok["tokens"] == backend.tokenizer.encode("hello world") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == MAX_LEN and len(tok["token_strs"]) == tok["count"]
    chat = http.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == backend.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    detok = http.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == backend.tokenizer.decode(tok["tokens"])
    assert http.get(f"{url}/health").status_code == 200
    metrics = http.get(f"{url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "radixserve:num_requests_running" in metrics.text


# -- disconnects -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_prompts", [1, 2])
def test_streaming_disconnect_aborts_and_frees_blocks(url, engine, num_prompts):
    assert wait_idle(engine)[2] == 0
    before = aborted(engine)
    prompts = [unique_ids(40) for _ in range(num_prompts)]
    body = greedy(prompt=prompts, max_tokens=2000, stream=True)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            got = 0
            for line in resp.iter_lines():
                got += line.startswith("data: ")
                if got == 2:
                    break  # leaving both blocks closes the connection
    # The client is gone; the server must abort the request and free its blocks.
    free, total, live = wait_idle(engine)
    assert (free, live) == (total, 0)
    assert aborted(engine) == before + num_prompts


@pytest.mark.parametrize("num_prompts", [1, 2])
def test_non_streaming_disconnect_aborts(url, engine, num_prompts):
    assert wait_idle(engine)[2] == 0
    before = aborted(engine)
    body = greedy(prompt=[unique_ids(40) for _ in range(num_prompts)], max_tokens=2000)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    free, total, live = wait_idle(engine)
    assert (free, live) == (total, 0)
    assert aborted(engine) == before + num_prompts


# -- the official client -----------------------------------------------------------------------------

def test_openai_client(url, keyed_url):
    openai = pytest.importorskip("openai")  # in the `test` extra
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    comp = client.completions.create(model=MODEL, prompt="Client says", max_tokens=5, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5
    assert len(comp.choices[0].logprobs.tokens) == 5
    assert comp.usage.prompt_tokens_details.cached_tokens >= 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    assert len(chat.choices[0].logprobs.content) == 5

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    cstream = client.completions.create(model=MODEL, prompt="Client says", max_tokens=5, temperature=0,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True})
    cchunks = list(cstream)
    assert "".join(c.choices[0].text for c in cchunks if c.choices) == comp.choices[0].text
    assert cchunks[-1].usage.total_tokens == comp.usage.total_tokens

    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=-1)
    assert "temperature" in info.value.message

    keyed = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyed.models.list()
    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="key-alice", max_retries=0)
    assert [m.id for m in good.models.list()] == [MODEL]
