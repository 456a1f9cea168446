"""Optional Triton import shared by the kernel modules.

The kernel modules define their ``@triton.jit`` functions at import time, yet
the plain-torch references beside them must stay importable on CPU-only
installs without triton (the engine's CPU path runs the references). When
triton is missing, ``triton.jit`` here returns a stub that raises on launch and
``tl.constexpr`` is a placeholder, so the kernel definitions still parse.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: references work, Triton launchers raise.
    HAS_TRITON = False

    class _UnavailableKernel:
        """Stands in for a jitted kernel; launching it explains what is missing."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise ImportError(f"triton is not installed; cannot launch {self.fn.__name__} "
                              "(use the *_ref torch reference instead)")

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _UnavailableKernel(fn) if fn is not None else _UnavailableKernel

    class _MissingLanguage:
        constexpr = object  # only ever used as a parameter annotation

    triton = _MissingTriton()
    tl = _MissingLanguage()


def is_interpreted(kernel) -> bool:
    """True when `kernel` runs under the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_launch_device(kernel, *tensors: torch.Tensor) -> torch.device:
    """Assert all tensors share one device that `kernel` can run on; return it.

    Compiled kernels need CUDA (or ROCm) tensors; the interpreter runs on CPU tensors.
    """
    if not HAS_TRITON:
        raise ImportError("triton is not installed; use the *_ref torch reference instead")
    device = tensors[0].device
    for t in tensors[1:]:
        assert t.device == device, f"all tensors must be on one device, got {device} and {t.device}"
    if is_interpreted(kernel):
        assert device.type == "cpu", f"under TRITON_INTERPRET=1 tensors must be on cpu, got {device}"
    else:
        assert device.type == "cuda", f"Triton kernels need cuda tensors, got {device}"
    return device


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
