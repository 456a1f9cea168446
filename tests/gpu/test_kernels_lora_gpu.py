"""The SGMV LoRA kernels vs their torch references at real shapes on CUDA (skipped elsewhere).

Shapes of a Llama-3-8B layer (hidden 4096, q/o 4096, k/v 1024, MLP 14336), 8 adapter
slots of rank 16 and 64, a step of mixed decodes (one token per adapter, base tokens
in between) and long prefill segments.
"""

from __future__ import annotations

import pytest
import torch

from radixserve.kernels.lora_matmul import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref
from tests.cpu.kernel_cases import TOL, make_case


def _compiled_kernels_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from radixserve.kernels._triton import is_interpreted
    from radixserve.kernels.lora_matmul import _lora_shrink_kernel
    return not is_interpreted(_lora_shrink_kernel)


pytestmark = pytest.mark.skipif(not _compiled_kernels_available(),
                                reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET unset)")

DECODE = ([1] * 64, [i % 9 - 1 for i in range(64)])  # slots -1..7, base model among them
PREFILL = ([1000, 17, 512, 2048, 3], [0, -1, 3, 7, 5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("batch", ["decode", "prefill"])
def test_shrink_expand_real_shapes(batch, shape, rank, dtype):
    lens, slots = DECODE if batch == "decode" else PREFILL
    k, n = shape
    x, a, b, indptr, seg, _, longest = make_case(lens, slots, 8, k, rank, n, dtype, "cuda")
    xa_ref = lora_shrink_ref(x, a, indptr, seg)
    xa = lora_shrink(x, a, indptr, seg, longest)
    torch.testing.assert_close(xa, xa_ref, **TOL[dtype])
    y_ref = torch.randn(x.shape[0], n + 64, device="cuda").to(dtype)
    y = y_ref.clone()
    lora_expand_ref(y_ref, xa_ref, b, indptr, seg, y_offset=64)
    lora_expand(y, xa_ref, b, indptr, seg, longest, y_offset=64)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
