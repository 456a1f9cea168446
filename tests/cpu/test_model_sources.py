"""Where a model comes from and how users name it: hub ids in the local HF cache, vLLM's
CLI spellings, and the model's own defaults (generation_config, chat template kwargs) over HTTP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from radixserve.cli import build_parser, engine_kwargs
from radixserve.cluster.backend import LocalBackend
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine import LLM, AsyncLLMEngine, SamplingParams
from radixserve.engine.entrypoints.llm import engine_config
from tests.cpu.openai_harness import serve

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def fake_hub_cache(root: Path, tiny_dir: Path) -> Path:
    """models--acme--tiny as huggingface_hub lays it out: main and v1 point at two snapshots."""
    repo = root / "models--acme--tiny"
    for rev in (SNAPSHOT, OTHER):
        shutil.copytree(tiny_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    (repo / "refs" / "v1").write_text(OTHER)
    return root


def _resolve_in_subprocess(hub: Path, model: str, revision: str | None = None) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HUB_CACHE once, at import: a fresh process sees this one.
    code = ("import sys; from radixserve.engine.model.default_models import resolve_model; "
            f"print(resolve_model({model!r}, revision={revision!r}))")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_hub_id_resolves_from_the_local_hf_cache(tiny_dir, tmp_path):
    hub = fake_hub_cache(tmp_path / "hub", Path(tiny_dir))
    r = _resolve_in_subprocess(hub, "acme/tiny")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).name == SNAPSHOT
    r = _resolve_in_subprocess(hub, "acme/tiny", revision="v1")
    assert Path(r.stdout.strip()).name == OTHER, r.stderr
    r = _resolve_in_subprocess(hub, "acme/absent")
    assert r.returncode != 0 and "'acme/absent' is not in the local Hugging Face cache" in r.stderr


def test_cli_speaks_vllm(tmp_path):
    p = build_parser()
    a = p.parse_args(["serve", "small-llama", "-tp", "2", "--no-enable-prefix-caching", "--dtype", "half",
                      "--host", "0.0.0.0", "--served-model-name", "a", "b", "--enable-chunked-prefill"])
    assert (a.model_tag, a.http_host, a.served_model_name) == ("small-llama", "0.0.0.0", ["a", "b"])
    cfg = engine_config(a.model_tag, **engine_kwargs(a))
    assert cfg.parallel.tensor_parallel_size == 2 and cfg.model.dtype == "float16"
    assert cfg.cache.enable_prefix_caching is False and cfg.scheduler.enable_chunked_prefill is True
    for argv, want in ((["--enable-prefix-caching"], True), (["--enable-prefix-caching", "false"], False),
                       ([], True)):
        assert p.parse_args(["generate", "x", *argv]).enable_prefix_caching is want
    assert p.parse_args(["generate"]).model == "smollm2"  # the packaged instruct model is the default


@pytest.fixture
def defaults_dir(tiny_dir, tmp_path) -> Path:
    """tiny-llama with sampling defaults in generation_config.json and a template with a switch."""
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0, "max_new_tokens": 5}))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                            "{% if shout %}LOUDLY: {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_generation_config_defaults_offline(defaults_dir):
    llm = LLM(str(defaults_dir))
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5)
    outs = llm.generate(["a prompt", "a prompt"])  # no params: the model's greedy, 5 tokens
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert len(outs[0].outputs[0].token_ids) == 5 or outs[0].outputs[0].finish_reason == "stop"
    assert LLM(str(defaults_dir), generation_config="vllm").get_default_sampling_params() == SamplingParams()
    plain = llm.chat([{"role": "user", "content": "hi"}])[0].prompt
    assert llm.chat([{"role": "user", "content": "hi"}], chat_template_kwargs={"shout": True})[0].prompt \
        == plain + "LOUDLY: "


def test_defaults_aliases_and_template_kwargs_over_http(defaults_dir):
    engine = AsyncLLMEngine.from_kwargs(str(defaults_dir))
    try:
        app = build_app(LocalBackend(engine, model_name="tiny"), ServerConfig(served_model_name=("tiny", "alias")))
        with serve(app) as url, httpx.Client(timeout=60) as http:
            models = http.get(f"{url}/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["tiny", "alias"]
            outs = []
            for name in ("tiny", "alias", "tiny"):
                r = http.post(f"{url}/v1/completions", json={"model": name, "prompt": "same prompt"})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == "tiny"
                outs.append(r.json()["choices"][0]["text"])
                assert r.json()["usage"]["completion_tokens"] <= 5  # max_new_tokens from generation_config
            assert outs[0] == outs[1] == outs[2]  # temperature 0 from generation_config: greedy
            r = http.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "same prompt", "max_tokens": 8,
                                                         "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 8  # an explicit value wins
            chat = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                    "return_token_ids": True}
            plain = http.post(f"{url}/v1/chat/completions", json=chat).json()["prompt_token_ids"]
            loud = http.post(f"{url}/v1/chat/completions",
                             json={**chat, "chat_template_kwargs": {"shout": True}}).json()["prompt_token_ids"]
            tok = engine.tokenizer
            assert tok.decode(loud, skip_special_tokens=False) == tok.decode(plain, skip_special_tokens=False) \
                + "LOUDLY: "
            assert http.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    finally:
        engine.shutdown()
