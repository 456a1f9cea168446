"""The engine on CUDA: Triton attention backend == torch reference backend (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    from radixserve.engine.model.default_models import resolve_model
    return resolve_model("small-llama", str(tmp_path_factory.mktemp("models")))


def _greedy(model_dir, backend: str, dtype: str):
    from radixserve.engine import LLM, SamplingParams
    llm = LLM(str(model_dir), attention_backend=backend, dtype=dtype, max_model_len=4096,
              gpu_memory_utilization=0.5)
    prompts = ["The capital of France is", "A long shared prefix " * 100 + "and a question?",
               "short", "Numbers: " + " ".join(str(i) for i in range(300))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0))
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_backend_matches_torch_backend(small_dir, dtype):
    a, b = _greedy(small_dir, "torch", dtype), _greedy(small_dir, "triton", dtype)
    for x, y in zip(a, b):
        if dtype == "float32":
            assert x.token_ids == y.token_ids
        else:  # bf16: allow a late divergence after a near-tie, but not an early one
            same = next((i for i, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), len(x.token_ids))
            assert same >= 16


def test_cpu_tier_on_cuda(small_dir):
    from radixserve.engine import LLM, SamplingParams
    llm = LLM(str(small_dir), num_gpu_blocks=256, swap_space=1, max_model_len=4096)
    doc = "A document that will travel to the CPU tier and back. " * 150
    first = llm.generate([doc + "Q1"], SamplingParams(temperature=0, max_tokens=8))[0]
    for i in range(4):
        llm.generate([f"filler {i} " * 700], SamplingParams(max_tokens=1))
    again = llm.generate([doc + "Q1"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert again.num_cpu_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
