"""Shared fixtures: the embedded tiny model, generated once per test session."""
from __future__ import annotations

import pytest

from engine.model.default_models import resolve_model


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_dir(model_cache_dir):
    return resolve_model("tiny-llama", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    """transformers' own LlamaForCausalLM on the same weights, fp32, eval."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model.eval()
