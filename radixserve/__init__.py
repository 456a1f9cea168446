"""radixserve: a prefix-caching, tensor-parallel LLM serving cluster on torch and Ray.

The front door: ``from radixserve import LLM, SamplingParams``. The parts are
``radixserve.engine`` (one replica; no ray), ``radixserve.kernels`` (Triton
kernels beside their torch references) and ``radixserve.cluster`` (Ray Serve
ingress, router, replicas, batch job). Names resolve lazily, so importing the
package costs nothing until one is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "radixserve.engine.entrypoints.llm",
    "SamplingParams": "radixserve.engine.sampling_params",
    "StructuredOutputsParams": "radixserve.engine.structured.params",
    "AsyncLLMEngine": "radixserve.engine.entrypoints.async_engine",
    "LoRARequest": "radixserve.engine.lora.request",
    "RequestOutput": "radixserve.engine.entrypoints.outputs",
    "CompletionOutput": "radixserve.engine.entrypoints.outputs",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'radixserve' has no attribute {name!r}")
