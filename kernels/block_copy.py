"""Whole-block copies in the KV cache pool ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.

* ``copy_blocks``: block src[i] -> dst[i] inside one pool, all layers and K/V
  (copy-on-write of a partially filled shared block).
* ``swap_blocks``: blocks between two pools of the same layout except num_blocks,
  e.g. the device pool and a pinned host pool (swap out / swap in).

A Triton kernel cannot address host memory, so a device<->host swap is staged:
swap out = Triton gather of the blocks into a contiguous device buffer, then one
``copy_(non_blocking=True)`` into a pinned host buffer, then a host-side scatter
into the host pool; swap in = host-side gather into a pinned buffer, one
``non_blocking`` host->device copy, then a Triton scatter into the device pool.
One large transfer beats one per block and keeps the PCIe link busy.
"""

from __future__ import annotations

import torch

from radixserve.kernels._triton import cdiv, check_launch_device, tl, triton

_BLOCK = 1024  # elements per program; one cache block is split across programs


def _check_pool(pool: torch.Tensor, name: str) -> None:
    assert pool.dim() == 6, (f"{name} must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                             f"got {tuple(pool.shape)}")


def _check_ids(src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor) -> None:
    for name, ids in (("src_block_ids", src_block_ids), ("dst_block_ids", dst_block_ids)):
        assert ids.dim() == 1, f"{name} must be 1-D, got {tuple(ids.shape)}"
        assert ids.dtype == torch.int64, f"{name} must be int64, got {ids.dtype}"
    assert src_block_ids.shape == dst_block_ids.shape, (
        f"src_block_ids {tuple(src_block_ids.shape)} != dst_block_ids {tuple(dst_block_ids.shape)}")


def _check_swap_pools(src_pool: torch.Tensor, dst_pool: torch.Tensor) -> None:
    _check_pool(src_pool, "src_pool")
    _check_pool(dst_pool, "dst_pool")
    assert src_pool.shape[:2] == dst_pool.shape[:2] and src_pool.shape[3:] == dst_pool.shape[3:], (
        f"pools differ in more than num_blocks: {tuple(src_pool.shape)} vs {tuple(dst_pool.shape)}")
    assert src_pool.dtype == dst_pool.dtype, f"pool dtypes differ: {src_pool.dtype} vs {dst_pool.dtype}"


def copy_blocks_ref(kv_cache: torch.Tensor, src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor) -> None:
    """kv_cache[:, :, dst[i]] = kv_cache[:, :, src[i]] for every i (in place)."""
    _check_pool(kv_cache, "kv_cache")
    _check_ids(src_block_ids, dst_block_ids)
    kv_cache[:, :, dst_block_ids] = kv_cache[:, :, src_block_ids]


def swap_blocks_ref(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_block_ids: torch.Tensor,
                    dst_block_ids: torch.Tensor) -> None:
    """dst_pool[:, :, dst[i]] = src_pool[:, :, src[i]]; the pools may be on different devices.

    Each index tensor is moved to the device of the pool it indexes. The transfer is
    non_blocking only towards a CUDA pool, where the scatter that reads it is ordered
    on the same stream; a device->host result is read by the CPU right away, so that
    copy must be blocking.
    """
    _check_swap_pools(src_pool, dst_pool)
    _check_ids(src_block_ids, dst_block_ids)
    src_ids = src_block_ids.to(src_pool.device)
    dst_ids = dst_block_ids.to(dst_pool.device)
    blocks = src_pool[:, :, src_ids]  # [L, 2, n, B, H, D] on the source device
    dst_pool[:, :, dst_ids] = blocks.to(dst_pool.device, non_blocking=dst_pool.device.type == "cuda")


@triton.jit
def _gather_scatter_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    src_layer_stride, dst_layer_stride, block_numel,
    BLOCK: tl.constexpr,
):
    # dst[lk, dst_ids[i]] = src[lk, src_ids[i]] for one chunk of one block, where
    # lk = layer * 2 + (K or V) indexes the flattened first two pool dimensions.
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1)
    chunk = tl.program_id(2)
    src_block = tl.load(src_ids_ptr + pair)
    dst_block = tl.load(dst_ids_ptr + pair)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    src = src_ptr + layer_kv.to(tl.int64) * src_layer_stride + src_block * block_numel + offs
    dst = dst_ptr + layer_kv.to(tl.int64) * dst_layer_stride + dst_block * block_numel + offs
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def _gather_scatter(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_ids: torch.Tensor,
                    dst_ids: torch.Tensor) -> None:
    """One Triton launch: dst_pool[:, :, dst_ids[i]] = src_pool[:, :, src_ids[i]], same device."""
    check_launch_device(_gather_scatter_kernel, src_pool, dst_pool, src_ids, dst_ids)
    assert src_pool.is_contiguous() and dst_pool.is_contiguous(), "pools must be contiguous"
    num_pairs = src_ids.shape[0]
    if num_pairs == 0:
        return
    num_layers = src_pool.shape[0]
    block_numel = src_pool[0, 0, 0].numel()  # block_size * num_kv_heads * head_dim
    grid = (num_pairs, num_layers * 2, cdiv(block_numel, _BLOCK))
    _gather_scatter_kernel[grid](
        src_pool, dst_pool, src_ids, dst_ids,
        src_pool.stride(1), dst_pool.stride(1), block_numel,
        BLOCK=_BLOCK,
    )


def copy_blocks(kv_cache: torch.Tensor, src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor) -> None:
    """Triton version of `copy_blocks_ref`.

    Blocks are copied concurrently, so no dst id may also appear among the src ids
    (true for copy-on-write, whose destinations are freshly allocated blocks).
    """
    _check_pool(kv_cache, "kv_cache")
    _check_ids(src_block_ids, dst_block_ids)
    _gather_scatter(kv_cache, kv_cache, src_block_ids, dst_block_ids)


def _staging_buffer(pool: torch.Tensor, num_blocks: int, device: torch.device, pin: bool) -> torch.Tensor:
    shape = (pool.shape[0], 2, num_blocks, *pool.shape[3:])  # [L, 2, n, B, H, D]
    return torch.empty(shape, dtype=pool.dtype, device=device, pin_memory=pin)


def swap_out(device_pool: torch.Tensor, host_pool: torch.Tensor, src_block_ids: torch.Tensor,
             dst_block_ids: torch.Tensor) -> None:
    """Device -> host: Triton gather into a device staging buffer, one copy to pinned host memory.

    Returns once the blocks are in host_pool: the host-side scatter must wait for the
    non_blocking copy (a stream sync), since the CPU reads the staging buffer.
    """
    device = device_pool.device
    num = src_block_ids.shape[0]
    staging = _staging_buffer(device_pool, num, device, pin=False)  # [L, 2, n, B, H, D]
    identity = torch.arange(num, device=device)
    _gather_scatter(device_pool, staging, src_block_ids.to(device), identity)
    host_staging = _staging_buffer(device_pool, num, host_pool.device, pin=device.type == "cuda")
    host_staging.copy_(staging, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    host_pool[:, :, dst_block_ids.to(host_pool.device)] = host_staging


def swap_in(host_pool: torch.Tensor, device_pool: torch.Tensor, src_block_ids: torch.Tensor,
            dst_block_ids: torch.Tensor) -> None:
    """Host -> device: host gather into a pinned buffer, one non_blocking copy, Triton scatter.

    Asynchronous w.r.t. the host: the scatter is ordered after the copy on the current
    stream, and torch's pinned-memory allocator keeps the buffer alive until the copy ends.
    """
    device = device_pool.device
    num = src_block_ids.shape[0]
    host_staging = _staging_buffer(host_pool, num, host_pool.device, pin=device.type == "cuda")
    torch.index_select(host_pool, 2, src_block_ids.to(host_pool.device), out=host_staging)
    staging = host_staging.to(device, non_blocking=True)  # [L, 2, n, B, H, D]
    identity = torch.arange(num, device=device)
    _gather_scatter(staging, device_pool, identity, dst_block_ids.to(device))


def swap_blocks(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_block_ids: torch.Tensor,
                dst_block_ids: torch.Tensor) -> None:
    """Triton version of `swap_blocks_ref`: dst_pool[:, :, dst[i]] = src_pool[:, :, src[i]].

    Same device: one gather/scatter kernel. Device <-> host: staged, see `swap_out` / `swap_in`.
    """
    _check_swap_pools(src_pool, dst_pool)
    _check_ids(src_block_ids, dst_block_ids)
    for name, pool in (("src_pool", src_pool), ("dst_pool", dst_pool)):
        assert pool.is_contiguous(), f"{name} must be contiguous"
    if src_pool.device == dst_pool.device:
        _gather_scatter(src_pool, dst_pool, src_block_ids.to(src_pool.device), dst_block_ids.to(dst_pool.device))
    elif dst_pool.device.type == "cpu":
        swap_out(src_pool, dst_pool, src_block_ids, dst_block_ids)
    elif src_pool.device.type == "cpu":
        swap_in(src_pool, dst_pool, src_block_ids, dst_block_ids)
    else:
        raise ValueError(f"swap between two accelerators ({src_pool.device} -> {dst_pool.device}) is not supported")
