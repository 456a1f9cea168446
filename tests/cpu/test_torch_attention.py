"""The CPU attention path (per-step plan, views and workspace gathers) against the kernels'
references, and pre-packed linear weights against plain F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.engine.model.layers import can_pack, matmul, pack_weight
from radixserve.engine.worker.attention import AttentionBackend, AttentionMetadata, TorchAttention

BS, HKV, HEADS, D = 4, 2, 4, 8


def _meta(decodes: list[tuple[list[int], int]], prefills: list[tuple[list[int], int, int]]) -> AttentionMetadata:
    """decodes: (blocks, seq_len); prefills: (blocks, seq_len, new tokens). Slots of the new tokens."""
    slots = []
    for blocks, seq_len in decodes:
        p = seq_len - 1
        slots.append(blocks[p // BS] * BS + p % BS)
    for blocks, seq_len, new in prefills:
        slots += [blocks[p // BS] * BS + p % BS for p in range(seq_len - new, seq_len)]

    def table(rows):
        width = max((len(r) for r in rows), default=1)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows] or [[0]], dtype=torch.int32)[:len(rows)]

    qsl = [0]
    for _, _, new in prefills:
        qsl.append(qsl[-1] + new)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long), num_decodes=len(decodes),
        decode_block_tables=table([b for b, _ in decodes]),
        decode_seq_lens=torch.tensor([s for _, s in decodes], dtype=torch.int32),
        num_prefills=len(prefills), prefill_block_tables=table([b for b, _, _ in prefills]),
        prefill_query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        prefill_seq_lens=torch.tensor([s for _, s, _ in prefills], dtype=torch.int32))


CASES = {
    # one sequence, prefix hit with consecutive blocks (a view of the pool) / scattered blocks (a gather)
    "hit_view": ([], [([3, 4, 5, 6], 15, 5)]),
    "hit_runs": ([], [([9, 2, 7, 0], 14, 3)]),
    # more runs than _MAX_VIEW_RUNS: the prefix is gathered
    "hit_gather": ([], [([9, 2, 7, 0, 12, 5], 23, 2)]),
    "miss": ([], [([1, 2], 7, 7)]),
    "decodes_only": ([([1], 3), ([2, 5, 8], 11), ([6, 7], 8)], []),
    "mixed": ([([1], 1), ([2, 5, 8], 12)], [([10, 11, 12], 10, 4), ([13, 3], 6, 6), ([14, 15, 4], 9, 1)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_attention_matches_the_references(case):
    torch.manual_seed(0)
    decodes, prefills = CASES[case]
    meta = _meta(decodes, prefills)
    n = meta.slot_mapping.shape[0]
    q, k, v = torch.randn(n, HEADS, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
    pool = torch.randn(2, 16, BS, HKV, D)  # stale pool contents everywhere, as after reuse
    ref_pool = pool.clone()
    ours = TorchAttention()
    out = ours.attend(q, k, v, pool[0], pool[1], meta, D ** -0.5)
    ref_meta = _meta(decodes, prefills)
    ref = AttentionBackend.attend(ours, q, k, v, ref_pool[0], ref_pool[1], ref_meta, D ** -0.5)
    assert meta.plan is not None and meta.plan.usable
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool, ref_pool, atol=0, rtol=0)  # the same K/V written to the same slots


def test_views_runs_and_gather_are_all_exercised():
    from radixserve.engine.worker import torch_plan
    k_cache = torch.zeros(16, BS, HKV, D)
    view, runs, gather = (torch_plan.build(_meta(*CASES[c]), k_cache, HEADS).prefills[0]
                          for c in ("hit_view", "hit_runs", "hit_gather"))
    assert view.runs == [(3, 3)] and view.blocks is None and view.cached == 10  # the last block partial
    assert runs.runs == [(9, 1), (2, 1), (7, 1)] and runs.blocks is None
    assert gather.runs == [] and gather.blocks.tolist() == [9, 2, 7, 0, 12, 5]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads", [HKV, HEADS])  # MHA and GQA
def test_lse_merged_prefix_attention_on_random_block_tables(seed, heads):
    """Random prefix lengths (partial last blocks too), block tables part consecutive, part scattered."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(16, generator=g).tolist()
    prefills, used = [], 0
    for _ in range(2):
        seq_len = int(torch.randint(6, 20, (1,), generator=g))
        new = int(torch.randint(1, seq_len - 2, (1,), generator=g))
        n = -(-seq_len // BS)
        start = int(torch.randint(0, 16 - n, (1,), generator=g))
        blocks = list(range(start, start + n)) if seed % 2 else perm[used:used + n]
        used += n
        prefills.append((blocks, seq_len, new))
    meta, ref_meta = _meta([], prefills), _meta([], prefills)
    n_tok = meta.slot_mapping.shape[0]
    q, k, v = torch.randn(n_tok, heads, D, generator=g), torch.randn(n_tok, HKV, D, generator=g), \
        torch.randn(n_tok, HKV, D, generator=g)
    pool = torch.randn(2, 16, BS, HKV, D, generator=g)
    ref_pool = pool.clone()
    ours = TorchAttention()
    out = ours.attend(q, k, v, pool[0], pool[1], meta, D ** -0.5)
    ref = AttentionBackend.attend(ours, q, k, v, ref_pool[0], ref_pool[1], ref_meta, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 33])
def test_packed_matmul_matches_linear(rows, dtype):
    if not can_pack(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"no oneDNN {dtype} weight packing on this CPU / torch build")
    torch.manual_seed(0)
    w, b = torch.randn(48, 40, dtype=dtype), torch.randn(48, dtype=dtype)
    x = torch.randn(rows, 40, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out = matmul(x, w, pack_weight(w), b)
    assert out.dtype == dtype
    torch.testing.assert_close(out, F.linear(x, w, b), atol=tol, rtol=tol)


@pytest.mark.parametrize("case", ["hit_view", "hit_runs", "hit_gather", "mixed"])
def test_bf16_planned_attention_stays_bf16_and_matches_fp32(case):
    """The prefix parts are merged in fp32 (their log-sum-exps are fp32) and cast back once."""
    torch.manual_seed(0)
    meta, ref_meta = _meta(*CASES[case]), _meta(*CASES[case])
    n = meta.slot_mapping.shape[0]
    q, k, v = torch.randn(n, HEADS, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
    pool = torch.randn(2, 16, BS, HKV, D)
    bf = [t.bfloat16() for t in (q, k, v, pool)]
    out = TorchAttention().attend(bf[0], bf[1], bf[2], bf[3][0], bf[3][1], meta, D ** -0.5)
    ref = TorchAttention().attend(*(t.bfloat16().float() for t in (q, k, v)), bf[3][0].float(), bf[3][1].float(),
                                  ref_meta, D ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_rotary_is_transformers_rotation_bit_for_bit():
    from radixserve.engine.model.layers import RotaryEmbedding

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        rope = RotaryEmbedding(D, 64, 10000.0, None, dtype, torch.device("cpu"))
        pos = torch.tensor([0, 5, 63, 17])
        x = torch.randn(4, 3, D).to(dtype)
        cos, sin = rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1)
        assert torch.equal(RotaryEmbedding.apply(rope.table(pos), x), x * cos + rotate_half(x) * sin)
