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


def pytest_addoption(parser):
    # Issue 19 asks for 20 kills per variant; CI runs a few (the suite's time budget).
    parser.addoption("--tp-kills", type=int, default=1,
                     help="worker kills per variant in tests/cpu/test_tp_restart.py (20 for the full run)")
