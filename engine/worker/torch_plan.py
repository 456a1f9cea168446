"""The torch attention path's per-step plan, and the per-layer work it drives.

Everything that depends only on the step's layout (which blocks each sequence
reads, whether they are consecutive in the pool, padding and causal masks) is
built once in ``build`` and reused by every layer. Per layer, the new K/V are
already in the pool (``TorchAttention.attend`` writes them first), so a decoding
sequence attends over its own blocks alone, gathered into a workspace reused by
every layer and step. A prefilling sequence with a cached prefix attends in two
parts merged by their log-sum-exp: the prefix as views of the pool, one per run
of consecutive blocks (a gather only when the blocks are badly fragmented), and
its new tokens' own K/V, causally; no mask over the prefix, no copy of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from radixserve.engine.worker.attention import AttentionMetadata

# Padded fp32 K gathered per decode chunk: ~L2-sized, as the decode reference (2 MiB measured best on CPU).
_DECODE_GATHER_BYTES = 2 << 20


@dataclass
class DecodeChunk:
    """Decoding sequences of similar length, attended in one batched SDPA call."""

    rows: torch.Tensor               # [n] int64, their rows among the step's tokens
    blocks: torch.Tensor             # [n * n_blocks] int64, each one's blocks (holes -> block 0)
    n_blocks: int
    max_len: int
    pad: torch.Tensor | None         # [n, max_len, 1, 1] bool, True past a sequence's end
    mask: torch.Tensor | None        # [n, 1, 1, max_len] bool, True on keys a sequence has


# More runs of consecutive prefix blocks than this: one gather beats an SDPA call per run.
_MAX_VIEW_RUNS = 4


@dataclass
class PrefillSeq:
    """One sequence's new tokens (a prompt or a chunk of one) over its cached prefix."""

    rows: slice                      # its new tokens among the step's tokens
    cached: int                      # tokens of cached prefix (0: a plain causal prompt)
    runs: list[tuple[int, int]]      # (first block, blocks): the prefix as views of consecutive blocks
    blocks: torch.Tensor | None      # or, when too fragmented: [prefix blocks] int64 to gather
    new_mask: torch.Tensor | None    # [G * new, new] additive causal over the new keys, rows (group, token)


@dataclass
class TorchPlan:
    usable: bool                     # False: some token has no slot; the reference path runs instead
    decodes: list[DecodeChunk] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)
    max_gather_blocks: int = 1       # sizes the workspace


def build(meta: AttentionMetadata, k_cache: torch.Tensor, num_heads: int) -> TorchPlan:
    """The plan of one step; ``k_cache`` (any layer's) gives the pool's layout."""
    block_size = k_cache.shape[1]
    if meta.slot_mapping.numel() and int(meta.slot_mapping.min()) < 0:
        return TorchPlan(usable=False)
    plan = TorchPlan(usable=True)
    dev = meta.slot_mapping.device
    if meta.num_decodes:
        token_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
        plan.decodes = _decode_chunks(meta, block_size, max(1, _DECODE_GATHER_BYTES // token_bytes), dev)
        plan.max_gather_blocks = max(c.blocks.shape[0] for c in plan.decodes)
    nd = meta.num_decodes
    starts = meta.prefill_query_start_loc.tolist()
    tables = meta.prefill_block_tables.tolist()
    for s, seq_len in enumerate(meta.prefill_seq_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        new = hi - lo
        p = PrefillSeq(slice(nd + lo, nd + hi), seq_len - new, [], None, None)
        if p.cached:
            ids = tables[s][:-(-p.cached // block_size)]
            runs = _runs(ids)
            if len(runs) <= _MAX_VIEW_RUNS:
                p.runs = runs
            else:
                p.blocks = torch.tensor(ids, dtype=torch.long, device=dev)
                plan.max_gather_blocks = max(plan.max_gather_blocks, len(ids))
            group = num_heads // k_cache.shape[2]
            # Additive (the fused op wants the query's dtype): -inf above the diagonal.
            causal = torch.full((new, new), float("-inf"), dtype=k_cache.dtype, device=dev).triu_(1)
            p.new_mask = causal.repeat(group, 1)
        plan.prefills.append(p)
    return plan


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Block ids -> (first, count) of each run of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _decode_chunks(meta: AttentionMetadata, block_size: int, budget: int, dev: torch.device) -> list[DecodeChunk]:
    """Sequences in length order (similar lengths share a chunk: little padding), cut where a
    chunk's padded K would pass ``budget`` tokens; at least one sequence per chunk."""
    lens = meta.decode_seq_lens.tolist()
    tables = meta.decode_block_tables.tolist()
    order = sorted(range(len(lens)), key=lens.__getitem__)
    chunks, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or lens[order[end]] * (end + 1 - start) > budget:
            chunks.append(_decode_chunk_plan([order[i] for i in range(start, end)], lens, tables, block_size, dev))
            start = end
    return chunks


def _decode_chunk_plan(seqs: list[int], lens: list[int], tables: list[list[int]], block_size: int,
                       dev: torch.device) -> DecodeChunk:
    chunk_lens = [lens[i] for i in seqs]
    max_len = max(chunk_lens)
    n_blocks = -(-max_len // block_size)
    flat = []
    for i in seqs:
        used = -(-lens[i] // block_size)
        flat += tables[i][:used] + [0] * (n_blocks - used)  # holes read block 0; masked and zeroed
    pad = mask = None
    if min(chunk_lens) < max_len:
        valid = torch.arange(max_len, device=dev) < torch.tensor(chunk_lens, device=dev)[:, None]  # [n, T]
        pad = ~valid[:, :, None, None]
        mask = valid[:, None, None, :]
    return DecodeChunk(torch.tensor(seqs, dtype=torch.long, device=dev), torch.tensor(flat, dtype=torch.long, device=dev),
                       n_blocks, max_len, pad, mask)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, kv_heads, head_dim] rows ``blocks`` into ``buf`` (no allocation)."""
    out = buf[:blocks.shape[0]]
    torch.index_select(cache, 0, blocks, out=out)
    return out


def decode_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, c: DecodeChunk,
                 ws: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rows, attention output [n, num_heads, head_dim]) of one decode chunk."""
    n = c.rows.shape[0]
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    k = _gather(k_cache, c.blocks, ws[0]).view(n, -1, kv_heads, head_dim)[:, :c.max_len]  # [n, T, Hkv, D]
    v = _gather(v_cache, c.blocks, ws[1]).view(n, -1, kv_heads, head_dim)[:, :c.max_len]
    if c.pad is not None:
        # Stale pool memory past a sequence's end may hold anything; a masked score times NaN is NaN.
        k.masked_fill_(c.pad, 0)
        v.masked_fill_(c.pad, 0)
    # GQA without repeating K/V: the query heads of one kv head become rows of it.
    q_rows = q.index_select(0, c.rows).view(n, kv_heads, heads // kv_heads, head_dim)  # [n, Hkv, G, D]
    out = F.scaled_dot_product_attention(q_rows, k.transpose(1, 2), v.transpose(1, 2), attn_mask=c.mask,
                                         scale=scale)  # [n, Hkv, G, D]
    return c.rows, out.view(n, heads, head_dim)


def prefill_seq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                p: PrefillSeq, ws: torch.Tensor, scale: float) -> tuple[slice, torch.Tensor]:
    """-> (rows, attention output [new, num_heads, head_dim]) of one prefilling sequence."""
    if not p.cached:  # no cached prefix: the new tokens are all the keys
        # 4-D with a batch of one: 3-D inputs send CPU SDPA to its slow unfused math path.
        qh, kh, vh = q[p.rows].transpose(0, 1)[None], k[p.rows].transpose(0, 1)[None], v[p.rows].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=qh.shape[1] != kh.shape[1])  # [1, H, new, D]
        return p.rows, out[0].transpose(0, 1)
    new, heads, head_dim = q[p.rows].shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    # GQA without repeating K/V: the query heads of one kv head become rows of it.
    qf = q[p.rows].reshape(new, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, head_dim)
    parts = [_flash(qf, k[p.rows], v[p.rows], p.new_mask, scale)]  # the new keys, causally
    for first, n_blocks, length in _prefix_segments(p, k_cache.shape[1]):
        parts.append(_flash(qf, k_cache[first:first + n_blocks].flatten(0, 1)[:length],
                            v_cache[first:first + n_blocks].flatten(0, 1)[:length], None, scale))
    if p.blocks is not None:
        parts.append(_flash(qf, _gather(k_cache, p.blocks, ws[0]).flatten(0, 1)[:p.cached],
                            _gather(v_cache, p.blocks, ws[1]).flatten(0, 1)[:p.cached], None, scale))
    out = _merge(parts)  # [1, Hkv, G * new, D]
    return p.rows, out[0].view(kv_heads, group, new, head_dim).permute(2, 0, 1, 3).reshape(new, heads, head_dim)


def _prefix_segments(p: PrefillSeq, block_size: int) -> list[tuple[int, int, int]]:
    """(first block, blocks, tokens) of each view over the prefix; the last one ends at ``cached``."""
    segs, start = [], 0
    for first, n_blocks in p.runs:
        length = min(n_blocks * block_size, p.cached - start)
        segs.append((first, n_blocks, length))
        start += length
    return segs


def _flash(qf: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qf [1, Hkv, rows, D] over keys/values [T, Hkv, D] -> (out [1, Hkv, rows, D], lse [1, Hkv, rows])."""
    kh, vh = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, kh, vh, attn_mask=mask, scale=scale)
    return out, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over disjoint key sets -> attention over their union, weighted by each part's log-sum-exp.

    The log-sum-exps are fp32 whatever the query's dtype: the sum runs in fp32 and is
    cast back once (a bf16 output must stay bf16 for o_proj)."""
    out, lse = parts[0]
    dtype = out.dtype
    for o, l in parts[1:]:
        total = torch.logaddexp(lse, l)
        out = out * (lse - total).exp_()[..., None] + o * (l - total).exp_()[..., None]
        lse = total
    return out.to(dtype)
