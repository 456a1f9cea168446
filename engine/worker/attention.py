"""Paged attention behind one interface: Triton kernels on CUDA, torch elsewhere.

A step's tokens are laid out decode-first: the first ``num_decodes`` tokens
are one query token each of a decoding sequence, the rest are prefill chunks
(each attending to its cached prefix plus itself, causally).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from radixserve.engine.worker import torch_plan
from radixserve.kernels import block_copy, paged_decode, prefix_prefill, reshape_and_cache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor            # [num_tokens] int64, where each new K/V is written
    num_decodes: int
    decode_block_tables: torch.Tensor     # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor         # [num_decodes] int32, including the new token
    num_prefills: int
    prefill_block_tables: torch.Tensor    # [num_prefills, max_blocks] int32
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1] int32, offsets into the prefill tokens
    prefill_seq_lens: torch.Tensor        # [num_prefills] int32, cached prefix + new tokens
    plan: Any = None                      # the backend's per-step precomputation, shared by every layer


class AttentionBackend:
    """Writes a step's new K/V into the pool and attends, for one layer."""

    name = "base"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]
        -> [num_tokens, num_heads, head_dim]; writes k/v into the cache first."""
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decodes
        if meta.num_prefills == 0:
            return self.decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
        prefill = self.prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill_block_tables,
                               meta.prefill_query_start_loc, meta.prefill_seq_lens, scale)
        if nd == 0:
            return prefill
        decode = self.decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
        return torch.cat([decode, prefill], dim=0)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        raise NotImplementedError

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        raise NotImplementedError

    def prefill(self, q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
        raise NotImplementedError

    def copy_blocks(self, kv_cache, src, dst) -> None:
        raise NotImplementedError


class TritonAttention(AttentionBackend):
    """Triton kernels; needs CUDA tensors (or TRITON_INTERPRET=1 in tests)."""

    name = "triton"

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        reshape_and_cache.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        return paged_decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)

    def prefill(self, q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
        return prefix_prefill.prefix_prefill_attention(
            q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)

    def copy_blocks(self, kv_cache, src, dst) -> None:
        block_copy.copy_blocks(kv_cache, src, dst)


class TorchAttention(AttentionBackend):
    """Plain torch (CPU, fp32). ``attend`` runs from a per-step plan (torch_plan):
    the new K/V are written first, then each sequence attends to its blocks in the
    pool, as a view when they are consecutive, else gathered into one reused
    workspace; masks and block lists are built once per step, not per layer.
    ``write_kv``/``decode``/``prefill`` are the kernels' references (any metadata)."""

    name = "torch"

    def __init__(self) -> None:
        self.workspace: torch.Tensor | None = None  # [2, blocks, block_size, kv_heads, head_dim]

    def attend(self, q, k, v, k_cache, v_cache, meta, scale):
        if meta.plan is None:
            meta.plan = torch_plan.build(meta, k_cache, q.shape[1])
        plan = meta.plan
        if not plan.usable or not k_cache.is_contiguous():
            return super().attend(q, k, v, k_cache, v_cache, meta, scale)
        n_slots, kv_heads, head_dim = -1, k_cache.shape[2], k_cache.shape[3]
        k_cache.view(n_slots, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(n_slots, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        ws = self._workspace(k_cache, plan.max_gather_blocks)
        parts = ([torch_plan.decode_chunk(q, k_cache, v_cache, c, ws, scale) for c in plan.decodes]
                 + [torch_plan.prefill_seq(q, k, v, k_cache, v_cache, p, ws, scale) for p in plan.prefills])
        if len(parts) == 1 and isinstance(parts[0][0], slice) and parts[0][0] == slice(0, q.shape[0]):
            return parts[0][1]  # one prefilling sequence, nothing else: no copy into ``out``
        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
        for rows, o in parts:
            if isinstance(rows, slice):
                out[rows] = o
            else:
                out.index_copy_(0, rows, o)
        return out

    def _workspace(self, k_cache: torch.Tensor, blocks: int) -> torch.Tensor:
        """Gather buffer for K and V, grown as needed and reused by every layer and step."""
        ws = self.workspace
        shape = (2, blocks, *k_cache.shape[1:])
        if ws is None or ws.shape[1] < blocks or ws.shape[2:] != shape[2:] or ws.dtype != k_cache.dtype:
            self.workspace = ws = torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device)
        return ws

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        reshape_and_cache.reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        return paged_decode.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)

    def prefill(self, q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
        return prefix_prefill.prefix_prefill_attention_ref(
            q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)

    def copy_blocks(self, kv_cache, src, dst) -> None:
        block_copy.copy_blocks_ref(kv_cache, src, dst)


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` takes Triton on CUDA when triton is importable, torch otherwise."""
    if name == "torch":
        return TorchAttention()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend='triton' needs a CUDA device; use 'torch' on CPU")
        return TritonAttention()
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            return TritonAttention()
        except ImportError:
            return TorchAttention()
    return TorchAttention()
