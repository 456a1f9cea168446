"""Loading real Hugging Face directories that the tests write themselves."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.hf_config import load_arch_config
from tests.cpu.helpers import assert_matches_hf, random_prompts, write_hf_dir


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.15, rope_theta=10000.0)
    path = tmp_path_factory.mktemp("qwen2")
    model = write_hf_dir(path, tiny_dir, Qwen2ForCausalLM, cfg)
    return path, model


def test_qwen2_sharded_untied_with_qkv_bias(qwen2_dir):
    path, hf = qwen2_dir
    assert (path / "model.safetensors.index.json").exists()
    arch = load_arch_config(path)
    assert arch.qkv_bias and not arch.o_bias and not arch.tie_word_embeddings
    llm = LLM(str(path))
    assert_matches_hf(hf, llm, random_prompts(3, 2048, seed=5), max_new=8)


def test_mistral_gqa_single_kv_head(mistral_dir):
    path, hf = mistral_dir
    llm = LLM(str(path))
    assert_matches_hf(hf, llm, random_prompts(2, 2048, seed=6), max_new=8)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_files_are_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m1")
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        LLM(str(d))
    d = _copy(tiny_dir, tmp_path / "m2")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        LLM(str(d))
    d = _copy(tiny_dir, tmp_path / "m3")
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(d))


def test_unsupported_architecture(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(d))


def test_shape_mismatch_names_tensor(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape"):
        LLM(str(d))


def test_missing_tensor_is_reported(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        LLM(str(d))


def test_llama3_rope_scaling_is_parsed(tiny_dir):
    arch = load_arch_config(tiny_dir)
    assert arch.rope_scaling and arch.rope_scaling["rope_type"] == "llama3"


def test_max_model_len_beyond_model_limit(tiny_dir):
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        LLM(str(tiny_dir), max_model_len=10**6)


def test_loads_only_this_ranks_slice(tiny_dir):
    # Sharded loading: rank 1 of 2 gets the second half of q/k/v rows and the
    # second half of o_proj's input columns, read straight from safetensors.
    from radixserve.engine.model.loader import build_model
    from radixserve.engine.worker.distributed import TPGroup
    arch = load_arch_config(tiny_dir)
    full = load_file(tiny_dir / "model.safetensors")
    model = build_model(arch, tiny_dir, TPGroup(1, 2), torch.float32, torch.device("cpu"), 64)
    attn = model.layers[0].self_attn
    q_rows = arch.num_heads * arch.head_dim // 2
    assert torch.equal(attn.qkv_proj.weight[:q_rows], full["model.layers.0.self_attn.q_proj.weight"][q_rows:])
    o = full["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(attn.o_proj.weight, o[:, o.shape[1] // 2:])
    assert SamplingParams  # keeps the public import path exercised
