"""Read and validate a PEFT LoRA adapter directory for a Llama-family base model.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with tensors named like
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (A is
``[r, in_features]``, B is ``[out_features, r]``). The delta of a target
module is ``scaling * B @ A`` with ``scaling = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``); ``rank_pattern`` and
``alpha_pattern`` override r and alpha per module, as in PEFT.

Every error names the file and the problem, and is a ValueError: a bad
directory is refused before anything is queued, and the engine keeps serving.

The content hash (sha256 over every tensor's name, dtype, shape and bytes and
every module's scaling) identifies *what the adapter computes*: it goes into
the prefix-cache namespace, so a reloaded adapter whose weights changed can
never hit blocks computed with the old ones.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from radixserve.engine.model.hf_config import ArchConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Target module -> the decoder block it lives in. Column-parallel ones shard B's
# rows across tensor-parallel ranks; row-parallel ones shard A's columns.
TARGET_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})

_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")
# Config switches whose adapters compute something we do not: refused, never ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adapters are not supported",
    "modules_to_save": "modules_to_save (fully fine-tuned extra modules) is not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layouts) are not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "target_parameters": "target_parameters is not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
}


def module_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """Target module -> (in_features, out_features) of the full (unsharded) base layer."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    h, inter = arch.hidden_size, arch.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass(frozen=True)
class ModuleLoRA:
    """One target module of one layer: delta = scaling * b @ a."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float


@dataclass(frozen=True)
class ParsedAdapter:
    path: Path
    rank: int                       # largest r over its modules
    target_modules: tuple[str, ...]  # modules that have weights, in TARGET_MODULES order
    modules: dict[tuple[int, str], ModuleLoRA]  # (layer, module) -> weights
    content_hash: str               # sha256 hex
    files_signature: tuple[int, ...]  # stat of both files, for cheap change detection


def files_signature(path: str | Path) -> tuple[int, ...]:
    """(inode, size, mtime_ns, ctime_ns) of the config and the weights; () when either is missing.
    Two stats: cheap enough to check on every request."""
    out: list[int] = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = (Path(path) / name).stat()
        except OSError:
            return ()
        out += [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return tuple(out)


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a pattern matches a module-name suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_config(path: Path, max_lora_rank: int) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path}: missing (not a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path}: invalid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {peft_type!r} is not supported (only LORA)")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {why} ({key} = {cfg[key]!r})")
    if cfg.get("bias", "none") not in ("none", None):
        raise ValueError(f"{cfg_path}: bias = {cfg['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ValueError(f"{cfg_path}: {key} must be a positive number, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{cfg_path}: {key} must be an object, got {cfg[key]!r}")
    ranks = {"r": cfg["r"], **{f"rank_pattern[{k!r}]": v for k, v in (cfg.get("rank_pattern") or {}).items()}}
    for where, r in ranks.items():
        if r > max_lora_rank:
            raise ValueError(f"{cfg_path}: {where} = {r} exceeds max_lora_rank = {max_lora_rank} "
                             f"(start the engine with a larger max_lora_rank)")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if str(t).rsplit(".", 1)[-1] not in TARGET_MODULES:
                raise ValueError(f"{cfg_path}: unsupported target module {t!r} "
                                 f"(supported: {', '.join(TARGET_MODULES)})")
    return cfg


def _content_hash(tensors: dict[str, torch.Tensor], scalings: dict[str, float]) -> str:
    h = hashlib.sha256(b"radixserve-lora-v1\0")
    h.update(json.dumps(sorted(scalings.items())).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_adapter(path: str | Path, arch: ArchConfig, max_lora_rank: int) -> ParsedAdapter:
    """Parse, validate and hash the adapter at ``path`` for the base model ``arch``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path}: LoRA adapter directory does not exist")
    signature = files_signature(path)
    cfg = _read_config(path, max_lora_rank)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not w_path.is_file():
        hint = " (adapter_model.bin is not supported: convert it to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{w_path}: missing{hint}")
    try:
        tensors = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{w_path}: not a readable safetensors file ({exc})") from exc
    if not tensors:
        raise ValueError(f"{w_path}: holds no tensors")

    shapes = module_shapes(arch)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _TENSOR.match(name)
        if m is None:
            mod = re.search(r"\.(\w+)\.lora_(?:A|B|embedding_A|embedding_B)\b", name)
            if mod and mod.group(1) not in TARGET_MODULES:
                raise ValueError(f"{w_path}: tensor {name!r} targets module {mod.group(1)!r}, which is not "
                                 f"supported (supported: {', '.join(TARGET_MODULES)})")
            raise ValueError(f"{w_path}: unexpected tensor {name!r} (expected PEFT names like "
                             f"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')")
        layer, block, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in TARGET_MODULES or TARGET_MODULES[module] != block:
            raise ValueError(f"{w_path}: tensor {name!r} targets module {block}.{module}, which is not "
                             f"supported (supported: {', '.join(TARGET_MODULES)})")
        if layer >= arch.num_layers:
            raise ValueError(f"{w_path}: tensor {name!r} is for layer {layer}, but the base model has "
                             f"{arch.num_layers} layers")
        if not t.is_floating_point():
            raise ValueError(f"{w_path}: tensor {name!r} has dtype {t.dtype}, expected a float type")
        if not torch.isfinite(t).all():
            raise ValueError(f"{w_path}: tensor {name!r} contains NaN or inf")
        pairs.setdefault((layer, module), {})[which] = t

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[tuple[int, str], ModuleLoRA] = {}
    scalings: dict[str, float] = {}
    for (layer, module), ab in sorted(pairs.items()):
        key = f"model.layers.{layer}.{TARGET_MODULES[module]}.{module}"
        prefix = f"base_model.model.{key}"
        for which in ("A", "B"):
            if which not in ab:
                raise ValueError(f"{w_path}: {prefix}.lora_{which}.weight is missing (its lora_"
                                 f"{'B' if which == 'A' else 'A'} is present)")
        a, b = ab["A"], ab["B"]
        r = int(_pattern_value(rank_pattern, key, cfg["r"]))
        alpha = float(_pattern_value(alpha_pattern, key, cfg["lora_alpha"]))
        in_f, out_f = shapes[module]
        if tuple(a.shape) != (r, in_f):
            raise ValueError(f"{w_path}: tensor '{prefix}.lora_A.weight' has shape {list(a.shape)}, expected "
                             f"{[r, in_f]} (r = {r} from {cfg_path.name}, in_features = {in_f} of the base "
                             f"{module})")
        if tuple(b.shape) != (out_f, r):
            raise ValueError(f"{w_path}: tensor '{prefix}.lora_B.weight' has shape {list(b.shape)}, expected "
                             f"{[out_f, r]} (out_features = {out_f} of the base {module}, r = {r})")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[(layer, module)] = ModuleLoRA(a, b, scaling)
        scalings[key] = scaling
    present = {module for _, module in modules}
    return ParsedAdapter(
        path=path, rank=max(m.a.shape[0] for m in modules.values()),
        target_modules=tuple(t for t in TARGET_MODULES if t in present), modules=modules,
        content_hash=_content_hash(tensors, scalings), files_signature=signature)
