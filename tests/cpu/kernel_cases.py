"""Kernel test cases shared by tests/cpu/test_kernels*.py and tests/gpu/test_kernels*_gpu.py:
paged caches filled with NaN where unwritten, decode / prefill cases, the naive
float64 attention they are checked against, and the multi-LoRA (SGMV) cases."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Output tolerance per dtype, for every attention comparison (kernel vs reference and
# reference vs naive). fp16/bf16 kernels round the softmax probabilities to the input
# dtype before P @ V, so they sit a few ulps from the fp32-softmax reference.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], NaN where unwritten
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with holes
    k_dense: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim]
    v_dense: list[torch.Tensor]


def make_paged_kv(seq_lens: list[int], cached_lens: list[int], num_kv_heads: int, head_dim: int,
                  block_size: int, dtype: torch.dtype, device: str, hole: str, gen: torch.Generator) -> PagedKV:
    """Dense random K/V per sequence; positions < cached_lens[s] are written to shuffled cache blocks.

    Blocks are allocated for all seq_lens[s] positions (as the engine does); the rest stay NaN.
    """
    blocks_per_seq = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few never-used blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    hole_value = -1 if hole == "minus_one" else num_blocks + 1000  # garbage: out of range
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq, default=0) + 2), hole_value, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen)  # non-contiguous, shuffled block ids
    k_dense, v_dense, used = [], [], 0
    for s, (seq_len, cached) in enumerate(zip(seq_lens, cached_lens)):
        block_tables[s, :blocks_per_seq[s]] = order[used:used + blocks_per_seq[s]].int()
        used += blocks_per_seq[s]
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(cached)
        blocks = block_tables[s, pos // block_size].long()
        k_cache[blocks, pos % block_size] = k[:cached]
        v_cache[blocks, pos % block_size] = v[:cached]
        k_dense.append(k.to(device))
        v_dense.append(v.to(device))
    return PagedKV(k_cache.to(device), v_cache.to(device), block_tables.to(device), k_dense, v_dense)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_pos: int) -> torch.Tensor:
    """Dense causal softmax attention by hand, in float64.

    q: [n, num_heads, D] at absolute positions first_pos .. first_pos + n - 1;
    k, v: [T, num_kv_heads, D] at positions 0 .. T - 1. Returns [n, num_heads, D] float64.
    """
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)  # HF repeat_kv: head h uses kv head h // group
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k64) * scale  # [H, n, T]
    q_pos = first_pos + torch.arange(q.shape[0], device=q.device)
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # [n, T]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hnt,thd->nhd", probs, v64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "NaN in output: a hole, padding or unwritten slot was read"
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype])


@dataclass
class DecodeCase:
    q: torch.Tensor  # [num_seqs, num_heads, head_dim]
    paged: PagedKV
    seq_lens: torch.Tensor  # [num_seqs] int32
    scale: float


def make_decode_case(seq_lens: list[int], group: int, num_kv_heads: int, head_dim: int, block_size: int,
                     dtype: torch.dtype, device: str, hole: str = "minus_one", seed: int = 0) -> DecodeCase:
    gen = torch.Generator().manual_seed(seed)
    paged = make_paged_kv(seq_lens, seq_lens, num_kv_heads, head_dim, block_size, dtype, device, hole, gen)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return DecodeCase(q, paged, lens, head_dim ** -0.5)


def naive_decode(case: DecodeCase) -> torch.Tensor:
    outs = [naive_attention(case.q[s:s + 1], case.paged.k_dense[s], case.paged.v_dense[s], case.scale, n - 1)
            for s, n in enumerate(case.seq_lens.tolist())]
    return torch.cat(outs)  # [num_seqs, num_heads, head_dim]


@dataclass
class PrefillCase:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    paged: PagedKV  # prefixes written; the new tokens' slots are left NaN
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    prefix_lens: list[int]
    scale: float


def make_prefill_case(prefix_lens: list[int], new_lens: list[int], group: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype, device: str, hole: str = "minus_one",
                      seed: int = 0) -> PrefillCase:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    paged = make_paged_kv(seq_lens, prefix_lens, num_kv_heads, head_dim, block_size, dtype, device, hole, gen)
    k = torch.cat([kd[p:] for kd, p in zip(paged.k_dense, prefix_lens)])  # [num_tokens, Hkv, D]
    v = torch.cat([vd[p:] for vd, p in zip(paged.v_dense, prefix_lens)])
    q = torch.randn(k.shape[0], num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    starts = torch.tensor([0] + new_lens).cumsum(0).to(torch.int32).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PrefillCase(q, k, v, paged, starts, lens, prefix_lens, head_dim ** -0.5)


def naive_prefill(case: PrefillCase) -> torch.Tensor:
    starts = case.query_start_loc.tolist()
    outs = [naive_attention(case.q[starts[s]:starts[s + 1]], case.paged.k_dense[s], case.paged.v_dense[s],
                            case.scale, p) for s, p in enumerate(case.prefix_lens)]
    return torch.cat(outs)  # [num_tokens, num_heads, head_dim]


def run_decode(fn, case: DecodeCase, **kwargs) -> torch.Tensor:
    return fn(case.q, case.paged.k_cache, case.paged.v_cache, case.paged.block_tables, case.seq_lens, case.scale,
              **kwargs)


def run_prefill(fn, case: PrefillCase) -> torch.Tensor:
    return fn(case.q, case.k, case.v, case.paged.k_cache, case.paged.v_cache, case.paged.block_tables,
              case.query_start_loc, case.seq_lens, case.scale)


# ----------------------------------------------------------------------------- multi-LoRA (SGMV)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def make_case(seg_lens: list[int], seg_slots: list[int], num_slots: int, k: int, r: int, n: int,
              dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    token_slots = torch.tensor([s for s, m in zip(seg_slots, seg_lens) for _ in range(m)], dtype=torch.long)
    t = int(token_slots.numel())
    x = torch.randn(t, k, generator=gen).to(dtype)
    a = (torch.randn(num_slots, r, k, generator=gen) * 0.2).to(dtype)
    b = (torch.randn(num_slots, n, r, generator=gen) * 0.2).to(dtype)
    indptr = torch.tensor([0] + list(torch.cumsum(torch.tensor(seg_lens), 0).tolist()), dtype=torch.int32)
    slots = torch.tensor(seg_slots, dtype=torch.int32)
    to = lambda z: z.to(device)  # noqa: E731
    return to(x), to(a), to(b), to(indptr), to(slots), token_slots, max(seg_lens, default=0)
