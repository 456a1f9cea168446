"""Paged attention behind one interface: Triton kernels on CUDA, torch elsewhere.

A step's tokens are laid out decode-first: the first ``num_decodes`` tokens
are one query token each of a decoding sequence, the rest are prefill chunks
(each attending to its cached prefix plus itself, causally).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


class TorchAttention:
    """The reference path: plain torch ops over gathered blocks (CPU, fp32)."""

    name = "torch"

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        reshape_and_cache.reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        return paged_decode.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)

    def prefill(self, q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
        return prefix_prefill.prefix_prefill_attention_ref(
            q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)

    def copy_blocks(self, kv_cache, src, dst) -> None:
        block_copy.copy_blocks_ref(kv_cache, src, dst)


class TritonAttention(TorchAttention):
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


def select_backend(name: str, device: torch.device) -> TorchAttention:
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


def paged_attention(backend: TorchAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]
    -> [num_tokens, num_heads, head_dim]; writes k/v into the cache first."""
    backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    nd = meta.num_decodes
    if meta.num_prefills == 0:
        return backend.decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
    prefill = backend.prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill_block_tables,
                              meta.prefill_query_start_loc, meta.prefill_seq_lens, scale)
    if nd == 0:
        return prefill
    decode = backend.decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
    return torch.cat([decode, prefill], dim=0)
