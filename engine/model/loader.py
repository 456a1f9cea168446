"""Load a Hugging Face checkpoint into a (tensor-parallel) model, reading
only this rank's slice of each tensor from safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from radixserve.engine.model.hf_config import ArchConfig
from radixserve.engine.model.layers import ShardTarget
from radixserve.engine.model.llama import LlamaForCausalLM
from radixserve.engine.worker.distributed import TPGroup

# Checkpoint tensors that are derived, not parameters: skipped, not an error.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise ValueError(f"{index}: names shard {fname!r} for {name!r}, which is missing")
            files[name] = path
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{model_dir}: no *.safetensors weights (model.safetensors or an index); "
                         f".bin/.pt checkpoints are not supported, convert them to safetensors")
    files = {}
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                files[name] = path
    return files


def _read_shard(f, name: str, target: ShardTarget, tp: TPGroup, path: Path) -> torch.Tensor:
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != target.full_shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)}, expected "
                         f"{list(target.full_shape)} from config.json")
    if target.split_dim is None or tp.size == 1:
        return f.get_tensor(name)
    full = shape[target.split_dim]
    part = target.padded_part or full // tp.size
    lo, hi = tp.rank * part, min((tp.rank + 1) * part, full)
    return sl[lo:hi] if target.split_dim == 0 else sl[:, lo:hi]


def load_weights(model: LlamaForCausalLM, model_dir: Path, tp: TPGroup) -> None:
    targets = model.shard_targets()
    files = checkpoint_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue  # tied: some exporters still write the shared matrix twice
        if name not in targets:
            raise ValueError(f"{path}: unexpected tensor {name!r} for {model.cfg.architecture}")
        by_file.setdefault(path, []).append(name)
    missing = sorted(set(targets) - {n for names in by_file.values() for n in names})
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                target = targets[name]
                shard = _read_shard(f, name, target, tp, path)
                dst = target.param.narrow(0, target.offset, shard.shape[0]) if target.param.dim() else target.param
                dst.copy_(shard.to(target.param.dtype))


def build_model(cfg: ArchConfig, model_dir: Path, tp: TPGroup, dtype: torch.dtype,
                device: torch.device, max_positions: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(cfg, tp, dtype, device, max_positions)
    load_weights(model, model_dir, tp)
    return model.eval()
