"""radixserve engine: one replica's paged-KV inference engine with a radix prefix cache.

Imports neither ray nor fastapi; the cluster layer builds on ``AsyncLLMEngine``.
Names are resolved lazily so that light submodules (``engine.cache.hashing``,
used by the router) do not pull in torch and the model code.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AsyncLLMEngine": "engine.async_engine",
    "CacheConfig": "engine.config",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "ParallelConfig": "engine.config",
    "SchedulerConfig": "engine.config",
    "LLM": "engine.llm",
    "engine_config": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "LoRAConfig": "engine.config",
    "LoRARequest": "engine.lora.request",
    "CompletionOutput": "engine.outputs",
    "Logprob": "engine.outputs",
    "RequestMetrics": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
