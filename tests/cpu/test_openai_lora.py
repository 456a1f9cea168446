"""LoRA adapters over HTTP: load/unload endpoints, selection by `model`, isolation, errors."""
from __future__ import annotations

import threading

import pytest

from radixserve.cluster.backend import LocalBackend
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine import LLM, AsyncLLMEngine, SamplingParams
from radixserve.engine.lora.request import LoRARequest
from radixserve.engine.model.hf_config import load_arch_config
from tests.cpu.helpers import write_adapter
from tests.cpu.openai_harness import serve, unique_ids

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_dir):
    arch = load_arch_config(tiny_dir)
    root = tmp_path_factory.mktemp("http-adapters")
    return {name: write_adapter(root / name, arch, seed) for name, seed in (("sql", 1), ("chat", 2))}


@pytest.fixture(scope="module")
def lora_url(tiny_dir, adapter_dirs):
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=512, enable_lora=True, max_loras=2)
    config = ServerConfig(allowed_lora_roots=(str(adapter_dirs["sql"].parent),))
    with serve(build_app(LocalBackend(eng, model_name=MODEL), config)) as base:
        yield base
    eng.shutdown()


def complete(http, url, model, prompt, **kw):
    return http.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                   "temperature": 0, "ignore_eos": True, **kw})


def test_load_select_and_unload(http, lora_url, adapter_dirs, tiny_dir):
    r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(adapter_dirs["sql"])})
    assert r.status_code == 200 and "added" in r.text
    ids = [m["id"] for m in http.get(f"{lora_url}/v1/models").json()["data"]]
    assert ids == [MODEL, "sql"]
    prompt = unique_ids(40)
    out = complete(http, lora_url, "sql", prompt)
    assert out.status_code == 200, out.text
    ref = LLM(str(tiny_dir), enable_lora=True).generate(
        [{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        lora_request=LoRARequest("sql", str(adapter_dirs["sql"])))[0]
    assert out.json()["choices"][0]["text"] == ref.outputs[0].text
    base = complete(http, lora_url, MODEL, prompt)
    assert base.json()["choices"][0]["text"] != out.json()["choices"][0]["text"]
    # the adapter's prefix cache is its own: the base model's run above did not hit it
    assert base.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = complete(http, lora_url, "sql", prompt)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    r = http.post(f"{lora_url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert r.status_code == 200 and "removed" in r.text
    assert complete(http, lora_url, "sql", prompt).status_code == 404


def test_unknown_and_bad_adapters(http, lora_url, adapter_dirs):
    assert complete(http, lora_url, "nope", [5, 6, 7]).status_code == 404
    r = http.post(f"{lora_url}/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    empty = adapter_dirs["sql"].parent / "empty"
    empty.mkdir()
    r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(empty)})
    assert r.status_code == 403 and "allowed LoRA roots" in r.json()["error"]["message"]
    r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "bad"})
    assert r.status_code == 400
    assert complete(http, lora_url, MODEL, [5, 6, 7]).status_code == 200  # serving intact


def test_load_and_unload_while_requests_run(http, lora_url, adapter_dirs):
    http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": str(adapter_dirs["chat"])})
    results = []

    def long_request():
        results.append(complete(http, lora_url, "chat", unique_ids(30), max_tokens=120))
    t = threading.Thread(target=long_request)
    t.start()
    r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(adapter_dirs["sql"])})
    assert r.status_code == 200
    assert http.post(f"{lora_url}/v1/unload_lora_adapter", json={"lora_name": "chat"}).status_code == 200
    t.join(timeout=120)
    assert results and results[0].status_code == 200  # the running request drained on its adapter
    assert len(results[0].json()["choices"][0]["text"]) > 0
    assert complete(http, lora_url, "sql", [9, 9, 9]).status_code == 200


def test_lora_endpoints_need_a_lora_engine(http, tiny_dir, adapter_dirs):
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=256)
    config = ServerConfig(allowed_lora_roots=(str(adapter_dirs["sql"].parent),))
    with serve(build_app(LocalBackend(eng, model_name=MODEL), config)) as base:
        r = http.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapter_dirs["sql"])})
        assert r.status_code == 400 and "enable_lora" in r.json()["error"]["message"]
    eng.shutdown()
