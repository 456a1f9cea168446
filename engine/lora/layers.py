"""The LoRA hook of one tensor-parallel linear layer, and the per-step segment batch.

``ColumnParallelLinear`` / ``RowParallelLinear`` call ``self.lora(x, y)`` after
their base matmul when a hook is installed (only with ``enable_lora``; the
base path has no LoRA work otherwise). The hook adds, per token,

    y += (x @ A[slot]^T) @ B[slot]^T        (scaling folded into B at load)

for the tokens of each segment of the step's ``LoRABatch`` (slot -1 tokens,
the base model, are untouched). A fused projection (q/k/v, gate/up) stacks its
sub-projections' A along the rank dim — one shrink — and expands each
sub-projection into its own column range of the fused output.

Tensor parallelism: the hook sees this rank's shard. Column-parallel layers
hold A whole and B's rows of this rank; row-parallel layers hold A's columns of
this rank and B whole, and the hook runs *before* the all-reduce, so the sum
over ranks of x_r A_r^T B^T is the full LoRA delta — no extra collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from radixserve.kernels import lora_matmul


@dataclass
class LoRABatch:
    """Segments of consecutive tokens sharing one adapter slot (slot >= 0 only)."""

    seg_indptr: torch.Tensor  # [G+1] int32, on the model's device
    seg_slots: torch.Tensor   # [G] int32
    max_seg_len: int
    slots: frozenset[int]     # distinct slots >= 0 in the batch
    indptr_list: list[int]    # the same segments on the host (the torch path loops over them)
    slots_list: list[int]


class TorchLoRAOps:
    """The reference path (CPU)."""

    name = "torch"

    def shrink(self, x: torch.Tensor, a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        return lora_matmul.shrink_segments(x, a, batch.indptr_list, batch.slots_list)

    def expand(self, y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, batch: LoRABatch, offset: int) -> None:
        lora_matmul.expand_segments(y, xa, b, batch.indptr_list, batch.slots_list, offset)


class TritonLoRAOps(TorchLoRAOps):
    """The SGMV Triton kernels (CUDA)."""

    name = "triton"

    def shrink(self, x, a, batch):
        return lora_matmul.lora_shrink(x, a, batch.seg_indptr, batch.seg_slots, batch.max_seg_len)

    def expand(self, y, xa, b, batch, offset):
        lora_matmul.lora_expand(y, xa, b, batch.seg_indptr, batch.seg_slots, batch.max_seg_len, offset)


class LoRAContext:
    """Shared by every hook of a model: the current step's batch and the ops."""

    def __init__(self, ops: TorchLoRAOps):
        self.ops = ops
        self.batch: LoRABatch | None = None
        # The last decoder layer's o_proj/MLP see only the rows that need logits
        # (one per sampled sequence, in row order): their own segments.
        self.kept: LoRABatch | None = None

    def batch_for(self, num_rows: int) -> LoRABatch | None:
        b = self.batch
        if b is not None and b.indptr_list[-1] != num_rows:
            b = self.kept  # equal counts mean every row was kept: the layouts coincide
            assert b is None or b.indptr_list[-1] == num_rows, "LoRA batch does not match the rows"
        return b


class LoRALinear(nn.Module):
    """Stacked per-slot A/B buffers of one linear layer (this rank's shard)."""

    def __init__(self, ctx: LoRAContext, sub_names: tuple[str, ...], in_features: int, out_sizes: list[int],
                 max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.ctx = ctx
        self.sub_names = sub_names
        self.rank = max_rank
        self.out_sizes = out_sizes
        self.offsets = [sum(out_sizes[:j]) for j in range(len(out_sizes))]
        self.register_buffer("a", torch.zeros(max_loras, len(sub_names) * max_rank, in_features,
                                              dtype=dtype, device=device), persistent=False)
        for j, n in enumerate(out_sizes):
            self.register_buffer(f"b{j}", torch.zeros(max_loras, n, max_rank, dtype=dtype, device=device),
                                 persistent=False)
        self.loaded = [False] * max_loras  # slot holds non-zero weights for this layer

    def b(self, j: int) -> torch.Tensor:
        return getattr(self, f"b{j}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.ctx.batch_for(x.shape[0])
        if batch is None or not any(self.loaded[s] for s in batch.slots):
            return y
        xa = self.ctx.ops.shrink(x, self.a, batch)  # [num_tokens, n_sub * rank] fp32
        r = self.rank
        for j, offset in enumerate(self.offsets):
            self.ctx.ops.expand(y, xa[:, j * r:(j + 1) * r], self.b(j), batch, offset)
        return y

    @torch.no_grad()
    def set_slot(self, slot: int, weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Fill ``slot``: per sub-projection (a [r, in_shard], b [out_shard, r], scaling folded
        into b) or None (no LoRA on it); unused rank rows/columns stay zero."""
        self.a[slot].zero_()
        for j in range(len(self.out_sizes)):
            self.b(j)[slot].zero_()
        for j, w in enumerate(weights):
            if w is None:
                continue
            a, b = w
            r = a.shape[0]
            self.a[slot, j * self.rank:j * self.rank + r].copy_(a)
            self.b(j)[slot, :, :r].copy_(b)
        self.loaded[slot] = any(w is not None for w in weights)

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, [None] * len(self.out_sizes))
