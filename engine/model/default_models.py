"""The embedded default models ``tiny-llama`` and ``small-llama``.

Nothing is ever downloaded. On first use an embedded model is generated
deterministically and written once, as an ordinary Hugging Face Llama directory,
into a cache directory; from then on it is loaded like any other HF directory
(by the engine and by transformers alike).

What gets generated:

* **Tokenizer**: a byte-level BPE (``tokenizers`` ``models.BPE`` with a
  ``ByteLevel`` pre-tokenizer and decoder) trained on ``data/corpus.txt``,
  which ships with the package. The trained vocabulary takes the first
  ``vocab_size - len(SPECIAL_TOKENS)`` ids; the Llama-3-style special tokens
  follow at the end. A ``TemplateProcessing`` post-processor prepends
  ``<|begin_of_text|>`` when ``add_special_tokens=True``.

  Determinism: the BPE trainer breaks ties between equally frequent pairs by
  the pair's ids, and two trainings with parallelism on (in separate processes,
  so with differently seeded hash maps) were observed to give byte-identical
  results. To make it deterministic by construction anyway, and to keep the
  library's rayon thread pool and its "used parallelism before fork" flag out
  of the calling process (engine workers are often forked), training runs in a
  short child process with ``TOKENIZERS_PARALLELISM=false`` set in the child's
  environment only. Everything after training (special tokens, decoder,
  post-processor) is built in-process and uses no parallelism.

* **Weights**: drawn on CPU from ``torch.Generator().manual_seed(spec.seed)``
  as float32, one ``torch.randn`` call per tensor, in the order of
  :func:`parameter_layout` (``model.embed_tokens.weight``; then per layer
  ``input_layernorm``, ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
  ``post_attention_layernorm``, ``gate_proj``, ``up_proj``, ``down_proj``;
  then ``model.norm.weight``; then ``lm_head.weight`` when untied). Linear
  weights are ``std * randn`` (stds in :func:`init_std`), norm weights are
  ``1 + 0.1 * randn``. Every value is then rounded to the nearest bfloat16
  (still stored as float32), so running the model in bfloat16 loses no weight
  precision and float32 runs on different machines agree as closely as
  possible. The stds are chosen so that the final logits have a standard
  deviation of about 3 (top-1 probabilities from a few percent to well over
  half, clear greedy winners) and every block writes a residual update of about
  the size of the embedding, so the next token depends on the whole context,
  not only on the current token.

Generated directories live in ``<cache>/models/<name>-<key>``, where ``key``
is a short hash of the spec, :data:`GENERATOR_VERSION` and the corpus. They
are written into a temporary sibling directory and renamed into place
atomically while holding an ``fcntl`` lock, so concurrent resolvers (tensor
parallel workers, replicas) generate once and never see a partial model.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, processors

# Bump whenever the generated files change for an unchanged spec (init, file
# layout, tokenizer construction); it is part of the cache key.
GENERATOR_VERSION = 1

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"
MARKER_FILE = "radixserve_embedded.json"

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
NUM_RESERVED_SPECIAL_TOKENS = 11
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, END_OF_TEXT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN,
    *(f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS)),
)

CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Target standard deviation of the final logits (see init_std).
_LOGIT_STD = 3.0
_NORM_WEIGHT_STD = 0.1

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Everything that determines one embedded model (Llama architecture)."""

    name: str
    vocab_size: int  # tokenizer size including SPECIAL_TOKENS; also the embedding rows
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    seed: int = 0
    num_shards: int = 1  # 1: model.safetensors; >1: model-0000i-of-0000n + index

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and _NAME_RE.fullmatch(self.name) is not None,
                 f"name must match {_NAME_RE.pattern}, got {self.name!r}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "num_shards"):
            v = getattr(self, f)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                     f"{self.name}: {f} must be an int >= 1, got {v!r}")
        _require(self.vocab_size >= 256 + len(SPECIAL_TOKENS) + 1,
                 f"{self.name}: vocab_size must be > 256 byte tokens + {len(SPECIAL_TOKENS)} "
                 f"special tokens, got {self.vocab_size}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"{self.name}: hidden_size {self.hidden_size} must be divisible by "
                 f"num_attention_heads {self.num_attention_heads}")
        _require(self.head_dim % 2 == 0, f"{self.name}: head_dim {self.head_dim} must be even (RoPE)")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"{self.name}: num_attention_heads {self.num_attention_heads} must be divisible "
                 f"by num_key_value_heads {self.num_key_value_heads}")
        _require(isinstance(self.rope_theta, float) and self.rope_theta > 0,
                 f"{self.name}: rope_theta must be a float > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            _require(isinstance(self.rope_scaling, dict),
                     f"{self.name}: rope_scaling must be a dict or None, got {self.rope_scaling!r}")
            rs = dict(self.rope_scaling)  # private copy: the caller's dict may change later
            object.__setattr__(self, "rope_scaling", rs)
            kind = rs.get("rope_type")
            _require(kind in ("llama3", "linear"),
                     f"{self.name}: rope_scaling.rope_type must be llama3 or linear, got {kind!r}")
            _require(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1,
                     f"{self.name}: rope_scaling.factor must be >= 1, got {rs.get('factor')!r}")
            need = {"rope_type", "factor"}
            if kind == "llama3":
                need |= {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            _require(set(rs) == need, f"{self.name}: {kind} rope_scaling needs exactly the keys "
                                      f"{sorted(need)}, got {sorted(rs)}")
            if kind == "llama3":
                _require(0 < rs["low_freq_factor"] < rs["high_freq_factor"],
                         f"{self.name}: rope_scaling needs 0 < low_freq_factor < high_freq_factor")
                orig = rs["original_max_position_embeddings"]
                _require(isinstance(orig, int) and 1 <= orig <= self.max_position_embeddings,
                         f"{self.name}: rope_scaling.original_max_position_embeddings must be an int "
                         f"in [1, max_position_embeddings], got {orig!r}")
        _require(isinstance(self.tie_word_embeddings, bool),
                 f"{self.name}: tie_word_embeddings must be a bool")
        _require(isinstance(self.rms_norm_eps, float) and 0 < self.rms_norm_eps < 1,
                 f"{self.name}: rms_norm_eps must be a float in (0, 1), got {self.rms_norm_eps!r}")
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                 f"{self.name}: seed must be an int in [0, 2**63), got {self.seed!r}")
        shards = shard_plan(self)
        _require(len(set(shards.values())) == self.num_shards,
                 f"{self.name}: num_shards {self.num_shards} leaves an empty shard")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def bpe_vocab_size(self) -> int:
        """Size of the trained part of the vocabulary (256 bytes + merges)."""
        return self.vocab_size - len(SPECIAL_TOKENS)

    def token_id(self, token: str) -> int:
        return self.bpe_vocab_size + SPECIAL_TOKENS.index(token)

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in parameter_layout(self))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        return d

    def cache_key(self) -> str:
        """Short hash of everything that determines the generated files."""
        blob = json.dumps({"generator_version": GENERATOR_VERSION, "spec": self.to_dict(),
                           "corpus_sha256": _corpus_sha256()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- weights

def parameter_layout(spec: EmbeddedModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every tensor, in the order the weights are drawn."""
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (spec.vocab_size, h), "embed")]
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (q, h), "q_proj"),
            (f"{p}.self_attn.k_proj.weight", (kv, h), "k_proj"),
            (f"{p}.self_attn.v_proj.weight", (kv, h), "v_proj"),
            (f"{p}.self_attn.o_proj.weight", (h, q), "o_proj"),
            (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
            (f"{p}.mlp.gate_proj.weight", (i, h), "gate_proj"),
            (f"{p}.mlp.up_proj.weight", (i, h), "up_proj"),
            (f"{p}.mlp.down_proj.weight", (h, i), "down_proj"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    if not spec.tie_word_embeddings:
        out.append(("lm_head.weight", (spec.vocab_size, h), "lm_head"))
    return out


def init_std(spec: EmbeddedModelSpec, kind: str) -> float:
    """Standard deviation of the Gaussian that tensors of ``kind`` are drawn from.

    The final norm makes the last hidden state's RMS about 1, so logits have a
    std of about ``sqrt(hidden) * std(lm_head)``; the output embedding is scaled
    to make that ``_LOGIT_STD``. Projections use ``1/sqrt(fan_in)`` (unit-scale
    activations), q doubled so attention is noticeably peaked (score std ~2).
    ``o_proj`` and ``down_proj`` are scaled up (3x and 6x) so that every block's
    residual update outweighs the embedding (RMS 1 untied, ~0.4 tied): with a
    tied embedding a dominant embedding would make the model mostly repeat the
    current token. Tuned on prompts from the corpus: mean top-1 probability
    ~0.25 (tiny) / ~0.17 (small), greedy output repeats the previous token
    only ~2% (tiny) / ~0% (small) of the time.
    """
    h, i = spec.hidden_size, spec.intermediate_size
    q_width = spec.num_attention_heads * spec.head_dim
    out_std = _LOGIT_STD / math.sqrt(h)
    if kind == "lm_head" or (kind == "embed" and spec.tie_word_embeddings):
        return out_std
    return {
        "embed": 1.0,
        "q_proj": 2.0 / math.sqrt(h),
        "k_proj": 1.0 / math.sqrt(h),
        "v_proj": 1.0 / math.sqrt(h),
        "o_proj": 3.0 / math.sqrt(q_width),
        "gate_proj": 1.0 / math.sqrt(h),
        "up_proj": 1.0 / math.sqrt(h),
        "down_proj": 6.0 / math.sqrt(i),
    }[kind]


def shard_plan(spec: EmbeddedModelSpec) -> dict[str, int]:
    """Tensor name -> shard index: contiguous runs of the draw order, balanced by bytes."""
    layout = parameter_layout(spec)
    sizes = [math.prod(shape) * 4 for _, shape, _ in layout]
    total, before, plan = sum(sizes), 0, {}
    for (name, _, _), size in zip(layout, sizes):
        plan[name] = min(spec.num_shards - 1, before * spec.num_shards // total)
        before += size
    return plan


EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    spec.name: spec for spec in (
        # For tests: GQA with 2 KV heads (TP=2 divides them) and llama3 RoPE scaling.
        # With head_dim 16 and theta 1e4 the rotary wavelengths are 6 to 2e4 positions,
        # so llama3 scaling leaves some frequencies alone (< 64), smooths one (64..256)
        # and divides the rest by 8 (> 256): all three branches are exercised.
        EmbeddedModelSpec(
            name="tiny-llama", vocab_size=2048, hidden_size=64, intermediate_size=176,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
            tie_word_embeddings=True, rms_norm_eps=1e-5, seed=1234, num_shards=1),
        # For benchmarks: about 106M parameters, untied lm_head, two shards.
        EmbeddedModelSpec(
            name="small-llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816,
            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
            max_position_embeddings=8192, rope_theta=500000.0, rope_scaling=None,
            tie_word_embeddings=False, rms_norm_eps=1e-5, seed=4321, num_shards=2),
    )
}


def iter_weights(spec: EmbeddedModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) in :func:`parameter_layout` order, deterministically."""
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    for name, shape, kind in parameter_layout(spec):
        w = torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")
        if kind == "norm":
            w = w.mul_(_NORM_WEIGHT_STD).add_(1.0)
        else:
            w = w.mul_(init_std(spec, kind))
        yield name, w.to(torch.bfloat16).to(torch.float32)


def _shard_file_name(index: int, num_shards: int) -> str:
    return f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"


def _write_weights(spec: EmbeddedModelSpec, out_dir: Path) -> None:
    if spec.num_shards == 1:
        save_file(dict(iter_weights(spec)), str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    # Sharded: tensors of a shard are contiguous in draw order, so each shard is
    # written as soon as it is complete (peak memory: one shard).
    plan = shard_plan(spec)
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    current_shard, total_size, total_params = 0, 0, 0

    def flush() -> None:
        save_file(current, str(out_dir / _shard_file_name(current_shard, spec.num_shards)),
                  metadata={"format": "pt"})
        current.clear()

    for name, w in iter_weights(spec):
        if plan[name] != current_shard:
            flush()
            current_shard = plan[name]
        current[name] = w
        weight_map[name] = _shard_file_name(current_shard, spec.num_shards)
        total_size += w.numel() * w.element_size()
        total_params += w.numel()
    flush()
    # Exactly what transformers' save_pretrained writes for a sharded checkpoint.
    index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
             "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- tokenizer

# Runs in a child process (see the module docstring). Reads {"corpus", "vocab_size",
# "out"} as JSON from stdin and saves the trained tokenizer to "out".
_TRAIN_SCRIPT = """
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
args = json.load(sys.stdin)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=args["vocab_size"], min_frequency=0, show_progress=False,
                              special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([args["corpus"]], trainer)
tok.save(args["out"])
"""


def _train_bpe(vocab_size: int) -> Tokenizer:
    """Train the plain BPE in a single-threaded child process."""
    if not sys.executable:
        raise RuntimeError("cannot train the embedded tokenizer: sys.executable is unknown")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="radixserve-bpe-") as tmp:
        out = os.path.join(tmp, "tokenizer.json")
        args = {"corpus": str(CORPUS_PATH), "vocab_size": vocab_size, "out": out}
        proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT], input=json.dumps(args),
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"tokenizer training subprocess failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return Tokenizer.from_file(out)


def build_tokenizer(spec: EmbeddedModelSpec) -> Tokenizer:
    """Train the byte-level BPE of ``spec`` and add special tokens and post-processor."""
    tok = _train_bpe(spec.bpe_vocab_size)
    got = tok.get_vocab_size()
    if got != spec.bpe_vocab_size:
        raise RuntimeError(f"{spec.name}: BPE training on {CORPUS_PATH} reached only {got} tokens, "
                           f"{spec.bpe_vocab_size} needed; the corpus is too small for vocab_size "
                           f"{spec.vocab_size}")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for t in SPECIAL_TOKENS:
        assert tok.token_to_id(t) == spec.token_id(t), (t, tok.token_to_id(t))
    bos = (BOS_TOKEN, spec.token_id(BOS_TOKEN))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                      pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
                                      special_tokens=[bos]),
    ])
    return tok


# --------------------------------------------------------------------------- files

def _config_json(spec: EmbeddedModelSpec) -> dict[str, Any]:
    rope_parameters = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope_parameters = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": spec.rms_norm_eps,
        # Both spellings: rope_theta/rope_scaling (transformers 4.x and most
        # loaders) and rope_parameters (transformers 5.x); they agree.
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling is not None else None,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": spec.token_id(BOS_TOKEN),
        "eos_token_id": [spec.token_id(END_OF_TEXT_TOKEN), spec.token_id(EOT_TOKEN)],
        "pad_token_id": None,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _tokenizer_config_json(spec: EmbeddedModelSpec) -> dict[str, Any]:
    added = {
        str(spec.token_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    # No add_bos_token: the tokenizer.json post-processor adds BOS (transformers 5
    # would otherwise replace that post-processor with its own).
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _marker_json(spec: EmbeddedModelSpec) -> dict[str, Any]:
    return {"name": spec.name, "generator_version": GENERATOR_VERSION, "cache_key": spec.cache_key(),
            "corpus_sha256": _corpus_sha256(), "num_parameters": spec.num_parameters(),
            "torch_version": torch.__version__, "spec": spec.to_dict()}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model(spec: EmbeddedModelSpec, out_dir: str | Path) -> Path:
    """Write the complete HF model directory of ``spec`` into the existing ``out_dir``.

    The marker file ``radixserve_embedded.json`` is written last. Callers that
    publish the directory concurrently should use :func:`resolve_model`.
    """
    out_dir = Path(out_dir)
    tok = build_tokenizer(spec)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config_json(spec))
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN})
    _write_json(out_dir / "config.json", _config_json(spec))
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": spec.token_id(BOS_TOKEN),
        "eos_token_id": [spec.token_id(END_OF_TEXT_TOKEN), spec.token_id(EOT_TOKEN)],
    })
    _write_weights(spec, out_dir)
    _write_json(out_dir / MARKER_FILE, _marker_json(spec))
    return out_dir


# --------------------------------------------------------------------------- resolve

def _corpus_sha256() -> str:
    return hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest()


def default_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: ignore relative
    return base / "radixserve"


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the embedded model ``name`` lives (generated or not)."""
    spec = EMBEDDED_MODELS[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "models" / f"{spec.name}-{spec.cache_key()}"


def _is_complete(path: Path, spec: EmbeddedModelSpec) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("cache_key") == spec.cache_key()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.iterdir()):
        os.chmod(p, 0o644)  # safetensors creates its files 0600
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(final: Path, write: Callable[[Path], None]) -> None:
    """Write a model directory with ``write(tmp)`` and rename it to ``final``; the caller holds the lock."""
    parent = final.parent
    tmp_prefix = f".tmp-{final.name}-"
    # Only lock holders create temp dirs, so any left over are from crashed runs.
    for stale in parent.glob(tmp_prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # not complete (checked by the caller): not ours to trust
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{final.name}-", dir=parent))
        os.rename(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.rename(tmp, final)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(final: Path, is_complete: Callable[[Path], bool], write: Callable[[Path], None]) -> Path:
    """``final`` once complete, writing it first if needed; safe from several processes at once."""
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not is_complete(final):
                _publish(final, write)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return final


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A hub id's snapshot in the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``); never downloads."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:
        raise ValueError(f"model {repo_id!r} looks like a hub id; resolving one from the local Hugging Face "
                         "cache needs huggingface_hub (pip install huggingface_hub)") from exc
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"model {repo_id!r}{at} is not in the local Hugging Face cache "
                         "(HF_HOME / HF_HUB_CACHE) and nothing is downloaded at run time; "
                         "download it where a network is allowed, or pass a directory") from exc


def resolve_model(name_or_path: str, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Return the HF directory for ``name_or_path``, generating or converting it if needed.

    * an existing directory is returned as is;
    * a ``.gguf`` file is converted once into ``<cache_dir>/models/`` (see gguf_convert);
    * a packaged model name (``smollm2``) is the GGUF file a registry package ships;
    * an embedded model name is generated on first use into ``<cache_dir>/models/<name>-<key>``;
    * a hub id (``org/name``) is its snapshot in the local Hugging Face cache, at ``revision``.

    ``cache_dir`` defaults to ``$XDG_CACHE_HOME/radixserve`` or ``~/.cache/radixserve``.
    Safe to call from several processes at once.
    """
    from radixserve.engine.model import gguf_convert
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return Path(name_or_path)
    if name_or_path.endswith(".gguf") or name_or_path in gguf_convert.PACKAGED_MODELS:
        gguf_file = path if name_or_path.endswith(".gguf") else gguf_convert.packaged_gguf(name_or_path)
        if not gguf_file.is_file():
            raise ValueError(f"GGUF file {str(gguf_file)!r} does not exist")
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        final = root / "models" / gguf_convert.cache_name(gguf_file)
        return build_once(final, gguf_convert.is_converted, lambda tmp: gguf_convert.convert(gguf_file, tmp))
    spec = EMBEDDED_MODELS.get(name_or_path)
    if spec is None and _HUB_ID.fullmatch(name_or_path):
        return _hub_snapshot(name_or_path, revision)
    if spec is None:
        raise ValueError(
            f"model {name_or_path!r} is not a directory, a .gguf file, a hub id or a known model name; "
            f"names: {', '.join(sorted([*EMBEDDED_MODELS, *gguf_convert.PACKAGED_MODELS]))}")
    return build_once(model_dir(spec.name, cache_dir), lambda p: _is_complete(p, spec),
                      lambda tmp: write_model(spec, tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate (if needed) an embedded model and "
                                                 "print its directory.")
    parser.add_argument("model", choices=sorted(EMBEDDED_MODELS))
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    print(resolve_model(args.model, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
