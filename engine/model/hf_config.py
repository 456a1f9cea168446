"""Parse and validate a Hugging Face ``config.json`` for the Llama family.

Accepts both the transformers 4.x layout (``rope_theta`` + ``rope_scaling``)
and the 5.x one (``rope_parameters``). Every failure names the file and field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Architectures whose weights and math this model implementation covers.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None or {"rope_type": ..., params}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 (and Llama with attention_bias) project q/k/v with a bias
    o_bias: bool  # Llama's attention_bias also covers o_proj; Qwen2's does not
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    sliding_window: int | None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.json: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json: num_attention_heads ({self.num_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_kv_heads})")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _rope(cfg: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters") or {}
    if "rope_parameters" in cfg and isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]  # per-layer-type layout
    scaling = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    merged = {k: v for k, v in merged.items() if k not in ("rope_theta", "type")}
    merged["rope_type"] = rope_type
    return theta, merged


def load_arch_config(model_dir: str | Path) -> ArchConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    cfg = _read_json(path)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{path}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true is not supported")
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope(cfg, path)
        gen_cfg = model_dir / "generation_config.json"
        eos = _eos_ids(cfg.get("eos_token_id"))
        if gen_cfg.is_file():
            eos = tuple(dict.fromkeys(eos + _eos_ids(_read_json(gen_cfg).get("eos_token_id"))))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return ArchConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            o_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            sliding_window=int(window) if window else None,
        )
    except KeyError as exc:
        raise ValueError(f"{path}: required field {exc.args[0]!r} is missing") from exc
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {exc}") from exc


# generation_config.json fields that become a request's defaults (vLLM's --generation-config auto).
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str | Path, setting: str = "auto") -> dict[str, Any]:
    """SamplingParams defaults from generation_config.json (empty when it has none).

    ``setting`` is ModelConfig.generation_config: "auto" reads the model's own file,
    "vllm" none, anything else is a directory holding one. Only the fields a request
    leaves unset take these, as in vLLM; an explicit value always wins.
    """
    if setting == "vllm":
        return {}
    folder = Path(model_dir) if setting == "auto" else Path(setting).expanduser()
    if setting != "auto" and not folder.is_dir():
        raise ValueError(f"generation_config {setting!r}: not auto, vllm or a directory")
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = _read_json(path)
    return {ours: cfg[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if cfg.get(theirs) is not None}
