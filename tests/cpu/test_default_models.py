"""The embedded default models: deterministic generation, HF compatibility, concurrency."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radixserve.engine.model.default_models import (
    EMBEDDED_MODELS,
    EOT_TOKEN,
    MARKER_FILE,
    SPECIAL_TOKENS,
    EmbeddedModelSpec,
    model_dir,
    parameter_layout,
    resolve_model,
)
from radixserve.engine.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = EMBEDDED_MODELS["tiny-llama"]

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  \n\n\ttabs and newlines\r\n",
    "café naïve résumé déjà vu — 東京 and 大阪, emoji 🙂🎉 and 🏃‍♀️",
    "def f(x):\n    return {\"a\": [1, 2.5, None]}  # comment",
    "<|eot_id|> special tokens <|start_header_id|>user<|end_header_id|> inline",
    "",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return resolve_model("tiny-llama", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tiny_model(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def test_unknown_name_raises(tmp_path):
    with pytest.raises(ValueError) as exc:
        resolve_model("no-such-model", str(tmp_path))
    msg = str(exc.value)
    assert "'no-such-model'" in msg and "not a directory" in msg
    assert "tiny-llama" in msg and "small-llama" in msg
    assert not (tmp_path / "models").exists()


def test_existing_directory_is_returned_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_spec_validation():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        EmbeddedModelSpec(name="x", vocab_size=1024, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=3,
                          max_position_embeddings=128, rope_theta=10000.0)


def test_layout_and_config(tiny_model_dir):
    assert tiny_model_dir == model_dir("tiny-llama", tiny_model_dir.parent.parent)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["head_dim"]) == (2048, 64, 16)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_scaling"]["rope_type"] == "llama3"
    tok = Tokenizer(tiny_model_dir)
    assert tok.vocab_size == TINY.vocab_size
    assert cfg["eos_token_id"] == [tok._tok.token_to_id("<|end_of_text|>"), tok.eos_token_id]
    assert tok.id_to_token(tok.eos_token_id) == EOT_TOKEN
    assert tok.special_token_ids == {TINY.token_id(t) for t in SPECIAL_TOKENS}
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(weights) == {name for name, _, _ in parameter_layout(TINY)}
    assert "lm_head.weight" not in weights
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert not torch.all(norm == 1.0) and abs(norm.mean().item() - 1.0) < 0.1
    assert all(w.dtype == torch.float32 for w in weights.values())
    marker = json.loads((tiny_model_dir / MARKER_FILE).read_text())
    assert marker["spec"] == TINY.to_dict() and marker["cache_key"] == TINY.cache_key()


def test_generation_is_deterministic(tiny_model_dir, tmp_path):
    other = resolve_model("tiny-llama", str(tmp_path))
    assert other != tiny_model_dir and other.name == tiny_model_dir.name
    files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert files == sorted(p.name for p in other.iterdir())
    for name in files:  # byte-identical, weights and tokenizer.json included
        assert (tiny_model_dir / name).read_bytes() == (other / name).read_bytes(), name
    a, b = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_matches_transformers(tiny_model_dir, hf_tokenizer):
    tok = Tokenizer(tiny_model_dir)
    bos = TINY.token_id("<|begin_of_text|>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ids[0] == bos and ids.count(bos) == 1
        assert tok.encode(text, add_special_tokens=False) == hf_tokenizer(
            text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text
        assert hf_tokenizer.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text
        if "<|" not in text:
            assert tok.decode(ids) == text == hf_tokenizer.decode(ids, skip_special_tokens=True)
    # Byte-level: every text round-trips and no unknown tokens exist.
    assert len(tok.encode("🙂", add_special_tokens=False)) >= 1


def test_chat_template_matches_transformers(tiny_model_dir, hf_tokenizer):
    tok = Tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hi! Où est la gare? 東京 🙂"},
                {"role": "assistant", "content": "  Right here.\n"},
                {"role": "user", "content": "Thanks"}]
    for gen in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        assert tok.encode_chat(messages, add_generation_prompt=gen) == list(ids)
    text = tok.apply_chat_template(messages[:2])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful."
                    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi! Où est la gare? 東京 🙂"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_next_token_distribution_is_not_uniform(tiny_model_dir, hf_tiny_model):
    tok = Tokenizer(tiny_model_dir)
    prompts = ["The quick brown fox", "Once upon a time, in a small village by the sea,",
               "def factorial(n):", "User: What is 2 + 2?\nAssistant:"]
    top1 = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            logits = hf_tiny_model(ids).logits[0, -1]
        assert torch.isfinite(logits).all()
        probs = logits.softmax(-1)
        top1.append(probs.max().item())
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).item() > 1e-3  # a clear greedy winner
    assert min(top1) > 20 / TINY.vocab_size, top1
    assert sum(top1) / len(top1) > 0.05, top1


_RESOLVE = ("import sys; from radixserve.engine.model.default_models import resolve_model; "
            "print(resolve_model('tiny-llama', sys.argv[1]))")


def test_concurrent_resolves_give_one_valid_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _RESOLVE, str(tmp_path)], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    models = tmp_path / "models"
    dirs = [p for p in models.iterdir() if p.is_dir()]
    assert dirs == [Path(paths.pop())]  # no temp dirs left behind
    assert json.loads((dirs[0] / MARKER_FILE).read_text())["cache_key"] == TINY.cache_key()
    assert Tokenizer(dirs[0]).vocab_size == TINY.vocab_size


def test_crashed_generation_is_not_mistaken_for_a_model(tmp_path):
    final = model_dir("tiny-llama", tmp_path)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".tmp-{final.name}-crashed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    final.mkdir()  # a half-copied directory without the marker
    (final / "config.json").write_text("{}")
    assert resolve_model("tiny-llama", str(tmp_path)) == final
    assert not stale.exists()
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"
    assert (final / "model.safetensors").is_file() and (final / MARKER_FILE).is_file()


@pytest.mark.slow
def test_small_llama_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = EMBEDDED_MODELS["small-llama"]
    path = resolve_model("small-llama", str(tmp_path))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                  "model-00002-of-00002.safetensors"}
    assert set(index["weight_map"]) == {name for name, _, _ in parameter_layout(spec)}
    assert "lm_head.weight" in index["weight_map"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    n = sum(p.numel() for p in model.parameters())
    assert n == spec.num_parameters() == index["metadata"]["total_parameters"]
    assert 90e6 < n < 120e6
    tok = Tokenizer(path)
    assert tok.vocab_size == 8192
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("Once upon a time")])).logits[0, -1]
    assert logits.softmax(-1).max().item() > 20 / spec.vocab_size
