"""Kernels vs their torch references, and the references vs a naive dense attention.

Without CUDA the Triton kernels run under the CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny. With CUDA the same tests run the compiled
kernels on the GPU. Every paged cache starts filled with NaN and only the slots a
kernel may read are written, so any read of a hole, of padding, or of a slot the
contract says not to rely on shows up as NaN in the output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.kernels.block_copy import copy_blocks_ref, swap_blocks_ref
from radixserve.kernels.paged_decode import default_num_splits, paged_decode_attention_ref
from radixserve.kernels.prefix_prefill import prefix_prefill_attention_ref
from radixserve.kernels.reshape_and_cache import reshape_and_cache_ref
from tests.cpu.kernel_cases import (
    assert_close,
    make_decode_case,
    make_prefill_case,
    naive_decode,
    naive_prefill,
    run_decode,
    run_prefill,
)


@pytest.fixture(scope="module")
def triton_device() -> str:
    """Where the Triton kernels can run here: 'cpu' under the interpreter, else 'cuda'."""
    pytest.importorskip("triton")
    from radixserve.kernels._triton import is_interpreted
    from radixserve.kernels.paged_decode import _paged_decode_kernel

    if is_interpreted(_paged_decode_kernel):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no CUDA and TRITON_INTERPRET is not set")


def skip_if_interpreted_bf16(dtype: torch.dtype, device: str) -> None:
    if dtype == torch.bfloat16 and device == "cpu":
        # triton-lang/triton#11584: the interpreter multiplies the raw bf16 bit patterns in tl.dot.
        pytest.skip("Triton interpreter does not support bf16 tl.dot")


# ------------------------------------------------------------------- references vs naive

DECODE_REF_CASES = [
    # group, num_kv_heads, head_dim, block_size, dtype, hole
    (1, 2, 16, 4, torch.float32, "minus_one"),
    (2, 2, 32, 16, torch.float32, "garbage"),
    (4, 1, 80, 8, torch.float32, "minus_one"),
    (8, 2, 64, 1, torch.float32, "garbage"),
    (4, 2, 64, 16, torch.float16, "minus_one"),
    (2, 2, 80, 32, torch.bfloat16, "garbage"),
]


@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,dtype,hole", DECODE_REF_CASES)
def test_decode_reference_matches_naive(group, num_kv_heads, head_dim, block_size, dtype, hole):
    case = make_decode_case([1, 7, 33, 130], group, num_kv_heads, head_dim, block_size, dtype, "cpu", hole)
    out = run_decode(paged_decode_attention_ref, case)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert_close(out, naive_decode(case), dtype)


def test_decode_reference_in_several_chunks():
    from radixserve.kernels.paged_decode import _REF_GATHER_BUDGET_BYTES, _sequence_chunks

    # budget of 10 padded tokens: [3, 5] pads to 2 x 5; adding 2 would make 3 x 5
    assert _sequence_chunks([3, 5, 2, 9], _REF_GATHER_BUDGET_BYTES // 10) == [(0, 2), (2, 3), (3, 4)]
    case = make_decode_case([300, 1, 400, 250, 7, 513], 1, 8, 128, 16, torch.float32, "cpu", "garbage")
    assert len(_sequence_chunks(case.seq_lens.tolist(), 8 * 128 * 4)) > 1  # fp32 K bytes per token
    assert_close(run_decode(paged_decode_attention_ref, case), naive_decode(case), torch.float32)


PREFILL_REF_CASES = [
    # prefix_lens, new_lens, group, num_kv_heads, head_dim, block_size, dtype, hole
    ([0], [37], 1, 2, 16, 4, torch.float32, "minus_one"),
    ([0, 16, 5, 40], [9, 1, 20, 33], 2, 2, 32, 4, torch.float32, "garbage"),
    ([64, 0, 7], [0, 5, 70], 4, 1, 80, 16, torch.float32, "minus_one"),
    ([3, 32], [30, 8], 4, 2, 64, 8, torch.float16, "garbage"),
    ([0, 17], [12, 21], 2, 2, 64, 16, torch.bfloat16, "minus_one"),
]


@pytest.mark.parametrize("prefix_lens,new_lens,group,num_kv_heads,head_dim,block_size,dtype,hole", PREFILL_REF_CASES)
def test_prefill_reference_matches_naive(prefix_lens, new_lens, group, num_kv_heads, head_dim, block_size, dtype,
                                         hole):
    case = make_prefill_case(prefix_lens, new_lens, group, num_kv_heads, head_dim, block_size, dtype, "cpu", hole)
    out = run_prefill(prefix_prefill_attention_ref, case)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert_close(out, naive_prefill(case), dtype)


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=4),
       group=st.sampled_from([1, 2, 4]), block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 1000))
def test_prefill_reference_matches_naive_random(lens, group, block_size, seed):
    prefix_lens = [p for p, _ in lens]
    new_lens = [n for _, n in lens]
    case = make_prefill_case(prefix_lens, new_lens, group, 2, 16, block_size, torch.float32, "cpu", seed=seed)
    assert_close(run_prefill(prefix_prefill_attention_ref, case), naive_prefill(case), torch.float32)


def test_reshape_and_cache_reference_matches_loop():
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(6, 2, 16, generator=gen)
    value = torch.randn(6, 2, 16, generator=gen)
    k_cache = torch.zeros(5, 4, 2, 16)
    v_cache = torch.zeros(5, 4, 2, 16)
    slots = torch.tensor([3, -1, 17, 0, -1, 9])
    reshape_and_cache_ref(key, value, k_cache, v_cache, slots)
    k_expected, v_expected = torch.zeros(5, 4, 2, 16), torch.zeros(5, 4, 2, 16)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_expected[slot // 4, slot % 4] = key[t]
            v_expected[slot // 4, slot % 4] = value[t]
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_block_copy_references_match_loop():
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(2, 2, 8, 4, 2, 8, generator=gen)
    host = torch.randn(2, 2, 5, 4, 2, 8, generator=gen)
    src, dst = torch.tensor([1, 6, 2]), torch.tensor([4, 0, 7])

    copied, expected = pool.clone(), pool.clone()
    copy_blocks_ref(copied, src, dst)
    for s, d in zip(src.tolist(), dst.tolist()):
        expected[:, :, d] = pool[:, :, s]
    assert torch.equal(copied, expected)

    host_dst = torch.tensor([3, 0, 4])
    swapped, expected = host.clone(), host.clone()
    swap_blocks_ref(pool, swapped, src, host_dst)
    for s, d in zip(src.tolist(), host_dst.tolist()):
        expected[:, :, d] = pool[:, :, s]
    assert torch.equal(swapped, expected)


def test_references_import_and_run_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from radixserve.kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref
import radixserve.kernels.block_copy, radixserve.kernels.prefix_prefill, radixserve.kernels.reshape_and_cache
q = torch.randn(1, 2, 16); cache = torch.randn(2, 4, 1, 16)
table = torch.tensor([[1, 0]], dtype=torch.int32); lens = torch.tensor([6], dtype=torch.int32)
assert paged_decode_attention_ref(q, cache, cache, table, lens, 0.25).shape == (1, 2, 16)
try:
    paged_decode_attention(q, cache, cache, table, lens, 0.25)
except ImportError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("the Triton launcher ran without triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_default_num_splits():
    assert default_num_splits(num_seqs=64, num_kv_heads=8, max_context=4096, num_sms=132) == 1
    assert default_num_splits(num_seqs=1, num_kv_heads=8, max_context=32768, num_sms=132) > 8
    assert default_num_splits(num_seqs=1, num_kv_heads=8, max_context=100, num_sms=132) == 1


# ----------------------------------------------------------------- Triton vs references

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (3, 80)])
def test_reshape_and_cache_triton(triton_device, dtype, num_kv_heads, head_dim):
    from radixserve.kernels.reshape_and_cache import reshape_and_cache

    gen = torch.Generator().manual_seed(1)
    # key/value as strided slices of a fused projection, as the model produces them
    kv = torch.randn(7, 2, num_kv_heads, head_dim, generator=gen).to(dtype).to(triton_device)
    key, value = kv[:, 0], kv[:, 1]
    cache = torch.randn(2, 6, 4, num_kv_heads, head_dim, generator=gen).to(dtype).to(triton_device)
    slots = torch.tensor([5, -1, 23, 0, 12, -1, 7], device=triton_device)
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected[0], expected[1], slots)
    reshape_and_cache(key, value, cache[0], cache[1], slots)
    assert torch.equal(cache, expected)


DECODE_TRITON_CASES = [
    # group, num_kv_heads, head_dim, block_size, dtype, num_splits, hole
    (1, 2, 16, 4, torch.float32, 1, "minus_one"),
    (2, 2, 32, 16, torch.float32, 3, "garbage"),
    (4, 1, 80, 8, torch.float32, None, "minus_one"),
    (8, 1, 64, 1, torch.float16, 2, "minus_one"),
    (4, 2, 128, 16, torch.float16, 4, "garbage"),
    (2, 2, 80, 32, torch.float16, None, "garbage"),
    (1, 2, 64, 16, torch.float16, 1, "minus_one"),
    (4, 2, 64, 16, torch.bfloat16, 1, "minus_one"),
    (4, 2, 64, 16, torch.bfloat16, 3, "garbage"),
]


@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,dtype,num_splits,hole", DECODE_TRITON_CASES)
def test_paged_decode_triton(triton_device, group, num_kv_heads, head_dim, block_size, dtype, num_splits, hole):
    from radixserve.kernels.paged_decode import paged_decode_attention

    skip_if_interpreted_bf16(dtype, triton_device)
    case = make_decode_case([1, 7, 33, 130], group, num_kv_heads, head_dim, block_size, dtype, triton_device, hole)
    out = run_decode(paged_decode_attention, case, num_splits=num_splits)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert_close(out, run_decode(paged_decode_attention_ref, case), dtype)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("num_splits", [1, 16])  # 16: most splits of the short sequences are empty
def test_paged_decode_triton_sweep(triton_device, group, head_dim, num_splits):
    from radixserve.kernels.paged_decode import paged_decode_attention

    case = make_decode_case([300, 1, 64, 65, 17], group, 2, head_dim, 16, torch.float16, triton_device,
                            "garbage", seed=group * head_dim)
    out = run_decode(paged_decode_attention, case, num_splits=num_splits)
    assert_close(out, run_decode(paged_decode_attention_ref, case), torch.float16)


def test_decode_reads_key_written_by_reshape_and_cache(triton_device):
    """The engine's decode step: write the new token's K/V, then attend over the whole sequence."""
    from radixserve.kernels.paged_decode import paged_decode_attention
    from radixserve.kernels.reshape_and_cache import reshape_and_cache

    case = make_decode_case([5, 16, 21], 2, 2, 32, 8, torch.float32, triton_device)
    lens = case.seq_lens.long()
    last = lens - 1  # position of the token being decoded
    block_ids = case.paged.block_tables.long().gather(1, (last // 8)[:, None])[:, 0]
    slots = block_ids * 8 + last % 8
    gen = torch.Generator().manual_seed(5)
    new_k = torch.randn(3, 2, 32, generator=gen).to(triton_device)
    new_v = torch.randn(3, 2, 32, generator=gen).to(triton_device)
    reshape_and_cache(new_k, new_v, case.paged.k_cache, case.paged.v_cache, slots)
    for s, n in enumerate(lens.tolist()):
        case.paged.k_dense[s][n - 1] = new_k[s]
        case.paged.v_dense[s][n - 1] = new_v[s]
    assert_close(run_decode(paged_decode_attention, case, num_splits=2), naive_decode(case), torch.float32)


PREFILL_TRITON_CASES = [
    # prefix_lens, new_lens, group, num_kv_heads, head_dim, block_size, dtype, hole
    ([0], [37], 1, 2, 16, 4, torch.float32, "minus_one"),
    ([0, 16, 5, 40], [9, 1, 20, 33], 2, 2, 32, 4, torch.float32, "garbage"),
    ([64, 0, 7], [0, 5, 70], 4, 1, 80, 16, torch.float32, "minus_one"),
    ([3, 32], [30, 8], 4, 2, 64, 8, torch.float16, "garbage"),
    ([48, 0], [40, 33], 1, 2, 128, 16, torch.float16, "minus_one"),
    ([0, 17], [12, 21], 2, 2, 64, 16, torch.bfloat16, "minus_one"),
]


@pytest.mark.parametrize("prefix_lens,new_lens,group,num_kv_heads,head_dim,block_size,dtype,hole",
                         PREFILL_TRITON_CASES)
def test_prefix_prefill_triton(triton_device, prefix_lens, new_lens, group, num_kv_heads, head_dim, block_size,
                               dtype, hole):
    from radixserve.kernels.prefix_prefill import prefix_prefill_attention

    skip_if_interpreted_bf16(dtype, triton_device)
    case = make_prefill_case(prefix_lens, new_lens, group, num_kv_heads, head_dim, block_size, dtype,
                             triton_device, hole)
    out = run_prefill(prefix_prefill_attention, case)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert_close(out, run_prefill(prefix_prefill_attention_ref, case), dtype)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("prefix_len", [0, 5, 33, 100])  # 33: one past a tile edge
def test_prefix_prefill_triton_sweep(triton_device, group, prefix_len):
    from radixserve.kernels.prefix_prefill import prefix_prefill_attention

    # three sequences sharing the prefix length, with ragged new lengths across tile edges
    case = make_prefill_case([prefix_len] * 3, [1, 31, 66], group, 2, 32, 16, torch.float16, triton_device,
                             "garbage", seed=group + prefix_len)
    assert_close(run_prefill(prefix_prefill_attention, case), run_prefill(prefix_prefill_attention_ref, case),
                 torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_and_swap_blocks_triton(triton_device, dtype):
    from radixserve.kernels.block_copy import copy_blocks, swap_blocks, swap_in, swap_out

    gen = torch.Generator().manual_seed(2)
    pool = torch.randn(2, 2, 9, 4, 3, 40, generator=gen).to(dtype).to(triton_device)  # block: 480 elements
    # The second pool is the host pool: pinned CPU memory beside a GPU pool; under the
    # interpreter everything is on the CPU, and swap_out/swap_in still run the staged path.
    other = torch.randn(2, 2, 6, 4, 3, 40, generator=gen).to(dtype)
    if triton_device == "cuda":
        other = other.pin_memory()
    src = torch.tensor([1, 8, 3], device=triton_device)
    dst = torch.tensor([5, 0, 2], device=triton_device)

    copied, expected = pool.clone(), pool.clone()
    copy_blocks(copied, src, dst)
    copy_blocks_ref(expected, src, dst)
    assert torch.equal(copied, expected)

    for fn in (swap_blocks, swap_out):  # pool -> other (swap_out: the staged device->host path)
        swapped, expected = other.clone(), other.clone()
        fn(pool, swapped, src, dst)
        swap_blocks_ref(pool, expected, src, dst)
        assert torch.equal(swapped, expected), fn.__name__
    for fn in (swap_blocks, swap_in):  # other -> pool (swap_in: the staged host->device path)
        swapped, expected = pool.clone(), pool.clone()
        fn(other, swapped, dst, src)
        swap_blocks_ref(other, expected, dst, src)
        assert torch.equal(swapped, expected), fn.__name__


def test_launchers_reject_bad_arguments(triton_device):
    from radixserve.kernels.paged_decode import paged_decode_attention

    case = make_decode_case([3, 9], 2, 1, 16, 4, torch.float32, triton_device)
    with pytest.raises(AssertionError, match="block_tables must be int32"):
        paged_decode_attention(case.q, case.paged.k_cache, case.paged.v_cache, case.paged.block_tables.long(),
                               case.seq_lens, case.scale)
    with pytest.raises(AssertionError, match="dtypes differ"):
        paged_decode_attention(case.q.half(), case.paged.k_cache, case.paged.v_cache, case.paged.block_tables,
                               case.seq_lens, case.scale)
