"""The OpenAI HTTP layer's refusals and failures: API keys, every 400/404,
what clients send that must still be accepted, unhealthy and failing
backends (503, 500), and ServerConfig validation.
"""
from __future__ import annotations

import pytest

from radixserve.cluster.backend import GenerationStream, LocalBackend
from radixserve.cluster.openai_api.app import ServerConfig, attach_backend, build_app
from radixserve.engine.entrypoints.outputs import CompletionOutput, RequestOutput
from tests.cpu.openai_harness import MAX_LEN, MODEL, assert_error, greedy, post_sse, serve

# -- auth ---------------------------------------------------------------------------------------------

def test_api_keys(http, keyed_url):
    comp = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", comp),
                               ("POST", "/v1/chat/completions",
                                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
                               ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [5]})]:
        none = http.request(method, keyed_url + path, json=body)
        assert_error(none, 401, code="invalid_api_key")
        wrong = http.request(method, keyed_url + path, json=body, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, code="invalid_api_key")
        basic = http.request(method, keyed_url + path, json=body, headers={"Authorization": "Basic key-bob"})
        assert_error(basic, 401)
        ok = http.request(method, keyed_url + path, json=body, headers={"Authorization": "Bearer key-bob"})
        assert ok.status_code == 200, (path, ok.text)
    assert http.get(f"{keyed_url}/health").status_code == 200  # open: probes carry no key
    for path in ("/metrics", "/openapi.json"):  # both behind the key (per-replica hit counters)
        assert_error(http.get(keyed_url + path), 401, code="invalid_api_key")
        assert http.get(keyed_url + path, headers={"Authorization": "Bearer key-bob"}).status_code == 200
    # Auth is checked before the body: a bad body without a key is still a 401.
    assert http.post(f"{keyed_url}/v1/completions", json={"bogus": 1}).status_code == 401


# -- errors ----------------------------------------------------------------------------------------------

ERROR_CASES = [
    # (path, body, status, param, message fragment)
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "x", "n": "many"}, 400, "n", ""),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", ""),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, None, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, None, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, None, "n must be"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, None, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, None, "stop"),
    ("/v1/completions", {"prompt": [5] * 2000, "max_tokens": 100}, 400, "max_tokens",
     "maximum context length is 2048 tokens. However, you requested 2100 tokens (2000 in the prompt, "
     "100 in the completion)"),
    ("/v1/completions", {"prompt": [5] * 2048}, 400, "prompt", "requested 2048 tokens in the prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 1000}], "max_tokens": 1500},
     400, "max_tokens", "in the messages"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, None, "99999"),
    ("/v1/completions", {"prompt": [5, -1]}, 400, None, "-1"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages", "image_url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias", "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, 400, "response_format", "xml"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    ("/v1/completions", {"prompt": "x", "stream": True, "n": 1, "best_of": 2}, 400, "best_of", ""),
    ("/v1/completions", {"prompt": "x", "cache_salt": ""}, 400, "cache_salt", ""),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model", ""),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model", ""),
    ("/detokenize", {"tokens": [1, 999999]}, 400, "tokens", "999999"),
    ("/tokenize", {}, 400, None, "exactly one"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", ERROR_CASES)
def test_errors(http, url, path, body, status, param, fragment):
    resp = http.post(url + path, json=body)
    assert_error(resp, status, param=param, contains=fragment)


def test_invalid_json_and_unknown_route(http, url):
    resp = http.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(resp, 400, contains="JSON")
    assert_error(http.get(f"{url}/v1/nothing-here"), 404)
    assert_error(http.get(f"{url}/v1/completions"), 405)


def test_model_not_found_code(http, url):
    err = assert_error(http.post(f"{url}/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found"


def test_tolerated_client_fields(http, url):
    """What SDKs and tools send by default must not be refused."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "me"}], "max_tokens": 2,
            "logit_bias": None, "response_format": {"type": "text"}, "parallel_tool_calls": True,
            "tools": [], "tool_choice": "none", "store": False, "metadata": {"a": "b"}, "user": "u1",
            "chat_template_kwargs": {"enable_thinking": False}, "frequency_penalty": None, "n": None,
            "stream": False, "some_future_field": {"x": 1}, "top_k": -1, "min_p": 0.1,
            "repetition_penalty": 1.1, "presence_penalty": 0.5, "stop": "zzz", "stop_token_ids": [7],
            "min_tokens": 1, "skip_special_tokens": False, "include_stop_str_in_output": True,
            "add_generation_prompt": True, "seed": 1, "temperature": 0.7, "top_p": 0.9}
    resp = http.post(f"{url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    comp = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "logit_bias": {}, "suffix": None,
            "best_of": 2, "n": 1, "echo": False, "logprobs": None, "stream": None}
    resp = http.post(f"{url}/v1/completions", json=comp)
    assert resp.status_code == 200, resp.text
    assert sorted(c["index"] for c in resp.json()["choices"]) == [0, 1]


def test_default_max_tokens_fills_context(http, url):
    resp = http.post(f"{url}/v1/completions", json=greedy(prompt=[5] * (MAX_LEN - 3)))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


# -- backend failures ---------------------------------------------------------------------------------

class _SickBackend(LocalBackend):
    async def health(self) -> bool:
        return False


class _FailingStream(GenerationStream):
    """Yields ``good`` healthy outputs, then one the engine failed."""

    def __init__(self, good: int):
        self.replica_id, self.left, self.closed = "r-fail", good, False

    async def __anext__(self) -> RequestOutput:
        if self.closed:
            raise StopAsyncIteration
        failed = self.left == 0
        self.left -= 1
        c = CompletionOutput(0, "x", [5], None, None, "error" if failed else None)
        return RequestOutput("f", "p", [1, 2], [c], finished=failed, error="boom" if failed else None)

    async def aclose(self) -> None:
        self.closed = True


class _FailingBackend(LocalBackend):
    def __init__(self, engine, good: int):
        super().__init__(engine, MODEL)
        self.good = good

    async def generate(self, *args, **kwargs) -> GenerationStream:
        return _FailingStream(self.good)


def test_unhealthy_backend_is_503(http, engine):
    with serve(build_app(_SickBackend(engine, MODEL), ServerConfig())) as base:
        assert_error(http.get(f"{base}/health"), 503)
        assert_error(http.post(f"{base}/v1/completions", json={"prompt": "x"}), 503)
    with serve(build_app(None, ServerConfig())) as base:  # no backend attached yet
        assert_error(http.get(f"{base}/health"), 503)
        assert_error(http.post(f"{base}/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "x"}]}), 503)


def test_engine_failure_is_500(http, engine):
    with serve(build_app(_FailingBackend(engine, good=0), ServerConfig())) as base:
        err = assert_error(http.post(f"{base}/v1/completions", json={"prompt": "x"}), 500,
                           contains="request id: cmpl-")
        assert "boom" not in err["message"]  # the engine's own text goes to the log, not the client
        assert_error(http.post(f"{base}/v1/completions", json={"prompt": "x", "stream": True}), 500)
    with serve(build_app(_FailingBackend(engine, good=2), ServerConfig())) as base:
        assert_error(http.post(f"{base}/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "x"}]}), 500)
        # Once streaming, a failure is an error event, then [DONE].
        _, events = post_sse(http, f"{base}/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "x"}]})
        assert events[-1] == "[DONE]" and "request id: chatcmpl-" in events[-2]["error"]["message"]
        assert "boom" not in events[-2]["error"]["message"]


# -- config --------------------------------------------------------------------------------------------

def test_server_config_validation(backend):
    for bad in [dict(api_keys={}), dict(api_keys={"": "t"}), dict(api_keys={"k": ""}),
                dict(max_model_len=0), dict(served_model_name=""), dict(disconnect_poll_s=0)]:
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    keys = {"k": "t"}
    cfg = ServerConfig(api_keys=keys)
    keys["k2"] = "t2"
    assert dict(cfg.api_keys) == {"k": "t"}  # a private copy
    app = build_app(None, ServerConfig(max_model_len=MAX_LEN + 1))
    with pytest.raises(ValueError, match="max_model_len"):
        attach_backend(app, backend)


def test_served_model_name_and_cap(http, backend):
    with serve(build_app(backend, ServerConfig(served_model_name="my-model", max_model_len=64,
                                               return_replica_header=False,
                                               return_request_id_header=False))) as base:
        resp = http.post(f"{base}/v1/completions", json={"model": "my-model", "prompt": [5] * 60,
                                                        "max_tokens": 4, "ignore_eos": True})
        assert resp.status_code == 200 and resp.json()["model"] == "my-model"
        assert "x-radixserve-replica" not in resp.headers and "x-request-id" not in resp.headers
        assert_error(http.post(f"{base}/v1/completions", json={"prompt": [5] * 60, "max_tokens": 5}), 400,
                     contains="64")
        assert http.get(f"{base}/v1/models").json()["data"][0]["id"] == "my-model"
