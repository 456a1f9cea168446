"""What the OpenAI HTTP layer needs from whatever serves the model.

``Backend`` is the seam between ``cluster.openai_api.app`` (HTTP, validation,
response shapes) and the thing that runs requests: ``LocalBackend`` wraps one
in-process ``AsyncLLMEngine``; the Ray Serve ingress provides another that
routes to replicas. Nothing here imports ray or fastapi.

Contract of ``Backend.generate``:
  * an invalid request raises ``ValueError`` (or a subclass), either from the
    call itself or from the stream's first ``__anext__``; the app turns it
    into a 400, so the message must be fit for the client;
  * ``BackendUnavailableError`` means "no engine can take this now" (503);
  * the stream yields cumulative ``RequestOutput``s, the last with
    ``finished=True``; ``aclose()`` before that aborts the request and frees
    its KV blocks. ``aclose()`` is idempotent;
  * the app reads ``stream.replica_id`` only after the first output has
    arrived, so a routed stream may fill it in from its first item.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from radixserve.engine.entrypoints.async_engine import AsyncLLMEngine, EngineDeadError
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.lora.request import LoRARequest
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.tokenizer import Tokenizer

LOCAL_REPLICA_ID = "local"


class BackendUnavailableError(RuntimeError):
    """No engine can serve the request now (dead engine, no healthy replica)."""


class GenerationStream(ABC):
    """Cumulative outputs of one request, and the replica that serves it."""

    replica_id: str

    def __aiter__(self) -> GenerationStream:
        return self

    @abstractmethod
    async def __anext__(self) -> RequestOutput: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Abort the request if it has not finished; safe to call twice."""


class Backend(ABC):
    """One served model (plus, later, its LoRA adapters)."""

    @property
    @abstractmethod
    def tokenizer(self) -> Tokenizer: ...

    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abstractmethod
    def block_size(self) -> int: ...

    @property
    @abstractmethod
    def model_name(self) -> str: ...

    def model_names(self) -> list[str]:
        """Every model name this backend serves: the base model first, then
        adapters (a backend with LoRA support overrides this)."""
        return [self.model_name]

    @property
    def default_sampling(self) -> Mapping[str, Any]:
        """Sampling defaults for fields a request leaves unset (the model's generation_config.json)."""
        return {}

    @property
    def max_num_seqs(self) -> int | None:
        """Most sequences one request may ask for (n / best_of): the engine's max_num_seqs."""
        return None

    @property
    def model_root(self) -> str:
        """Where the model lives (its local HF directory): /v1/models reports it as ``root``."""
        return self.model_name

    @abstractmethod
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       namespace: tuple[str, ...], prompt_text: str | None,
                       lora: str | None = None) -> GenerationStream:
        """``lora`` names a loaded adapter to run the request on (None: the base model)."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Load (or reload) a LoRA adapter everywhere; ValueError for a bad one."""
        raise ValueError("this server does not serve LoRA adapters (start it with enable_lora)")

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter; KeyError if it is not loaded."""
        raise KeyError(name)

    @abstractmethod
    async def metrics_text(self) -> str:
        """Prometheus text exposition."""

    @abstractmethod
    async def health(self) -> bool:
        """Whether requests can be served; called once per generation request,
        so it must be cheap (a cached flag in a distributed backend)."""


class _LocalStream(GenerationStream):
    def __init__(self, agen: AsyncIterator[RequestOutput]):
        self._agen = agen
        self.replica_id = LOCAL_REPLICA_ID

    async def __anext__(self) -> RequestOutput:
        try:
            return await self._agen.__anext__()
        except EngineDeadError as exc:
            raise BackendUnavailableError(str(exc)) from exc

    async def aclose(self) -> None:
        # Closing the engine's async generator posts the abort (its finally).
        await self._agen.aclose()


class LocalBackend(Backend):
    """One in-process AsyncLLMEngine (tests, single-process serving)."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str | None = None):
        self.engine = engine
        self._model_name = model_name or engine.engine.config.model.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def default_sampling(self) -> Mapping[str, Any]:
        return self.engine.engine.default_sampling

    @property
    def model_root(self) -> str:
        return str(self.engine.engine.model_dir)

    @property
    def max_num_seqs(self) -> int | None:
        return self.engine.engine.config.scheduler.max_num_seqs

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def block_size(self) -> int:
        return self.engine.engine.block_size

    @property
    def model_name(self) -> str:
        return self._model_name

    def model_names(self) -> list[str]:
        lora = self.engine.engine.lora
        return [self.model_name] + (sorted(lora.adapters) if lora is not None else [])

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str,
                       namespace: tuple[str, ...], prompt_text: str | None,
                       lora: str | None = None) -> GenerationStream:
        if not self.engine.is_healthy():
            raise BackendUnavailableError("the engine is not healthy")
        agen = self.engine.generate(prompt_text, params, request_id,
                                    prompt_token_ids=list(prompt_token_ids), namespace=namespace,
                                    lora_request=LoRARequest(lora) if lora else None)
        return _LocalStream(agen)

    async def load_adapter(self, name: str, path: str) -> None:
        await self.engine.load_lora(LoRARequest(name, path))

    async def unload_adapter(self, name: str) -> None:
        if self.engine.engine.lora is None or name not in self.engine.engine.lora.adapters:
            raise KeyError(name)
        await self.engine.unload_lora(name)

    async def metrics_text(self) -> str:
        # EngineMetrics is lock-protected, so reading it off the engine thread is safe.
        return self.engine.engine.metrics.render()

    async def health(self) -> bool:
        return self.engine.is_healthy()
