"""Shared pytest setup for every test directory.

It exists for one reason: the Triton CPU interpreter is chosen when a kernel is
decorated (``triton.jit`` reads TRITON_INTERPRET as ``kernels.*`` is imported), so the
variable must be set before any test module imports the kernels. Without CUDA we set
TRITON_INTERPRET=1 so the real Triton kernels run on CPU tensors (slowly: tiny shapes);
with CUDA we leave it alone so the GPU tests compile and run the real kernels.
Importing torch first is safe: neither ``import torch`` nor
``torch.cuda.is_available()`` imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
