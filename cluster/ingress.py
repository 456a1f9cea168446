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

from radixserve.cluster.backend import Backend, BackendUnavailableError, GenerationStream
from radixserve.cluster.metadata import get_metadata_actor
from radixserve.cluster.metrics_merge import merge as merge_metrics
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.cluster.replica_wire import GenerateRequest, ReplicaInfo, decode_info, decode_item, encode_request
from radixserve.engine.cache.hashing import cache_namespace, prompt_block_hashes
from radixserve.engine.config import ModelConfig
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.lora.adapter import read_adapter
from radixserve.engine.lora.manager import adapter_namespace
from radixserve.engine.model.default_models import resolve_model
from radixserve.engine.model.hf_config import generation_defaults, load_arch_config
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.tokenizer import Tokenizer, load_tokenizer

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
    def __init__(self, handle, info: ReplicaInfo, tokenizer: Tokenizer, model_name: str,
                 lora_reader=None, default_sampling: dict | None = None, model_root: str | None = None):
        """``lora_reader(path)`` validates an adapter directory and returns its
        content hash (None: the replicas serve no LoRA)."""
        self._default_sampling = dict(default_sampling or {})
        self._model_root = model_root or model_name
        self._handle = handle.options(stream=True)
        self._info = info
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._lora_reader = lora_reader
        self._app_name = serve.get_replica_context().app_name
        self._adapters: dict[str, str] = {}  # name -> namespace, refreshed with health()
        self._healthy_at = 0.0
        self._healthy = True

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def default_sampling(self) -> dict:
        return self._default_sampling

    @property
    def model_root(self) -> str:
        return self._model_root

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def max_num_seqs(self) -> int | None:
        return self._info.max_num_seqs

    @property
    def block_size(self) -> int:
        return self._info.block_size

    @property
    def model_name(self) -> str:
        return self._model_name

    def model_names(self) -> list[str]:
        return [self._model_name] + sorted(self._adapters)

    async def generate(self, prompt_token_ids, params: SamplingParams, request_id: str,
                       namespace: tuple[str, ...], prompt_text: str | None,
                       lora: str | None = None) -> GenerationStream:
        ids = list(prompt_token_ids)
        engine_ns = cache_namespace(self._adapters[lora] if lora else None, namespace)  # as the engine will
        payload = encode_request(GenerateRequest(
            request_id, ids, prompt_text, params, list(namespace),
            prompt_block_hashes(ids, self.block_size, engine_ns), lora))
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

    async def load_adapter(self, name: str, path: str) -> None:
        """Validate here, publish in the registry, wait until every replica has it."""
        if self._lora_reader is None:
            raise ValueError("this cluster serves no LoRA adapters; deploy it with enable_lora: true")
        content_hash = await asyncio.to_thread(self._lora_reader, path)
        namespace = adapter_namespace(name, content_hash)
        actor = get_metadata_actor(self._app_name)
        await actor.set_adapter.remote(name, path, namespace)
        await self._await_replicas(actor, name, lambda st: st == namespace, f"loading {name!r}")
        self._adapters[name] = namespace

    async def unload_adapter(self, name: str) -> None:
        actor = get_metadata_actor(self._app_name)
        if not await actor.remove_adapter.remote(name):
            raise KeyError(name)
        self._adapters.pop(name, None)
        await self._await_replicas(actor, name, lambda st: st is None, f"unloading {name!r}")

    @staticmethod
    async def _await_replicas(actor, name: str, done, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            status = await actor.adapter_status.remote(name)
            errors = [s for s in status.values() if isinstance(s, str) and s.startswith("error: ")]
            if errors:
                raise ValueError(errors[0][len("error: "):])
            if status and all(done(s) for s in status.values()):
                return
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"replicas did not finish {what} in {timeout_s:.0f}s")
            await asyncio.sleep(0.1)

    async def metrics_text(self) -> str:
        actor = get_metadata_actor(self._app_name)
        replicas, routers = await actor.metrics.remote()
        # One header per family, every replica's samples under it (valid Prometheus text).
        # A router's lines about a replica that is gone are left out (live = what the actor holds).
        return merge_metrics([(f'replica="{rid}"', text) for rid, text in sorted(replicas.items())]
                             + [("", text) for _, text in sorted(routers.items())], live_replicas=set(replicas))

    async def health(self) -> bool:
        now = time.monotonic()
        if now - self._healthy_at > _HEALTH_TTL_S:  # cheap: refreshed at most every 2 s
            self._healthy_at = now
            try:
                actor = get_metadata_actor(self._app_name)
                self._healthy = bool(await actor.replica_ids.remote())
                if self._lora_reader is not None:
                    self._adapters = await actor.adapters.remote()
            except Exception:
                self._healthy = False
        return self._healthy



@serve.ingress()
class OpenAIIngress:
    async def __init__(self, llm_handle, model: dict, server: dict | None = None,
                       max_lora_rank: int | None = None):
        """``model``: the engine's ModelConfig fields, so the ingress tokenizes exactly as the
        replicas do; ``max_lora_rank`` set: the replicas serve LoRA adapters (validated here first)."""
        mcfg = ModelConfig(**model)
        model_dir = resolve_model(mcfg.model, mcfg.cache_dir, mcfg.revision)
        self.tokenizer = load_tokenizer(mcfg, model_dir)
        info = decode_info(await llm_handle.get_info.remote())
        self.config = ServerConfig(**(server or {}))
        reader = None
        if max_lora_rank is not None:
            arch = load_arch_config(model_dir)
            reader = lambda path: read_adapter(path, arch, max_lora_rank).content_hash  # noqa: E731
        self.backend = ClusterBackend(llm_handle, info, self.tokenizer, mcfg.model, reader,
                                      generation_defaults(model_dir, mcfg.generation_config), str(model_dir))

    def __serve_build_asgi_app__(self):
        return build_app(self.backend, self.config)

    async def check_health(self) -> None:
        if not ray.is_initialized():
            raise RuntimeError("ray is not initialised")
