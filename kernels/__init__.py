"""Triton kernels, each beside the plain-torch reference it must match.

Imports only torch (and triton, lazily, inside the kernel modules). Deliberately
has no ``__version__``: transformers probes for an optional package that is also
named ``kernels`` and must not mistake this one for it.
"""
