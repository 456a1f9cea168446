"""Batched multi-LoRA matmul (SGMV): each token segment uses its own adapter slot.

A step's tokens are grouped into *segments* of consecutive rows that share one
adapter slot; ``seg_indptr[g]:seg_indptr[g+1]`` are the rows of segment ``g`` and
``seg_slots[g]`` its slot (``-1`` = the base model: the segment is skipped). The
LoRA delta of a linear layer is two skinny matmuls:

    shrink   xa[t, :]          = x[t, :] @ A[slot]^T              A: [num_slots, rank, in]
    expand   y[t, off:off+out] += xa[t, :] @ B[slot]^T             B: [num_slots, out, rank]

``xa`` is kept in fp32; the expand adds into ``y`` (any float dtype) in place, so a
fused projection (q/k/v, gate/up) runs one shrink over its stacked A and one
expand per sub-projection into its column range of ``y``. Scaling
(``lora_alpha / r``) is folded into B when an adapter is loaded into its slot.

Each kernel has a plain-torch reference (what the CPU engine runs) and a Triton
launcher that must match it.
"""

from __future__ import annotations

import torch

from radixserve.kernels._triton import check_launch_device, next_power_of_2, tl, triton


def segments_from_token_slots(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-token slot ids [num_tokens] -> (seg_indptr [G+1] int32, seg_slots [G] int32, max_seg_len).

    Consecutive tokens with the same slot form one segment (slot -1 segments included;
    the kernels skip them).
    """
    assert token_slots.dim() == 1, f"token_slots must be [num_tokens], got {tuple(token_slots.shape)}"
    if token_slots.numel() == 0:
        z = torch.zeros(1, dtype=torch.int32, device=token_slots.device)
        return z, z[:0], 0
    slots, counts = torch.unique_consecutive(token_slots, return_counts=True)
    indptr = torch.zeros(len(counts) + 1, dtype=torch.int32, device=token_slots.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, slots.to(torch.int32), int(counts.max())


def _check_segments(num_tokens: int, seg_indptr: torch.Tensor, seg_slots: torch.Tensor, num_slots: int) -> None:
    assert seg_indptr.dim() == 1 and seg_slots.dim() == 1 and seg_indptr.numel() == seg_slots.numel() + 1, (
        f"seg_indptr must be [G+1] and seg_slots [G], got {tuple(seg_indptr.shape)} and {tuple(seg_slots.shape)}")
    assert seg_indptr.dtype == seg_slots.dtype == torch.int32, (
        f"segment tensors must be int32, got {seg_indptr.dtype} and {seg_slots.dtype}")
    if seg_slots.numel():
        ind = seg_indptr.tolist() if seg_indptr.device.type == "cpu" else None
        if ind is not None:
            assert ind[0] >= 0 and ind[-1] <= num_tokens and all(a <= b for a, b in zip(ind, ind[1:])), (
                f"seg_indptr must be non-decreasing within [0, {num_tokens}], got {ind}")
            slots = seg_slots.tolist()
            assert all(-1 <= s < num_slots for s in slots), f"slots must be in [-1, {num_slots}), got {slots}"


def _check_shrink(x, lora_a, seg_indptr, seg_slots) -> None:
    assert x.dim() == 2, f"x must be [num_tokens, in], got {tuple(x.shape)}"
    assert lora_a.dim() == 3, f"lora_a must be [num_slots, rank, in], got {tuple(lora_a.shape)}"
    assert lora_a.shape[2] == x.shape[1], f"lora_a in-features {lora_a.shape[2]} != x's {x.shape[1]}"
    assert x.dtype == lora_a.dtype, f"x dtype {x.dtype} != lora_a dtype {lora_a.dtype}"
    _check_segments(x.shape[0], seg_indptr, seg_slots, lora_a.shape[0])


def _check_expand(y, xa, lora_b, seg_indptr, seg_slots, y_offset) -> None:
    assert y.dim() == 2 and xa.dim() == 2, f"y and xa must be 2-D, got {tuple(y.shape)} and {tuple(xa.shape)}"
    assert lora_b.dim() == 3, f"lora_b must be [num_slots, out, rank], got {tuple(lora_b.shape)}"
    assert xa.shape[0] == y.shape[0], f"xa rows {xa.shape[0]} != y rows {y.shape[0]}"
    assert xa.shape[1] == lora_b.shape[2], f"xa rank {xa.shape[1]} != lora_b rank {lora_b.shape[2]}"
    assert xa.dtype == torch.float32, f"xa must be float32 (the shrink output), got {xa.dtype}"
    assert 0 <= y_offset and y_offset + lora_b.shape[1] <= y.shape[1], (
        f"columns [{y_offset}, {y_offset + lora_b.shape[1]}) fall outside y's {y.shape[1]}")
    _check_segments(y.shape[0], seg_indptr, seg_slots, lora_b.shape[0])


# ----------------------------------------------------------------------------- references

def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, seg_indptr: torch.Tensor,
                    seg_slots: torch.Tensor) -> torch.Tensor:
    """xa [num_tokens, rank] fp32; rows of base-model (slot -1) segments are zero."""
    _check_shrink(x, lora_a, seg_indptr, seg_slots)
    return shrink_segments(x, lora_a, seg_indptr.tolist(), seg_slots.tolist())


def lora_expand_ref(y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, seg_indptr: torch.Tensor,
                    seg_slots: torch.Tensor, y_offset: int = 0) -> None:
    """y[rows, y_offset:y_offset+out] += xa[rows] @ B[slot]^T per segment (in place)."""
    _check_expand(y, xa, lora_b, seg_indptr, seg_slots, y_offset)
    expand_segments(y, xa, lora_b, seg_indptr.tolist(), seg_slots.tolist(), y_offset)


def shrink_segments(x: torch.Tensor, lora_a: torch.Tensor, indptr: list[int], slots: list[int]) -> torch.Tensor:
    """The reference's unchecked core, on host-side segment lists (the engine's CPU
    path calls it per layer; the segments were built and checked once per step)."""
    if len(slots) == 1 and slots[0] >= 0 and indptr[0] == 0 and indptr[1] == x.shape[0]:
        return (x @ lora_a[slots[0]].T).float()  # one adapter for the whole batch
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for g, slot in enumerate(slots):
        a, b = indptr[g], indptr[g + 1]
        if slot >= 0 and a < b:
            out[a:b] = (x[a:b] @ lora_a[slot].T).float()  # [rows, in] @ [in, rank]
    return out


def expand_segments(y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, indptr: list[int],
                    slots: list[int], y_offset: int = 0) -> None:
    """Unchecked core of `lora_expand_ref` (see `shrink_segments`)."""
    n = lora_b.shape[1]
    fused = y.dtype == lora_b.dtype == torch.float32  # fp32: accumulate straight into y
    for g, slot in enumerate(slots):
        a, b = indptr[g], indptr[g + 1]
        if slot < 0 or a == b:
            continue
        if fused:
            y[a:b, y_offset:y_offset + n].addmm_(xa[a:b], lora_b[slot].T)
        else:
            delta = xa[a:b] @ lora_b[slot].float().T  # [rows, rank] @ [rank, out], fp32
            y[a:b, y_offset:y_offset + n] += delta.to(y.dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, indptr_ptr, slots_ptr,
    N, K,
    stride_xt, stride_as, stride_an, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (segment, row tile within the segment, rank tile)
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    row0 = start + tl.program_id(1) * BLOCK_M
    if (slot < 0) | (row0 >= end):
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < end
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + (k0 + ks)[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)            # [BLOCK_M, BLOCK_K]
        at = tl.load(a_base + cols[None, :] * stride_an + (k0 + ks)[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)            # [BLOCK_K, BLOCK_N]
        acc += tl.dot(xt, at)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_ot + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr, xa_ptr, b_ptr, indptr_ptr, slots_ptr,
    N, R, y_offset,
    stride_yt, stride_xat, stride_bs, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    row0 = start + tl.program_id(1) * BLOCK_M
    if (slot < 0) | (row0 >= end):
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    row_ok = rows < end
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rs) < R
        xt = tl.load(xa_ptr + rows[:, None].to(tl.int64) * stride_xat + (r0 + rs)[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)            # [BLOCK_M, BLOCK_R] fp32
        bt = tl.load(b_base + cols[None, :] * stride_bn + (r0 + rs)[:, None],
                     mask=col_ok[None, :] & r_ok[:, None], other=0.0)            # [BLOCK_R, BLOCK_N]
        acc += tl.dot(xt, bt.to(tl.float32))
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yt + (y_offset + cols)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    cur = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (cur.to(tl.float32) + acc).to(cur.dtype), mask=mask)


def _tile_m(max_seg_len: int) -> int:
    return 16 if max_seg_len <= 16 else 64


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int) -> torch.Tensor:
    """Triton version of `lora_shrink_ref` (rows of skipped segments are zero too)."""
    _check_shrink(x, lora_a, seg_indptr, seg_slots)
    check_launch_device(_lora_shrink_kernel, x, lora_a, seg_indptr, seg_slots)
    assert x.stride(1) == 1 and lora_a.stride(2) == 1, (
        f"x and lora_a must be contiguous in their last dim, got strides {x.stride()} and {lora_a.stride()}")
    num_tokens, k = x.shape
    n = lora_a.shape[1]
    out = torch.zeros(num_tokens, n, dtype=torch.float32, device=x.device)
    if seg_slots.numel() == 0 or max_seg_len == 0 or n == 0:
        return out
    block_m = _tile_m(max_seg_len)
    block_n = max(16, min(64, next_power_of_2(n)))
    block_k = max(16, min(64, next_power_of_2(k)))
    grid = (seg_slots.numel(), triton.cdiv(max_seg_len, block_m), triton.cdiv(n, block_n))
    _lora_shrink_kernel[grid](
        x, lora_a, out, seg_indptr, seg_slots, n, k,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def lora_expand(y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, max_seg_len: int, y_offset: int = 0) -> None:
    """Triton version of `lora_expand_ref`; adds into y in place."""
    _check_expand(y, xa, lora_b, seg_indptr, seg_slots, y_offset)
    check_launch_device(_lora_expand_kernel, y, xa, lora_b, seg_indptr, seg_slots)
    assert y.stride(1) == 1 and xa.stride(1) == 1 and lora_b.stride(2) == 1, (
        f"y, xa and lora_b must be contiguous in their last dim, got strides {y.stride()}, "
        f"{xa.stride()} and {lora_b.stride()}")
    n, r = lora_b.shape[1], lora_b.shape[2]
    if seg_slots.numel() == 0 or max_seg_len == 0 or n == 0:
        return
    block_m = _tile_m(max_seg_len)
    block_n = max(16, min(64, next_power_of_2(n)))
    block_r = max(16, min(64, next_power_of_2(r)))
    grid = (seg_slots.numel(), triton.cdiv(max_seg_len, block_m), triton.cdiv(n, block_n))
    _lora_expand_kernel[grid](
        y, xa, lora_b, seg_indptr, seg_slots, n, r, y_offset,
        y.stride(0), xa.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
