"""Prefill attention over a cached prefix (prefix caching / chunked prefill).

A varlen batch of S sequences. Sequence s contributes new tokens
``q[query_start_loc[s]:query_start_loc[s+1]]`` (with their K/V in ``k``/``v``) on top
of a cached prefix of ``prefix_len = seq_lens[s] - new_len`` tokens read from the paged
cache through ``block_tables[s]``. New token i sits at absolute position prefix_len + i
and attends to the whole prefix and to new tokens j <= i (bottom-right-aligned causal).
The new tokens' K/V are always read from ``k``/``v``, never from the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from radixserve.kernels._triton import cdiv, check_launch_device, next_power_of_2, tl, triton

_BLOCK_M = 32  # query rows per program
_BLOCK_N = 32  # keys per tile


def _check_args(q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens) -> None:
    assert q.dim() == 3, f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}"
    num_tokens, num_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, (
        f"k must be [num_tokens={num_tokens}, num_kv_heads, head_dim={head_dim}], got {tuple(k.shape)}")
    assert v.shape == k.shape, f"v {tuple(v.shape)} != k {tuple(k.shape)}"
    num_kv_heads = k.shape[1]
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == k.shape[1:], (
        f"k_cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], got {tuple(k_cache.shape)}")
    assert v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, (
        f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    assert seq_lens.dim() == 1, f"seq_lens must be [num_seqs], got {tuple(seq_lens.shape)}"
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_seqs + 1,), (
        f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got {tuple(query_start_loc.shape)}")
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, (
        f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"


def causal_attention_with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA for one sequence whose first k.shape[0] - q.shape[0] keys are a cached prefix.

    q: [new, H, D]; k, v: [prefix + new, Hkv, D] -> [new, H, D], computed in fp32.
    """
    new_len, total = q.shape[0], k.shape[0]
    # 4-D with a batch of one: 3-D inputs send CPU SDPA to its slow unfused math path.
    qh = q.transpose(0, 1)[None].float()  # [1, H, new, D]
    kh = k.transpose(0, 1)[None].float()  # [1, Hkv, total, D]
    vh = v.transpose(0, 1)[None].float()  # [1, Hkv, total, D]
    gqa = q.shape[1] != k.shape[1]
    if new_len == total:  # no prefix: plain causal, no mask tensor needed
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # Bottom-right-aligned causal: query i (absolute total - new + i) sees keys j <= that.
        rows = torch.arange(total - new_len, total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= rows[:, None]  # [new, total]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1).to(q.dtype)  # [new, H, D]


def prefix_prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch prefix prefill (also the engine's CPU path); loops over sequences.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    _check_args(q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()  # host sync: fine for a reference / the CPU path
    for s, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        prefix_len = seq_len - (hi - lo)
        assert prefix_len >= 0, f"sequence {s}: seq_len {seq_len} < new tokens {hi - lo}"
        k_seq, v_seq = k[lo:hi], v[lo:hi]  # [new, Hkv, D]
        if prefix_len > 0:
            blocks = block_tables[s, :cdiv(prefix_len, block_size)].long()  # only the prefix's blocks
            k_prefix = k_cache.index_select(0, blocks).flatten(0, 1)[:prefix_len]  # [prefix, Hkv, D]
            v_prefix = v_cache.index_select(0, blocks).flatten(0, 1)[:prefix_len]  # [prefix, Hkv, D]
            k_seq = torch.cat([k_prefix, k_seq])  # [prefix + new, Hkv, D]
            v_seq = torch.cat([v_prefix, v_seq])
        out[lo:hi] = causal_attention_with_prefix(q[lo:hi], k_seq, v_seq, scale)
    return out


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_M: tl.constexpr):
    # Sequence s owns the q-block indices starting at query_start_loc[s] // BLOCK_M + s
    # (an upper bound on the q-blocks of sequences before it); binary-search the last
    # sequence whose first index is <= q_block.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid
        if first <= q_block:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _prefix_prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    out_ptr,
    scale_log2e,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_cache_b, stride_cache_s, stride_cache_h,
    stride_bt_s,
    stride_out_t, stride_out_h,
    num_seqs, block_size, head_dim,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + seq)
    new_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_row = (q_block - (q_start // BLOCK_M + seq)) * BLOCK_M
    if first_row >= new_len:  # spare program from the upper-bound grid
        return
    prefix_len = tl.load(seq_lens_ptr + seq) - new_len

    rows = first_row + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions among the new tokens
    row_mask = rows < new_len
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_q_t + head * stride_q_h + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # Phase 1: the cached prefix through the block table; every row sees every prefix key.
    for tile_start in range(0, prefix_len, BLOCK_N):
        pos = tile_start + cols
        valid = pos < prefix_len
        block = tl.load(block_tables_ptr + seq * stride_bt_s + pos // block_size, mask=valid, other=0)
        kv_off = (block.to(tl.int64) * stride_cache_b + (pos % block_size) * stride_cache_s
                  + kv_head * stride_cache_h)  # [BLOCK_N]
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BLOCK_M, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Phase 2: the new tokens from k/v, causal; stop after this tile's last row.
    new_end = tl.minimum(new_len, first_row + BLOCK_M)
    for tile_start in range(0, new_end, BLOCK_N):
        pos = tile_start + cols
        valid = pos < new_len
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + (q_start + pos)[:, None] * stride_k_t + kv_head * stride_k_h + dims[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + (q_start + pos)[:, None] * stride_v_t + kv_head * stride_v_h + dims[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BLOCK_M, BLOCK_N]
        # Row max stays finite: tiles run in order, so each row met key j <= row (or the prefix) already.
        s = tl.where(valid[None, :] & (pos[None, :] <= rows[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_out_t + head * stride_out_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def prefix_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                             seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton version of `prefix_prefill_attention_ref`; same arguments and result.

    Launches without a device->host sync: the grid is an upper bound on the q-blocks
    (num_tokens // BLOCK_M + num_seqs) and each program finds its sequence by binary search.
    """
    _check_args(q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    check_launch_device(_prefix_prefill_kernel, q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    assert k_cache.stride() == v_cache.stride(), (
        f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim, got strides {t.stride()}"
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (num_tokens // _BLOCK_M + num_seqs, num_heads)
    _prefix_prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        out,
        scale * math.log2(math.e),  # the kernel uses exp2
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_seqs, k_cache.shape[1], head_dim,
        GROUP=num_heads // k.shape[1], BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: match the reference, not TF32
    )
    return out
