"""The Ray Serve ingress: the OpenAI-compatible app over a handle to the LLM replicas.

The ingress tokenizes, computes the prompt's block hashes in the request's
namespace (tenant, cache salt) exactly as the engine will, and sends both in
one msgpack payload; the deployment's PrefixAffinityRouter reads the hashes
to pick the replica. A request whose replica died before its first output is
retried on another (bounded); /metrics merges every replica's engine metrics
and every router's decisions, as published to the metadata actor.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from cluster.backend import Backend, BackendUnavailableError, GenerationStream
from cluster.metadata import get_metadata_actor
from cluster.openai_app import ServerConfig, build_app
from cluster.protocol_wire import GenerateRequest, decode_item, encode_request
from engine.cache.hashing import prompt_block_hashes
from engine.model.default_models import resolve_model
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_RETRIES = 3  # attempts for a request whose replica vanished before answering
_HEALTH_TTL_S = 2.0


def _unwrap(exc: BaseException) -> BaseException:
    """A replica's ValueError (bad request) arrives wrapped by Ray: unwrap it for a 400."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and isinstance(cause, ValueError):
        return cause
    return exc


class ClusterStream(GenerationStream):
    def __init__(self, response, first: RequestOutput, replica_id: str):
        self._response = response
        self._first: RequestOutput | None = first
        self.replica_id = replica_id

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            out, self._first = self._first, None
            return out
        try:
            item = decode_item(await self._response.__anext__())
        except StopAsyncIteration:
            raise
        except Exception as exc:
            raise _unwrap(exc) from exc
        return item.output

    async def aclose(self) -> None:
        self._response.cancel()  # the replica's generator is cancelled: the engine aborts


class ClusterBackend(Backend):
    def __init__(self, handle, info: dict, tokenizer: Tokenizer, model_name: str):
        self._handle = handle.options(stream=True)
        self._info = info
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._healthy_at = 0.0
        self._healthy = True

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._info["max_model_len"]

    @property
    def block_size(self) -> int:
        return self._info["block_size"]

    @property
    def model_name(self) -> str:
        return self._model_name

    async def generate(self, prompt_token_ids, params: SamplingParams, request_id: str,
                       namespace: tuple[str, ...], prompt_text: str | None) -> GenerationStream:
        ids = list(prompt_token_ids)
        payload = encode_request(GenerateRequest(
            request_id, ids, prompt_text, params.to_wire(), list(namespace),
            prompt_block_hashes(ids, self.block_size, namespace)))
        last: BaseException | None = None
        for attempt in range(_RETRIES):
            response = self._handle.generate.remote(payload)
            try:
                item = decode_item(await response.__anext__())
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                last = exc  # the replica went away before answering: try another
                log.warning("replica failed before the first output (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except Exception as exc:
                raise _unwrap(exc) from exc
            return ClusterStream(response, item.output, item.replica_id)
        raise BackendUnavailableError(f"no replica could serve the request: {last}")

    async def metrics_text(self) -> str:
        actor = get_metadata_actor()
        replicas, routers = await actor.metrics.remote()
        parts = []
        for rid, text in sorted(replicas.items()):
            parts.append(_label(text, f'replica="{rid}"'))
        parts += [text for _, text in sorted(routers.items())]
        return "".join(parts)

    async def health(self) -> bool:
        now = time.monotonic()
        if now - self._healthy_at > _HEALTH_TTL_S:  # cheap: refreshed at most every 2 s
            self._healthy_at = now
            try:
                self._healthy = bool(await get_metadata_actor().replica_ids.remote())
            except Exception:
                self._healthy = False
        return self._healthy


def _label(text: str, label: str) -> str:
    """Add a label to every sample line of an engine's Prometheus text."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
        elif "{" in line:
            name, rest = line.split("{", 1)
            out.append(f"{name}{{{label},{rest}")
        else:
            name, value = line.rsplit(" ", 1)
            out.append(f"{name}{{{label}}} {value}")
    return "\n".join(out) + "\n"


@serve.ingress()
class OpenAIIngress:
    async def __init__(self, llm_handle, model: str, cache_dir: str | None = None,
                       server: dict | None = None):
        model_dir = resolve_model(model, cache_dir)
        self.tokenizer = Tokenizer(model_dir)
        info = await llm_handle.get_info.remote()
        self.config = ServerConfig(**(server or {}))
        name = self.config.served_model_name or model
        self.backend = ClusterBackend(llm_handle, info, self.tokenizer, name)

    def __serve_build_asgi_app__(self):
        return build_app(self.backend, self.config)

    async def check_health(self) -> None:
        if not ray.is_initialized():
            raise RuntimeError("ray is not initialised")
