"""radixserve engine: one replica's paged-KV inference engine with a radix prefix cache.

Imports neither ray nor fastapi; the cluster layer builds on ``AsyncLLMEngine``.
Names are resolved lazily so that light submodules (``radixserve.engine.cache.hashing``,
used by the router) do not pull in torch and the model code.

Sub-packages: ``core`` (engine loop, scheduler, sequences, output processing,
metrics), ``cache`` (block pool, radix tree, CPU tier, transfers), ``worker``
(one TP rank: model runner, attention, sampler), ``executor`` (launching
workers and the wire between them), ``entrypoints`` (``LLM``,
``AsyncLLMEngine``, outputs), ``model`` and ``lora``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AsyncLLMEngine": "radixserve.engine.entrypoints.async_engine",
    "CacheConfig": "radixserve.engine.config",
    "EngineConfig": "radixserve.engine.config",
    "ModelConfig": "radixserve.engine.config",
    "ParallelConfig": "radixserve.engine.config",
    "SchedulerConfig": "radixserve.engine.config",
    "LoRAConfig": "radixserve.engine.config",
    "LLM": "radixserve.engine.entrypoints.llm",
    "engine_config": "radixserve.engine.entrypoints.llm",
    "LLMEngine": "radixserve.engine.core.llm_engine",
    "LoRARequest": "radixserve.engine.lora.request",
    "CompletionOutput": "radixserve.engine.entrypoints.outputs",
    "Logprob": "radixserve.engine.entrypoints.outputs",
    "RequestMetrics": "radixserve.engine.entrypoints.outputs",
    "RequestOutput": "radixserve.engine.entrypoints.outputs",
    "SamplingParams": "radixserve.engine.sampling_params",
    "StructuredOutputsParams": "radixserve.engine.structured.params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'radixserve.engine' has no attribute {name!r}")
