"""The batched multi-LoRA (SGMV) kernels vs their torch references, and the references
vs a naive per-token loop.

Without CUDA the Triton kernels run under the CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny. Segments mix adapters, the base model (slot -1),
empty segments and lengths that straddle the kernels' row tiles.
"""

from __future__ import annotations

import pytest
import torch

from radixserve.kernels.lora_matmul import lora_expand_ref, lora_shrink_ref, segments_from_token_slots
from tests.cpu.kernel_cases import TOL, make_case


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def naive(x, a, b, token_slots):
    """Per token: (x A^T) B^T of its slot, zero for the base model."""
    rows = []
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            rows.append(torch.zeros(b.shape[1], dtype=torch.float64))
        else:
            rows.append((x[t].double() @ a[s].double().T) @ b[s].double().T)
    return torch.stack(rows) if rows else torch.zeros(0, b.shape[1], dtype=torch.float64)


CASES = {
    "decode_mixed": ([1, 1, 1, 1, 1], [0, 2, -1, 1, 2]),
    "prefill_long": ([37, 20], [1, 0]),
    "base_between": ([5, 3, 19, 0, 9], [0, -1, 2, 1, -1]),
    "all_base": ([4, 4], [-1, -1]),
    "one_adapter": ([12], [1]),  # the whole batch on one adapter (the reference's fast path)
}


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive(case):
    lens, slots = CASES[case]
    x, a, b, indptr, seg, token_slots, _ = make_case(lens, slots, 3, 24, 8, 20, torch.float32, "cpu")
    xa = lora_shrink_ref(x, a, indptr, seg)
    y = torch.randn(x.shape[0], 30)
    y0 = y.clone()
    lora_expand_ref(y, xa, b, indptr, seg, y_offset=7)
    torch.testing.assert_close((y - y0)[:, 7:27].double(), naive(x, a, b, token_slots), atol=1e-4, rtol=1e-4)
    assert torch.equal(y[:, :7], y0[:, :7]) and torch.equal(y[:, 27:], y0[:, 27:])  # other columns untouched


def test_segments_from_token_slots():
    indptr, slots, longest = segments_from_token_slots(torch.tensor([2, 2, -1, -1, -1, 0, 2]))
    assert indptr.tolist() == [0, 2, 5, 6, 7] and slots.tolist() == [2, -1, 0, 2] and longest == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["decode_mixed", "prefill_long", "base_between"])
def test_triton_matches_reference(case, dtype):
    from radixserve.kernels.lora_matmul import lora_expand, lora_shrink
    lens, slots = CASES[case]
    dev = _device()
    if dtype == torch.bfloat16 and dev == "cpu":
        # triton-lang/triton#11584: the interpreter multiplies the raw bf16 bit patterns in tl.dot.
        pytest.skip("Triton interpreter does not support bf16 tl.dot (covered on GPU)")
    # in=40 and rank=8 / out=24 are not multiples of the 16-wide tiles: masks are exercised.
    x, a, b, indptr, seg, _, longest = make_case(lens, slots, 3, 40, 8, 24, dtype, dev)
    xa_ref = lora_shrink_ref(x, a, indptr, seg)
    xa = lora_shrink(x, a, indptr, seg, longest)
    torch.testing.assert_close(xa, xa_ref, **TOL[dtype])
    y_ref = torch.randn(x.shape[0], 50, device=dev).to(dtype)
    y = y_ref.clone()
    lora_expand_ref(y_ref, xa_ref, b, indptr, seg, y_offset=13)
    lora_expand(y, xa_ref, b, indptr, seg, longest, y_offset=13)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


def test_triton_fused_subprojections_with_column_views():
    """A fused q/k/v-style layer: one shrink over stacked A, one expand per sub-projection
    reading a column slice of xa and writing its own column range of y."""
    from radixserve.engine.lora.layers import LoRABatch, LoRAContext, LoRALinear, TorchLoRAOps, TritonLoRAOps
    gen = torch.Generator().manual_seed(1)
    dev = _device()
    outs = [32, 16, 16]
    layers = {}
    for name, ops in (("torch", TorchLoRAOps()), ("triton", TritonLoRAOps())):
        ctx = LoRAContext(ops)
        layers[name] = (ctx, LoRALinear(ctx, ("q", "k", "v"), 24, outs, 3, 8, torch.float32, torch.device(dev)))
    g2 = torch.Generator().manual_seed(2)
    for slot in range(3):
        weights = [(torch.randn(r, 24, generator=g2).to(dev), torch.randn(o, r, generator=g2).to(dev))
                   if (slot, j) != (1, 1) else None  # slot 1 has no k: stays zero
                   for j, (o, r) in enumerate(zip(outs, (8, 4, 6)))]
        for _, layer in layers.values():
            layer.set_slot(slot, weights)
    x = torch.randn(23, 24, generator=gen).to(dev)
    batch = LoRABatch(torch.tensor([0, 3, 10, 11, 23], dtype=torch.int32, device=dev),
                      torch.tensor([2, -1, 0, 1], dtype=torch.int32, device=dev), 12, frozenset({0, 1, 2}),
                      [0, 3, 10, 11, 23], [2, -1, 0, 1])
    ys = {}
    for name, (ctx, layer) in layers.items():
        ctx.batch = batch
        ys[name] = layer(x, torch.zeros(23, 64, device=dev))
    torch.testing.assert_close(ys["triton"], ys["torch"], atol=1e-4, rtol=1e-4)
    assert ys["torch"][3:10].abs().max() == 0 and ys["torch"][11:, 32:48].abs().max() == 0  # base; slot 1's k


def test_launchers_reject_bad_arguments():
    from radixserve.kernels.lora_matmul import lora_shrink
    x, a, b, indptr, seg, _, longest = make_case([4], [0], 1, 16, 8, 16, torch.float32, _device())
    with pytest.raises(AssertionError, match="int32"):
        lora_shrink(x, a, indptr.long(), seg, longest)
    with pytest.raises(AssertionError, match="in-features"):
        lora_shrink(x[:, :8].contiguous(), a, indptr, seg, longest)
    x, a, b, indptr, seg, _, _ = make_case([4], [0], 1, 16, 8, 16, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="slots must be in"):
        lora_shrink_ref(x, a, indptr, torch.tensor([5], dtype=torch.int32))
    with pytest.raises(AssertionError, match="float32"):
        lora_expand_ref(torch.zeros(4, 16), torch.zeros(4, 8, dtype=torch.float64), b, indptr, seg)
