"""The Triton kernels vs their torch references at real shapes on CUDA (skipped elsewhere).

Uses the case builders and per-dtype tolerances of tests/cpu/test_kernels.py: caches
start NaN-filled, block ids are shuffled and block tables are padded with holes.
"""

from __future__ import annotations

import pytest
import torch

from radixserve.kernels.block_copy import copy_blocks_ref, swap_blocks_ref
from radixserve.kernels.paged_decode import paged_decode_attention_ref
from radixserve.kernels.prefix_prefill import prefix_prefill_attention_ref
from radixserve.kernels.reshape_and_cache import reshape_and_cache_ref
from tests.cpu.kernel_cases import assert_close, make_decode_case, make_prefill_case, run_decode, run_prefill


def _compiled_kernels_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from radixserve.kernels._triton import is_interpreted
        from radixserve.kernels.paged_decode import _paged_decode_kernel
    except ImportError:
        return False
    return not is_interpreted(_paged_decode_kernel)


pytestmark = pytest.mark.skipif(not _compiled_kernels_available(),
                                reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET unset)")
DEVICE = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_paged_decode_64_seqs_4096_ctx(dtype, num_splits):
    from radixserve.kernels.paged_decode import paged_decode_attention

    case = make_decode_case([4096] * 64, 4, 8, 128, 16, dtype, DEVICE, "garbage")
    assert_close(run_decode(paged_decode_attention, case, num_splits=num_splits),
                 run_decode(paged_decode_attention_ref, case), dtype)


@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_paged_decode_ragged(num_splits):
    from radixserve.kernels.paged_decode import paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    case = make_decode_case(lens, 4, 8, 128, 16, torch.bfloat16, DEVICE, "minus_one")
    assert_close(run_decode(paged_decode_attention, case, num_splits=num_splits),
                 run_decode(paged_decode_attention_ref, case), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_shapes(dtype, group, head_dim, block_size):
    from radixserve.kernels.paged_decode import paged_decode_attention

    case = make_decode_case([1, 15, 16, 17, 1000, 2049, 333, 64], group, 4, head_dim, block_size, dtype, DEVICE,
                            "garbage", seed=group * head_dim)
    for num_splits in (None, 1, 3):
        assert_close(run_decode(paged_decode_attention, case, num_splits=num_splits),
                     run_decode(paged_decode_attention_ref, case), dtype)


def test_paged_decode_cuda_graph_replay():
    """The launcher needs no host sync, so the engine can capture decode in a CUDA graph."""
    from radixserve.kernels.paged_decode import paged_decode_attention

    case = make_decode_case([100, 2000, 4000, 37], 4, 8, 128, 16, torch.bfloat16, DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        run_decode(paged_decode_attention, case, num_splits=4)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_decode(paged_decode_attention, case, num_splits=4)
    case.seq_lens.copy_(torch.tensor([99, 1500, 4000, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, run_decode(paged_decode_attention_ref, case), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefix_prefill_real_shapes(dtype, group):
    from radixserve.kernels.prefix_prefill import prefix_prefill_attention

    num_kv_heads = 32 // group
    case = make_prefill_case([0, 2048, 1000, 4096, 16], [2048, 512, 77, 1, 300], group, num_kv_heads, 128, 16, dtype,
                             DEVICE, "garbage")
    assert_close(run_prefill(prefix_prefill_attention, case), run_prefill(prefix_prefill_attention_ref, case), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_prefix_prefill_other_head_dims(dtype, head_dim):
    from radixserve.kernels.prefix_prefill import prefix_prefill_attention

    case = make_prefill_case([0, 160, 33], [700, 64, 129], 2, 4, head_dim, 16, dtype, DEVICE, "minus_one")
    assert_close(run_prefill(prefix_prefill_attention, case), run_prefill(prefix_prefill_attention_ref, case), dtype)


def test_reshape_and_cache_real_shapes():
    from radixserve.kernels.reshape_and_cache import reshape_and_cache

    num_tokens, num_blocks, block_size, heads, head_dim = 8192, 1024, 16, 8, 128
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    kv = torch.randn(num_tokens, 2, heads, head_dim, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE, generator=gen)[:num_tokens]
    slots[::7] = -1
    cache = torch.zeros(2, num_blocks, block_size, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    expected = cache.clone()
    reshape_and_cache_ref(kv[:, 0], kv[:, 1], expected[0], expected[1], slots)
    reshape_and_cache(kv[:, 0], kv[:, 1], cache[0], cache[1], slots)
    assert torch.equal(cache, expected)


def test_copy_and_swap_blocks_real_shapes():
    from radixserve.kernels.block_copy import copy_blocks, swap_blocks

    shape = (4, 2, 512, 16, 8, 128)  # [layers, K/V, blocks, block_size, kv_heads, head_dim]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    pool = torch.randn(shape, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    host = torch.randn((4, 2, 256, 16, 8, 128), dtype=torch.bfloat16).pin_memory()
    src = torch.randperm(512, device=DEVICE, generator=gen)[:64]
    dst = torch.randperm(512, device=DEVICE, generator=gen)
    dst = dst[~torch.isin(dst, src)][:64]  # copy_blocks needs disjoint src / dst

    copied, expected = pool.clone(), pool.clone()
    copy_blocks(copied, src, dst)
    copy_blocks_ref(expected, src, dst)
    assert torch.equal(copied, expected)

    host_ids = torch.randperm(256)[:64]
    swapped_out, expected = host.clone(), host.clone()
    swap_blocks(pool, swapped_out, src, host_ids)  # staged device -> pinned host
    swap_blocks_ref(pool, expected, src, host_ids)
    assert torch.equal(swapped_out, expected)

    swapped_in, expected = pool.clone(), pool.clone()
    swap_blocks(host, swapped_in, host_ids, dst)  # staged pinned host -> device
    swap_blocks_ref(host, expected, host_ids, dst)
    torch.cuda.synchronize()
    assert torch.equal(swapped_in, expected)


def test_cache_transfer_server_uses_the_triton_swap_kernels():
    from radixserve.engine.cache.cpu_tier import SWAP_IN, SWAP_OUT
    from radixserve.engine.cache.transfer import CacheTransferServer, TransferTask
    from radixserve.engine.executor.auth import FrameAuth
    from radixserve.kernels.block_copy import swap_blocks

    shape = (2, 2, 64, 16, 8, 128)  # [layers, K/V, blocks, block_size, kv_heads, head_dim]
    pool = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    host = torch.zeros((2, 2, 32, 16, 8, 128), dtype=torch.bfloat16).pin_memory()
    server = CacheTransferServer(0, "tcp://127.0.0.1:1", pool, host, FrameAuth.generate(), 1)  # no client: _execute is called directly
    try:
        assert server.swap is swap_blocks
        gpu, cpu = [9, 3, 40, 17], [0, 31, 5, 6]
        assert server._execute(TransferTask(1, SWAP_OUT, gpu, cpu)).ok  # side stream, synchronized
        assert torch.equal(host[:, :, cpu], pool[:, :, gpu].cpu())
        assert server._execute(TransferTask(2, SWAP_IN, [60, 61, 62, 63], cpu)).ok
        assert torch.equal(pool[:, :, 60:64], pool[:, :, gpu])
    finally:
        server.stop()
