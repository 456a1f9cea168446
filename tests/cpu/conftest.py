"""Shared fixtures: the embedded tiny model (generated once per test session) and
the OpenAI HTTP server over a real engine (tests/cpu/openai_harness.py)."""
from __future__ import annotations

import httpx
import pytest

from radixserve.cluster.backend import LocalBackend
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine import AsyncLLMEngine
from radixserve.engine.model.default_models import resolve_model
from tests.cpu.helpers import write_hf_dir
from tests.cpu.openai_harness import KEYS, MAX_LEN, MODEL, serve


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_dir(model_cache_dir):
    return resolve_model("tiny-llama", cache_dir=model_cache_dir)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory, tiny_dir):
    """A Mistral (GQA, 1 KV head) HF directory on the tiny tokenizer -> (path, the HF model)."""
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                        sliding_window=None, initializer_range=0.15, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("mistral")
    model = write_hf_dir(path, tiny_dir, MistralForCausalLM, cfg)
    return path, model


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    """transformers' own LlamaForCausalLM on the same weights, fp32, eval."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model.eval()


# -- the OpenAI server of test_openai_*.py ------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=MAX_LEN)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def backend(engine):
    return LocalBackend(engine, model_name=MODEL)


@pytest.fixture(scope="module")
def url(backend):
    with serve(build_app(backend, ServerConfig())) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(backend):
    with serve(build_app(backend, ServerConfig(api_keys=KEYS))) as base:
        yield base


@pytest.fixture
def http():
    with httpx.Client(timeout=60) as client:
        yield client
