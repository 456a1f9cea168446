"""Write the new tokens' K/V projections into the paged KV cache.

Cache layout per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads,
head_dim]``; token t goes to slot ``slot_mapping[t] = block_id * block_size + offset``.
A slot of -1 marks a padding token that must not be written.
"""

from __future__ import annotations

import torch

from radixserve.kernels._triton import check_launch_device, next_power_of_2, tl, triton


def _check_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    assert key.dim() == 3, f"key must be [num_tokens, num_kv_heads, head_dim], got {tuple(key.shape)}"
    assert value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert k_cache.dim() == 4, ("k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                                f"got {tuple(k_cache.shape)}")
    assert v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    assert k_cache.shape[2:] == key.shape[1:], (
        f"cache heads/head_dim {tuple(k_cache.shape[2:])} != key's {tuple(key.shape[1:])}")
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, (
        f"dtypes differ: key {key.dtype}, value {value.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    assert slot_mapping.shape == (key.shape[0],), (
        f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    assert slot_mapping.dtype == torch.int64, f"slot_mapping must be int64, got {slot_mapping.dtype}"


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Plain-torch scatter of key/value rows into their cache slots (in place).

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64, -1 = skip.
    """
    _check_args(key, value, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[keep]  # [num_kept]
    # Index (block, offset) rather than viewing the cache as [num_slots, ...], so
    # this stays an in-place write even for a non-contiguous cache view.
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep]
    v_cache[blocks, offsets] = value[keep]


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_cache_b, stride_cache_s, stride_cache_h,
    num_kv_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: all its heads at once, one [BLOCK_H, BLOCK_D] tile.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)  # int64
    if slot < 0:  # padding token
        return
    block = slot // block_size
    offset = slot % block_size

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim)  # pads non-power-of-two sizes

    key = tl.load(key_ptr + token * stride_key_t + heads[:, None] * stride_key_h + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + heads[:, None] * stride_value_h + dims[None, :],
                    mask=mask)
    cache_off = block * stride_cache_b + offset * stride_cache_s + heads[:, None] * stride_cache_h + dims[None, :]
    tl.store(k_cache_ptr + cache_off, key, mask=mask)
    tl.store(v_cache_ptr + cache_off, value, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton version of `reshape_and_cache_ref`; same arguments, writes in place."""
    _check_args(key, value, k_cache, v_cache, slot_mapping)
    check_launch_device(_reshape_and_cache_kernel, key, value, k_cache, v_cache, slot_mapping)
    assert k_cache.stride() == v_cache.stride(), (
        f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim, got strides {t.stride()}"
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=next_power_of_2(num_kv_heads), BLOCK_D=next_power_of_2(head_dim),
    )
