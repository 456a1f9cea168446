"""Paged decode attention: one query token per sequence against its paged KV cache.

Sequence s has seq_lens[s] keys; key position p lives in cache block
``block_tables[s, p // block_size]`` at offset ``p % block_size``. Block-table entries
past the sequence's last block are padding (may be -1 or garbage) and are never read.
GQA as HF ``repeat_kv``: query head h uses kv head ``h // (num_heads // num_kv_heads)``.

The Triton kernel runs one program per (sequence, kv head, split): all query heads of
a kv head share each loaded K/V tile. For long contexts with few sequences the
context is split across programs (flash-decoding) and a second kernel merges the
per-split partial results.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from radixserve.kernels._triton import cdiv, check_launch_device, next_power_of_2, tl, triton

# Tokens per K/V tile; also the granularity of split boundaries.
_BLOCK_N = 64
# Fewest context tokens worth giving their own split (below this the merge costs more).
_MIN_TOKENS_PER_SPLIT = 256
# Fallback SM count when the device cannot be queried (the CPU interpreter).
_DEFAULT_NUM_SMS = 132
# Padded fp32 K gathered per reference chunk (~L2-sized; 2 MiB measured best on CPU): see _sequence_chunks.
_REF_GATHER_BUDGET_BYTES = 2 << 20


def _check_args(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    assert q.dim() == 3, f"q must be [num_seqs, num_heads, head_dim], got {tuple(q.shape)}"
    assert k_cache.dim() == 4, ("k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                                f"got {tuple(k_cache.shape)}")
    assert v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, (
        f"dtypes differ: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, (
        f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    assert block_tables.dtype == torch.int32, f"block_tables must be int32, got {block_tables.dtype}"
    assert seq_lens.shape == (num_seqs,), f"seq_lens must be [num_seqs={num_seqs}], got {tuple(seq_lens.shape)}"
    assert seq_lens.dtype == torch.int32, f"seq_lens must be int32, got {seq_lens.dtype}"


def _sequence_chunks(seq_lens: list[int], bytes_per_token: int) -> list[tuple[int, int]]:
    """Split the batch into runs of sequences whose padded gathered K fits the budget.

    Small gathers stay cache-resident and reuse freed memory instead of page-faulting
    in fresh allocations, which on CPU costs more than the attention itself; it also
    bounds the reference's extra memory for large batches.
    """
    budget_tokens = max(1, _REF_GATHER_BUDGET_BYTES // bytes_per_token)
    chunks, start, longest = [], 0, 0
    for s, seq_len in enumerate(seq_lens):
        longest = max(longest, seq_len)
        if s > start and longest * (s + 1 - start) > budget_tokens:
            chunks.append((start, s))
            start, longest = s, seq_len
    chunks.append((start, len(seq_lens)))
    return chunks


def _decode_chunk_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                      seq_lens: list[int], scale: float) -> torch.Tensor:
    """Decode attention for a few sequences: gather their blocks densely, one SDPA call.

    q: [n, num_heads, head_dim]; block_ids: [n, max_blocks] int64 with holes already
    replaced by a valid id; returns [n, num_heads, head_dim] fp32.
    """
    n, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = max(seq_lens)
    table = block_ids[:, :cdiv(max_len, block_size)].flatten()  # [n * num_blocks]
    k = k_cache.index_select(0, table).view(n, -1, num_kv_heads, head_dim)[:, :max_len]  # [n, T, Hkv, D]
    v = v_cache.index_select(0, table).view(n, -1, num_kv_heads, head_dim)[:, :max_len]  # [n, T, Hkv, D]
    mask = None
    if min(seq_lens) < max_len:
        valid = torch.arange(max_len, device=q.device) < torch.tensor(seq_lens, device=q.device)[:, None]  # [n, T]
        # Zero the padding too: stale cache memory may hold NaN/inf, and a masked-out
        # score times a NaN value is still NaN. In place on the fresh gather, one
        # contiguous tail per sequence: ~5x cheaper than boolean-mask indexing.
        for i, seq_len in enumerate(seq_lens):
            if seq_len < max_len:
                k[i, seq_len:] = 0
                v[i, seq_len:] = 0
        mask = valid[:, None, None, :]  # [n, 1, 1, T]
    k = k.transpose(1, 2).float()  # [n, Hkv, T, D]; softmax and all math in fp32
    v = v.transpose(1, 2).float()  # [n, Hkv, T, D]
    # GQA without repeating K/V: the `group` query heads of a kv head become `group`
    # query rows of that kv head (heads kv*group .. kv*group+group-1 are adjacent).
    q_rows = q.reshape(n, num_kv_heads, group, head_dim).float()  # [n, Hkv, G, D]
    out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=scale)  # [n, Hkv, G, D]
    return out.reshape(n, num_heads, head_dim)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch paged decode attention (also the engine's CPU path).

    q: [num_seqs, num_heads, head_dim]; returns [num_seqs, num_heads, head_dim] in q's dtype.
    Runs over chunks of sequences: gathers each chunk's blocks into a padded dense K/V,
    masks positions >= seq_len and makes one batched SDPA call, softmax in fp32.
    """
    _check_args(q, k_cache, v_cache, block_tables, seq_lens)
    out = torch.empty_like(q)  # [num_seqs, num_heads, head_dim]
    lens = seq_lens.tolist()  # host sync: fine for a reference / the CPU path
    if not lens:
        return out
    block_size = k_cache.shape[1]
    num_blocks = cdiv(max(lens), block_size)
    assert num_blocks <= block_tables.shape[1], (
        f"seq_lens need {num_blocks} blocks but block_tables has {block_tables.shape[1]} columns")
    # Entries past a sequence's last block are holes (-1, garbage): read block 0 there
    # instead; those positions are masked out.
    block_ids = block_tables[:, :num_blocks].long()  # [num_seqs, num_blocks]
    blocks_used = (seq_lens.to(block_ids.device, torch.int64)[:, None] + block_size - 1) // block_size
    block_ids = block_ids.masked_fill(torch.arange(num_blocks, device=block_ids.device) >= blocks_used, 0)
    bytes_per_token = k_cache.shape[2] * k_cache.shape[3] * 4  # one fp32 K row
    # Chunk sequences in length order so each padded gather wastes little.
    order = sorted(range(len(lens)), key=lens.__getitem__)
    sorted_lens = [lens[i] for i in order]
    idx = torch.tensor(order, device=q.device)
    q_sorted, ids_sorted = q.index_select(0, idx), block_ids.index_select(0, idx.to(block_ids.device))
    for start, end in _sequence_chunks(sorted_lens, bytes_per_token):
        out[idx[start:end]] = _decode_chunk_ref(q_sorted[start:end], k_cache, v_cache, ids_sorted[start:end],
                                                sorted_lens[start:end], scale).to(out.dtype)
    return out


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    scale_log2e,
    stride_q_s, stride_q_h,
    stride_cache_b, stride_cache_s, stride_cache_h,
    stride_bt_s,
    stride_out_s, stride_out_h,
    num_splits, block_size, head_dim,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)

    # This split's token range, tile-aligned so only the sequence end needs masking.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    # Query rows: the GROUP heads sharing this kv head, padded to BLOCK_G >= 16 for tl.dot.
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dim_mask = dims < head_dim  # head_dim 80 etc. is padded to a power of two
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_q_s + heads[:, None] * stride_q_h + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + cols  # [BLOCK_N] token positions
        valid = pos < end
        # Per-token block lookup: tiles may span cache blocks (any block_size works);
        # masked loads never touch table entries past the sequence's last block.
        block = tl.load(block_tables_ptr + seq * stride_bt_s + pos // block_size, mask=valid, other=0)
        kv_off = (block.to(tl.int64) * stride_cache_b + (pos % block_size) * stride_cache_s
                  + kv_head * stride_cache_h)  # [BLOCK_N]
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has >= 1 valid column
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = row_mask[:, None] & dim_mask[None, :]
    if WRITE_PARTIAL:
        # Normalised partial output plus (max, sum) for the merge; an empty split
        # (short sequence) leaves max=-inf, sum=0 and a zero accumulator.
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [BLOCK_G]
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=out_mask)
        tl.store(part_max_ptr + part, m_i, mask=row_mask)
        tl.store(part_sum_ptr + part, l_i, mask=row_mask)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_out_s + heads[:, None] * stride_out_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    stride_out_s, stride_out_h,
    num_heads, num_splits, head_dim,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (sequence, query head): rescale every split to the global max.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    part = (seq * num_heads + head) * num_splits + splits  # [BLOCK_SPLITS]
    m = tl.load(part_max_ptr + part, mask=split_mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_mask, other=0.0)
    m_max = tl.max(m, 0)  # finite: split 0 always holds >= 1 token
    weight = l * tl.exp2(m - m_max)  # [BLOCK_SPLITS]; 0 for empty splits
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :],
                  mask=split_mask[:, None] & (dims[None, :] < head_dim), other=0.0)  # [BLOCK_SPLITS, BLOCK_D]
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(weight, 0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_out_s + head * stride_out_h + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per sequence so that about two waves of programs fill the GPU.

    Uses the block-table width as the context bound, so no device->host sync is needed.
    Large batches already fill the GPU and get one split (no merge kernel).
    """
    programs = num_seqs * num_kv_heads
    wanted = cdiv(2 * num_sms, max(programs, 1))
    most_useful = max(1, max_context // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, most_useful))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """Triton version of `paged_decode_attention_ref` with optional split-K.

    num_splits: programs per (sequence, kv head) along the context; None picks one from
    the batch size and the block-table width (an upper bound on the context length).
    """
    _check_args(q, k_cache, v_cache, block_tables, seq_lens)
    device = check_launch_device(_paged_decode_kernel, q, k_cache, v_cache, block_tables, seq_lens)
    assert k_cache.stride() == v_cache.stride(), (
        f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    for name, t in (("q", q), ("k_cache", k_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim, got strides {t.stride()}"
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)  # [num_seqs, num_heads, head_dim]
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, _num_sms(device))
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"

    block_d = max(16, next_power_of_2(head_dim))
    write_partial = num_splits > 1
    if write_partial:
        part_acc = torch.empty(num_seqs, num_heads, num_splits, block_d, dtype=torch.float32, device=device)
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
    else:  # unused by the kernel; any tensor will do
        part_acc = part_max = part_sum = out
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_acc, part_max, part_sum,
        scale * math.log2(math.e),  # the kernel uses exp2
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_splits, block_size, head_dim,
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=_BLOCK_N,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: match the reference, not TF32
        WRITE_PARTIAL=write_partial,
    )
    if write_partial:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_acc, part_max, part_sum, out,
            out.stride(0), out.stride(1),
            num_heads, num_splits, head_dim,
            BLOCK_SPLITS=next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out
