"""Tensor-parallel building blocks of the decoder, and how checkpoints fill them.

Each layer holds only its rank's shard. ``ShardTarget`` says where one
checkpoint tensor goes: which rows of which (possibly fused) parameter, and
along which checkpoint dimension it is split across ranks, so the loader reads
just this rank's slice from safetensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.engine.worker.distributed import TPGroup


@dataclass(eq=False)
class ShardTarget:
    param: torch.Tensor
    full_shape: tuple[int, ...]  # shape the checkpoint tensor must have
    split_dim: int | None        # checkpoint dim split across ranks; None = replicated
    offset: int = 0              # first row of ``param`` this tensor fills (fused params)
    padded_part: int | None = None  # rows per rank when the split dim is padded (vocab)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] (CPU, fp32 or bf16) re-laid out once into oneDNN's blocked format.

    F.linear repacks the weight into the GEMM's blocked layout on every call: for a
    few rows (decode, a prefix hit's suffix) that repacking streams the weight two
    extra times and costs more than the multiply (measured 1.3-2x at 8-32 rows; in
    bf16 on AMX 1.4-1.6x at 1-32 rows, one row included).
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT)


_PACK_ROWS_HINT = 32  # the rows oneDNN tunes the layout for; any row count works


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if weight.dtype == torch.bfloat16:  # oneDNN's bf16 GEMM needs avx512_bf16 / AMX
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


def matmul(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ weight[out, in]^T (+ bias) -> [rows, out], through ``packed`` when there is one.

    One fp32 row stays a plain GEMV, which streams the dense weight exactly once already
    (bf16's GEMV is slower than the packed GEMM, measured).
    """
    if packed is None or (x.shape[0] < 2 and x.dtype == torch.float32):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; the same result as the spelled-out form below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Variance in fp32 then back, exactly as transformers' LlamaRMSNorm.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; ``out_sizes`` fuses
    several checkpoint matrices (q/k/v, gate/up) into one matmul."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device, what: str):
        super().__init__()
        self.tp = tp
        self.out_sizes = out_sizes
        self.local_sizes = [tp.shard(n, f"{what} output size") for n in out_sizes]
        self.in_features = in_features
        rows = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(rows, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(rows, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.lora: nn.Module | None = None  # engine/lora/layers.LoRALinear when LoRA is enabled
        self.packed: torch.Tensor | None = None  # see prepack()

    def prepack(self) -> None:
        """CPU fp32/bf16: keep a pre-packed copy of the (loaded, this rank's) weight for matmuls."""
        self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.weight, self.packed, self.bias)
        return y if self.lora is None else self.lora(x, y)

    def targets(self, part: int) -> dict[str, ShardTarget]:
        offset = sum(self.local_sizes[:part])
        t = {"weight": ShardTarget(self.weight, (self.out_sizes[part], self.in_features), 0, offset)}
        if self.bias is not None:
            t["bias"] = ShardTarget(self.bias, (self.out_sizes[part],), 0, offset)
        return t


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device, what: str):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features
        local_in = tp.shard(in_features, f"{what} input size")
        self.weight = nn.Parameter(torch.empty(out_features, local_in, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.lora: nn.Module | None = None  # engine/lora/layers.LoRALinear when LoRA is enabled
        self.packed: torch.Tensor | None = None  # see ColumnParallelLinear.prepack()

    def prepack(self) -> None:
        self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.weight, self.packed)
        if self.lora is not None:
            y = self.lora(x, y)  # this rank's partial LoRA sum joins the all-reduce below
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias  # bias once, after the sum

    def targets(self) -> dict[str, ShardTarget]:
        t = {"weight": ShardTarget(self.weight, (self.out_features, self.in_features), 1)}
        if self.bias is not None:
            t["bias"] = ShardTarget(self.bias, (self.out_features,), None)
        return t


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; the vocab is padded to a
    multiple of the TP size and the padding rows stay zero."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.dim = dim
        self.part = math.ceil(vocab_size / tp.size)
        self.start = tp.rank * self.part
        self.weight = nn.Parameter(torch.zeros(self.part, dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.part)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def targets(self) -> dict[str, ShardTarget]:
        return {"weight": ShardTarget(self.weight, (self.vocab_size, self.dim), 0, padded_part=self.part)}


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocab range, gathered to the full vocabulary."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp = embedding.tp
        self.vocab_size = embedding.vocab_size
        self.dim = embedding.dim
        self.part = embedding.part
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.zeros(self.part, self.dim, dtype=dtype, device=device), requires_grad=False)
        self.tied = tied
        self.packed: torch.Tensor | None = None  # see ColumnParallelLinear.prepack()

    def prepack(self) -> None:
        self.packed = pack_weight(self.weight)  # tied: the embedding keeps the dense matrix for lookups

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = matmul(h, self.weight, self.packed)  # [rows, vocab_part]
        return self.tp.all_gather_last_dim(logits)[..., :self.vocab_size]

    def targets(self) -> dict[str, ShardTarget]:
        return {"weight": ShardTarget(self.weight, (self.vocab_size, self.dim), 0, padded_part=self.part)}


def _rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths divided by ``factor``, short kept, smooth in between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a cos/sin table precomputed per position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        inv_freq = _rope_inv_freq(head_dim, theta, scaling)
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]           # [max_pos, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)            # [max_pos, head_dim]
        self.register_buffer("cos", emb.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype=dtype, device=device), persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Looked up once per step, used by every layer: cos [num_tokens, 1, head_dim] of
        ``positions``, and the sines as the rotation needs them: -sin of the first half and
        sin of the second half, [num_tokens, 1, head_dim / 2] each."""
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        half = sin.shape[-1] // 2
        return cos, -sin[..., :half], sin[..., half:]

    @staticmethod
    def apply(table: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, heads, head_dim] (q and k heads side by side) -> rotated, a new tensor.

        x * cos + rotate_half(x) * sin, bit for bit as transformers computes it, without
        materialising rotate_half(x) or its negation (-a * b == a * -b exactly)."""
        cos, neg_sin_lo, sin_hi = table
        half = x.shape[-1] // 2
        rot = torch.empty_like(x)
        torch.mul(x[..., half:], neg_sin_lo, out=rot[..., :half])
        torch.mul(x[..., :half], sin_hi, out=rot[..., half:])
        return (x * cos).add_(rot)
