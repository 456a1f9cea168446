"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

The batch is flat: all tokens of all scheduled sequences in one
``[num_tokens, hidden]`` tensor; only attention knows about sequences, through
``AttentionMetadata``. Layers hold their tensor-parallel shard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.engine.model.hf_config import ArchConfig
from radixserve.engine.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    ShardTarget,
    VocabParallelEmbedding,
)
from radixserve.engine.worker.attention import AttentionBackend, AttentionMetadata
from radixserve.engine.worker.distributed import TPGroup


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPGroup, rotary: RotaryEmbedding, dtype, device):
        super().__init__()
        if cfg.num_kv_heads % tp.size:
            raise ValueError(
                f"num_key_value_heads = {cfg.num_kv_heads} is not divisible by tensor_parallel_size = "
                f"{tp.size}; replicating KV heads across ranks is not supported, pick a TP size that "
                f"divides it")
        self.num_heads = tp.shard(cfg.num_heads, "num_attention_heads")
        self.num_kv_heads = cfg.num_kv_heads // tp.size
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q, kv, kv], cfg.qkv_bias, tp, dtype, device, "qkv")
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, cfg.o_bias, tp, dtype, device, "o_proj")
        self.rotary = rotary
        self._split = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim]

    def forward(self, rope, hidden, kv_cache, meta: AttentionMetadata, backend: AttentionBackend,
                keep: torch.Tensor | None = None):
        """rope: this step's (cos, sin) table; hidden [num_tokens, hidden]."""
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        q_size, kv_size, _ = self._split
        # q and k sit side by side in the fused output: one rotation for both.
        qk = RotaryEmbedding.apply(rope, qkv[:, :q_size + kv_size].view(n, -1, self.head_dim))
        q = qk[:, :self.num_heads]   # [num_tokens, num_heads, head_dim]
        k = qk[:, self.num_heads:]   # [num_tokens, num_kv_heads, head_dim]
        v = qkv[:, q_size + kv_size:].view(n, self.num_kv_heads, self.head_dim)
        out = backend.attend(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        out = out.reshape(n, self.num_heads * self.head_dim)  # [num_tokens, num_heads * head_dim]
        return self.o_proj(out if keep is None else out[keep])

    def targets(self, prefix: str) -> dict[str, ShardTarget]:
        t = {}
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            for kind, tgt in self.qkv_proj.targets(part).items():
                t[f"{prefix}.{name}.{kind}"] = tgt
        for kind, tgt in self.o_proj.targets().items():
            t[f"{prefix}.o_proj.{kind}"] = tgt
        return t


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPGroup, dtype, device):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], False, tp, dtype, device, "gate_up")
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, False, tp, dtype, device, "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [num_tokens, inter/tp] each
        return self.down_proj(F.silu(gate).mul_(up))

    def targets(self, prefix: str) -> dict[str, ShardTarget]:
        t = {f"{prefix}.gate_proj.weight": self.gate_up_proj.targets(0)["weight"],
             f"{prefix}.up_proj.weight": self.gate_up_proj.targets(1)["weight"]}
        t[f"{prefix}.down_proj.weight"] = self.down_proj.targets()["weight"]
        return t


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPGroup, rotary: RotaryEmbedding, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(cfg, tp, rotary, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(cfg, tp, dtype, device)

    def forward(self, rope, hidden, kv_cache, meta, backend, keep: torch.Tensor | None = None):
        """With ``keep`` (row indices), every row's K/V is cached but only those rows
        go on through o_proj and the MLP: the output is [len(keep), hidden].

        ``hidden`` is this layer's own (the embedding's or the previous layer's
        output), so the residual adds land in it in place."""
        # Same order of operations as transformers, so fp32 results agree closely.
        attn = self.self_attn(rope, self.input_layernorm(hidden), kv_cache, meta, backend, keep)
        hidden = (hidden if keep is None else hidden[keep]).add_(attn)
        return hidden.add_(self.mlp(self.post_attention_layernorm(hidden)))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype, device)
        self.rotary = rotary
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, tp, rotary, dtype, device)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(self.embed_tokens, cfg.tie_word_embeddings, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids/positions [num_tokens]; kv_cache [layers, 2, blocks, block_size, kv_heads, head_dim]
        -> final hidden states [num_tokens, hidden], or [len(keep), hidden] for the rows in ``keep``.

        The last layer's o_proj and MLP run only for the kept rows (those that need
        logits): ~10% of a long prefill's FLOPs on an 8-layer model."""
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        rope = self.rotary.table(positions)  # once per step, not per layer
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(rope, hidden, kv_cache[i], meta, backend, keep if i == last else None)
        return self.norm(hidden)

    def prepack(self) -> None:
        """CPU fp32/bf16: pre-pack every linear layer's weight (see layers.pack_weight)."""
        for layer in self.layers:
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                        layer.mlp.down_proj):
                lin.prepack()
        self.lm_head.prepack()

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [rows, vocab], fp32 for sampling

    def shard_targets(self) -> dict[str, ShardTarget]:
        """Checkpoint tensor name -> where this rank's slice of it goes."""
        t = {f"model.embed_tokens.{k}": v for k, v in self.embed_tokens.targets().items()}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            t.update(layer.self_attn.targets(f"{p}.self_attn"))
            t.update(layer.mlp.targets(f"{p}.mlp"))
            t[f"{p}.input_layernorm.weight"] = ShardTarget(layer.input_layernorm.weight, (self.cfg.hidden_size,), None)
            t[f"{p}.post_attention_layernorm.weight"] = ShardTarget(
                layer.post_attention_layernorm.weight, (self.cfg.hidden_size,), None)
        t["model.norm.weight"] = ShardTarget(self.norm.weight, (self.cfg.hidden_size,), None)
        if not self.cfg.tie_word_embeddings:
            t["lm_head.weight"] = self.lm_head.targets()["weight"]
        return t
