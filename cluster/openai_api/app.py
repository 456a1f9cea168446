"""The OpenAI-compatible FastAPI application, independent of Ray.

``build_app(backend, config)`` returns the app that single-process serving
runs under uvicorn and that the Ray Serve ingress serves. All state lives on
``app.state`` (``config``, ``backend``). Under Ray Serve, build the app in the
replica, after the backend exists: ``@serve.ingress()`` on a class whose
``__serve_build_asgi_app__(self)`` returns ``build_app(self.backend, config)``.
(``@serve.ingress(app)`` serves a pickled copy of ``app``, which a later
``attach_backend(app, ...)`` on the original would never reach.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve import __version__
from radixserve.cluster.backend import Backend
from radixserve.cluster.openai_api.adapters import AdapterOwners, allowed_lora_path, not_loaded, path_refused
from radixserve.cluster.openai_api.guards import BodyLimit, check_count, check_text_length, tenant_for_token
from radixserve.cluster.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    RequestError,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    chat_messages,
    chat_sampling_params,
    check_supported,
    completion_prompts,
    completion_sampling_params,
    resolve_max_tokens,
    valid_text,
)
from radixserve.cluster.openai_api.render import (
    ChatStreamer,
    CompletionStreamer,
    TokenText,
    chat_response,
    completion_response,
)
from radixserve.cluster.openai_api.responses import ResponseBuilder, ResponsesRequest, to_chat_request
from radixserve.cluster.openai_api.serving import (
    APIError,
    ClientDisconnected,
    Job,
    SSEResponse,
    backend_errors,
    for_client,
    open_streams,
    run_to_end,
    server_error,
    sse_events,
    unavailable,
    until_disconnect,
)
from radixserve.cluster.openai_api.structured import structured_params
from radixserve.cluster.openai_api.tools import (
    ToolChatStreamer,
    ToolPlan,
    apply_to_response,
    check_tool_parser,
    render_messages,
    tool_plan,
)
from radixserve.engine.cache.hashing import request_namespace
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.structured.params import StructuredOutputsParams
from radixserve.engine.tokenizer import Tokenizer

__all__ = ["ServerConfig", "attach_backend", "build_app"]

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-radixserve-replica"
REQUEST_ID_HEADER = "x-request-id"
_CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody reads it


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP layer behaves; validated at construction.

    served_model_name: the name (or names, the first reported) clients use for the base
        model (None: the backend's model_name), as vLLM's --served-model-name.
    api_keys: None for an open server, else API key -> tenant name; each tenant's
        requests hash their prompts in their own cache namespace.
    max_model_len: cap on prompt + completion tokens (None: the backend's; never above it).
    return_replica_header: send x-radixserve-replica with the replica that served the request.
    return_request_id_header: send x-request-id (the response id); Ray Serve's proxy adds
        its own x-request-id to every response, so behind Serve this may be turned off.
    disconnect_poll_s: how often a non-streaming request checks whether its client left.
    allowed_origins / allowed_methods / allowed_headers / allow_credentials: CORS, as vLLM's
        flags. No origin is allowed by default (the server binds loopback; a web page the
        user visits must not be able to call it); ``("*",)`` allows any.
    max_request_body_bytes: a larger body is a 413, refused before it is read in full.
    max_prompt_chars: a longer prompt text (or chat content, or /tokenize input) is a 400
        before it is tokenized; None: max_model_len x the tokenizer's longest token, the
        most characters that could ever fit.
    max_prompts_per_request: most prompts in one /v1/completions batch.
    max_stop_sequences: most entries in ``stop``, and in ``stop_token_ids``.
    metrics_api_key: the key /metrics asks for (its per-replica prefix-hit counters show
        other tenants' traffic); None: any API key, or none on an open server.
    allowed_lora_roots: directories runtime LoRA loads (/v1/load_lora_adapter) may read
        from, as vLLM's --allowed-local-media-path; empty (the default): runtime loading is
        off. Adapters given at startup (lora_modules) are not restricted.
    tool_call_parser: how tool_choice "auto" finds tool calls in the text (vLLM's
        --tool-call-parser); "hermes": <tool_call>{...}</tool_call>.
    """

    served_model_name: str | tuple[str, ...] | None = None
    api_keys: Mapping[str, str] | None = None
    max_model_len: int | None = None
    return_replica_header: bool = True
    return_request_id_header: bool = True
    disconnect_poll_s: float = 0.1
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    max_request_body_bytes: int = 8 * 2**20
    max_prompt_chars: int | None = None
    max_prompts_per_request: int = 256
    max_stop_sequences: int = 64
    metrics_api_key: str | None = None
    allowed_lora_roots: tuple[str, ...] = ()
    tool_call_parser: str = "hermes"  # how "auto" tool calls are read from the text (tools.TOOL_PARSERS)

    def __post_init__(self) -> None:
        check_tool_parser(self.tool_call_parser)
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        names = self.served_model_name
        if isinstance(names, (list, tuple)):
            object.__setattr__(self, "served_model_name", tuple(names) or None)
            names = self.served_model_name
        for name in (names,) if isinstance(names, str) else (names or ()):
            if not (isinstance(name, str) and name.strip()):
                raise ValueError(f"served_model_name must be non-empty strings, got {self.served_model_name!r}")
        if self.api_keys is not None:
            self._check_api_keys(self.api_keys)
            # A private copy, so the caller's dict can change without changing us; a
            # plain dict (not a MappingProxyType) so the config pickles into Ray Serve.
            object.__setattr__(self, "api_keys", dict(self.api_keys))
        if self.max_model_len is not None and not (type(self.max_model_len) is int and self.max_model_len >= 2):
            raise ValueError(f"max_model_len must be an int >= 2 or None, got {self.max_model_len!r}")
        if not (isinstance(self.disconnect_poll_s, (int, float)) and 0 < self.disconnect_poll_s <= 10):
            raise ValueError(f"disconnect_poll_s must be in (0, 10], got {self.disconnect_poll_s!r}")
        self._check_limits()

    def _check_limits(self) -> None:
        for name in ("max_request_body_bytes", "max_prompts_per_request", "max_stop_sequences", "max_prompt_chars"):
            value = getattr(self, name)
            if not (value is None and name == "max_prompt_chars") and not (type(value) is int and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        key = self.metrics_api_key
        if key is not None and not (isinstance(key, str) and key and key == key.strip() and " " not in key):
            raise ValueError("metrics_api_key must be a non-empty string without spaces")
        roots = self.allowed_lora_roots
        if isinstance(roots, str) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
            raise ValueError(f"allowed_lora_roots must be a list of absolute directories, got {roots!r}")
        # Resolved once, so a load is compared against the real directories (no symlink escapes).
        object.__setattr__(self, "allowed_lora_roots", tuple(os.path.realpath(r) for r in roots))

    def served_names(self) -> tuple[str, ...]:
        names = self.served_model_name
        return (names,) if isinstance(names, str) else (names or ())

    @staticmethod
    def _check_api_keys(keys: Mapping[str, str]) -> None:
        if not isinstance(keys, Mapping) or not keys:
            raise ValueError("api_keys must be a non-empty mapping of API key -> tenant (None for an open server)")
        for key, tenant in keys.items():
            if not isinstance(key, str) or not key or key != key.strip() or " " in key:
                raise ValueError("every API key must be a non-empty string without spaces")
            if not isinstance(tenant, str) or not tenant.strip():
                raise ValueError(f"the tenant of an API key must be a non-empty string, got {tenant!r}")


def build_app(backend: Backend | None, config: ServerConfig) -> FastAPI:
    """The app; with backend None, generation and /health answer 503 until attach_backend."""
    # /openapi.json is served by our own route, behind the API key (docs pages stay off).
    app = FastAPI(title="radixserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.backend = None
    app.state.lora_owners = AdapterOwners()  # who loaded which adapter at run time
    if backend is not None:
        attach_backend(app, backend)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_body_bytes)
    # Always installed (outermost, so a 413 carries CORS headers too), so a preflight OPTIONS
    # gets an answer (400 for an origin not allowed).
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                       allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                       allow_credentials=config.allow_credentials)
    _add_routes(app)
    return app


def attach_backend(app: FastAPI, backend: Backend) -> None:
    config: ServerConfig = app.state.config
    if config.max_model_len is not None and config.max_model_len > backend.max_model_len:
        raise ValueError(f"ServerConfig.max_model_len ({config.max_model_len}) exceeds the backend's "
                         f"max_model_len ({backend.max_model_len})")
    app.state.backend = backend


# -- errors ------------------------------------------------------------------------------------

def _error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body().model_dump(mode="json"), status_code=exc.status, headers=headers)


def _request_id(request: Request) -> str:
    """The id the handler gave this request (its response id), else a fresh one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = f"req-{uuid.uuid4().hex}"
    return rid


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status < 500:
        return _error_response(exc)
    # A server-side failure: the client gets a short message and the request id, the log the details.
    rid = _request_id(request)
    return _error_response(for_client(exc, rid), {REQUEST_ID_HEADER: rid})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Anything no other handler took: a 500 in the OpenAI shape, never a traceback."""
    rid = _request_id(request)
    log.error("request %s failed", rid, exc_info=exc)
    return _error_response(for_client(server_error("internal server error"), rid), {REQUEST_ID_HEADER: rid})


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, with the first problem spelled out."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _error_response(APIError(400, f"invalid JSON body: {first.get('msg', '')}"))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return _error_response(APIError(400, f"{where}: {first.get('msg', 'invalid value')}{more}",
                                    param=loc[0] if loc else None))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _error_response(APIError(exc.status_code, str(exc.detail), kind))


async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return _error_response(APIError(400, str(exc), param=exc.param, code=exc.code))


async def _client_gone(_: Request, __: ClientDisconnected) -> Response:
    return Response(status_code=_CLIENT_CLOSED)


# -- per-request helpers ------------------------------------------------------------------------

def _config(request: Request) -> ServerConfig:
    return request.app.state.config


def _backend(request: Request) -> Backend:
    backend = request.app.state.backend
    if backend is None:
        raise unavailable("the server is starting: no backend yet")
    return backend


async def tenant_of(request: Request) -> str | None:
    """The tenant of the request's API key; None on an open server."""
    keys = _config(request).api_keys
    if keys is None:
        return None
    return tenant_for_token(keys, request.headers.get("authorization", ""))


async def metrics_access(request: Request) -> None:
    """/metrics: the metrics key when one is set, else any API key (none on an open server)."""
    config = _config(request)
    if config.metrics_api_key is not None:
        tenant_for_token({config.metrics_api_key: "metrics"}, request.headers.get("authorization", ""))
    else:
        await tenant_of(request)


def _base_names(request: Request) -> tuple[str, ...]:
    """Every name of the base model, the reported one first."""
    return _config(request).served_names() or (_backend(request).model_name,)


def _base_name(request: Request) -> str:
    return _base_names(request)[0]


def _owners(request: Request) -> AdapterOwners:
    return request.app.state.lora_owners


def _resolve_model(request: Request, requested: str | None, tenant: str | None) -> tuple[str, str | None]:
    """(name to report, LoRA adapter or None); an unknown name (or another tenant's adapter) is a 404."""
    backend, names = _backend(request), _base_names(request)
    if requested is None or requested in (*names, backend.model_name):
        return names[0], None
    known = backend.model_names()
    if requested in known and _owners(request).visible(requested, tenant, known):
        return requested, requested
    raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")


def _max_model_len(request: Request) -> int:
    return _config(request).max_model_len or _backend(request).max_model_len


def _max_chars(request: Request) -> int:
    """Longest text that could fit in the context (ServerConfig.max_prompt_chars)."""
    config = _config(request)
    return config.max_prompt_chars or _max_model_len(request) * _backend(request).tokenizer.max_token_chars


def _check_length(request: Request, text: str, param: str) -> None:
    check_text_length(text, _max_chars(request), _max_model_len(request), param)


async def _require_healthy(backend: Backend) -> None:
    if not await backend.health():
        raise unavailable("the model backend is unhealthy")


def _headers(request: Request, rid: str, replicas: list[str]) -> dict[str, str]:
    config, headers = _config(request), {}
    if config.return_request_id_header:
        headers[REQUEST_ID_HEADER] = rid
    if config.return_replica_header:
        headers[REPLICA_HEADER] = ",".join(dict.fromkeys(replicas))  # unique, in prompt order
    return headers


async def _encode_chat(request: Request, messages: list[dict[str, str]], add_generation_prompt: bool,
                       template_kwargs: dict[str, Any] | None = None) -> tuple[list[int], str]:
    """Render and tokenize in a thread, so a long conversation never stalls the event loop;
    both are bounded by the cheap length checks first."""
    _check_length(request, "".join(m["content"] for m in messages), "messages")
    tok = _backend(request).tokenizer

    def work() -> tuple[list[int], str]:
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           **(template_kwargs or {}))
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise RequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        _check_length(request, text, "messages")
        # The template wrote BOS itself, so the tokenizer must not add another.
        return tok.encode(text, add_special_tokens=False), text
    return await asyncio.to_thread(work)


async def _encode_prompts(request: Request, prompts: list[str | list[int]]) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) per prompt; texts are length-checked, then tokenized in a thread."""
    for p in prompts:
        if isinstance(p, str):
            _check_length(request, p, "prompt")
    tok = _backend(request).tokenizer
    if all(not isinstance(p, str) for p in prompts):
        return [(list(p), None) for p in prompts]
    return await asyncio.to_thread(
        lambda: [(tok.encode(p), p) if isinstance(p, str) else (list(p), None) for p in prompts])


async def _completion_jobs(request: Request, body: CompletionRequest, rid: str,
                           namespace: tuple[str, ...], lora: str | None) -> list[Job]:
    tok, limit = _backend(request).tokenizer, _max_model_len(request)
    prompts = completion_prompts(body)
    check_count(prompts, _config(request).max_prompts_per_request, "prompt", "prompts")
    constraint = structured_params(body)
    jobs = []
    for i, (ids, text) in enumerate(await _encode_prompts(request, prompts)):
        if not ids or text == "":  # "" may still encode to a lone BOS
            raise RequestError("the prompt is empty", param="prompt")
        _check_vocab(tok, ids)
        max_tokens = resolve_max_tokens(_requested_max_tokens(request, body), len(ids), limit, "prompt")
        params = _fits(request, _constrained(
            completion_sampling_params(body, max_tokens, _backend(request).default_sampling), constraint))
        jobs.append(Job(ids, text, params, f"{rid}-{i}", namespace, lora))
    return jobs


def _requested_max_tokens(request: Request, body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """The request's own limit, else the model's generation_config max_new_tokens, else None (the rest)."""
    asked = body.requested_max_tokens
    return asked if asked is not None else _backend(request).default_sampling.get("max_tokens")


def _constrained(params: SamplingParams, constraint: StructuredOutputsParams | None) -> SamplingParams:
    return params if constraint is None else dataclasses.replace(params, structured_outputs=constraint)


def _fits(request: Request, params: SamplingParams) -> SamplingParams:
    """n / best_of above what a replica runs at once would wait forever (and hold up the
    requests behind it): refused here, before it reaches a replica."""
    limit = _backend(request).max_num_seqs
    over = params.over_seq_limit(limit) if limit is not None else None
    if over is not None:
        raise RequestError(over[1], param=over[0])
    return params


def _check_vocab(tok: Tokenizer, ids: list[int]) -> None:
    # Checked here as well as in the engine, so a bad prompt never reaches the router or a replica.
    bad = next((t for t in ids if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {tok.vocab_size})",
                           param="prompt")


async def _chat_job(request: Request, body: ChatCompletionRequest, rid: str, namespace: tuple[str, ...],
                    lora: str | None) -> tuple[Job, ToolPlan | None]:
    tok = _backend(request).tokenizer
    plan = tool_plan(body, _config(request).tool_call_parser)
    constraint = structured_params(body)
    tool_constraint = plan.constraint() if plan is not None else None
    if constraint is not None and tool_constraint is not None:
        raise RequestError("tool_choice required / a named function and an output constraint "
                           "(response_format, structured_outputs, guided_*) cannot be combined", param="tool_choice")
    messages, tool_kwargs = render_messages(body.messages, chat_messages(body.messages), tok.chat_template, plan)
    ids, text = await _encode_chat(request, messages, body.add_generation_prompt is not False,
                                   {**tool_kwargs, **(body.chat_template_kwargs or {})})
    if not ids:
        raise RequestError("the rendered chat prompt is empty", param="messages")
    max_tokens = resolve_max_tokens(_requested_max_tokens(request, body), len(ids), _max_model_len(request),
                                    "messages")
    params = _fits(request, _constrained(chat_sampling_params(body, max_tokens, _backend(request).default_sampling),
                                         constraint or tool_constraint))
    return Job(ids, text, params, f"{rid}-0", namespace, lora), plan


async def _prepare(request: Request, body: CompletionRequest | ChatCompletionRequest,
                   tenant: str | None) -> tuple[str, tuple[str, ...], str | None]:
    """Checks shared by both generation endpoints -> (model name to report, cache
    namespace, LoRA adapter or None). The engine puts the adapter's own
    content-hashed namespace in front of the returned one."""
    check_supported(body)
    limit = _config(request).max_stop_sequences
    check_count(body.stop if isinstance(body.stop, list) else None, limit, "stop", "stop sequences")
    check_count(body.stop_token_ids, limit, "stop_token_ids", "stop token ids")
    model, adapter = _resolve_model(request, body.model, tenant)
    await _require_healthy(_backend(request))
    return model, request_namespace(tenant, body.cache_salt), adapter


def _new_request_id(request: Request, prefix: str) -> str:
    rid = request.state.request_id = f"{prefix}-{uuid.uuid4().hex}"
    return rid


# -- routes -------------------------------------------------------------------------------------

def _add_routes(app: FastAPI) -> None:
    # Straight on the app, not via include_router: FastAPI's included-router
    # wrapper holds a lock, and Ray Serve must be able to pickle the app.
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/responses", create_response, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/ping", ping, methods=["POST"], operation_id="ping_post")  # one id per operation
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/openapi.json", openapi, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"])


async def create_completion(body: CompletionRequest, request: Request,
                            tenant: str | None = Depends(tenant_of)) -> Response:
    rid, created = _new_request_id(request, "cmpl"), int(time.time())
    model, namespace, lora = await _prepare(request, body, tenant)
    backend, config = _backend(request), _config(request)
    jobs = await _completion_jobs(request, body, rid, namespace, lora)
    n, logprobs, echo = jobs[0].params.n, body.logprobs is not None, bool(body.echo)
    text = TokenText(backend.tokenizer, jobs[0].params.skip_special_tokens)
    if body.wants_stream:
        opened = await until_disconnect(request, open_streams(backend, jobs), config.disconnect_poll_s)
        streamer = CompletionStreamer(rid, created, model, n, logprobs, echo, text, bool(body.return_token_ids))
        final = (lambda outs: [streamer.usage_chunk(outs)]) if body.include_usage_in_stream else (lambda _: [])
        return SSEResponse(sse_events(opened, streamer.chunks, final, rid),
                           headers=_headers(request, rid, [o.stream.replica_id for o in opened]))

    async def work() -> tuple[list[RequestOutput], list[str]]:
        opened = await open_streams(backend, jobs)
        return await run_to_end(opened), [o.stream.replica_id for o in opened]
    outs, replicas = await until_disconnect(request, work(), config.disconnect_poll_s)
    resp = completion_response(rid, created, model, outs, n, logprobs, echo, text, bool(body.return_token_ids))
    return JSONResponse(resp.model_dump(mode="json"), headers=_headers(request, rid, replicas))


async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 tenant: str | None = Depends(tenant_of)) -> Response:
    rid, created = _new_request_id(request, "chatcmpl"), int(time.time())
    model, namespace, lora = await _prepare(request, body, tenant)
    backend, config = _backend(request), _config(request)
    job, plan = await _chat_job(request, body, rid, namespace, lora)
    top = job.params.logprobs  # None unless logprobs=true
    text = TokenText(backend.tokenizer, job.params.skip_special_tokens)
    if body.wants_stream:
        opened = await until_disconnect(request, open_streams(backend, [job]), config.disconnect_poll_s)
        streamer = ChatStreamer(rid, created, model, job.params.n, top, text, bool(body.return_token_ids))
        final = (lambda outs: [streamer.usage_chunk(outs)]) if body.include_usage_in_stream else (lambda _: [])
        chunks = streamer.chunks
        if plan is not None and plan.choice != "none":
            chunks = ToolChatStreamer(rid, created, model, job.params.n, plan).chunks
        return SSEResponse(sse_events(opened, lambda _, out: chunks(out), final, rid),
                           headers=_headers(request, rid, [opened[0].stream.replica_id]))

    async def work() -> tuple[RequestOutput, str]:
        opened = await open_streams(backend, [job])
        return (await run_to_end(opened))[0], opened[0].stream.replica_id
    out, replica = await until_disconnect(request, work(), config.disconnect_poll_s)
    resp = chat_response(rid, created, model, out, top, text, bool(body.return_token_ids))
    if plan is not None:
        apply_to_response(resp, plan)
    return JSONResponse(resp.model_dump(mode="json"), headers=_headers(request, rid, [replica]))


async def create_response(body: ResponsesRequest, request: Request,
                          tenant: str | None = Depends(tenant_of)) -> Response:
    """The Responses API, run as the chat completion it translates to (responses.py)."""
    rid, created = _new_request_id(request, "resp"), int(time.time())
    chat = to_chat_request(body)
    model, namespace, lora = await _prepare(request, chat, tenant)
    backend, config = _backend(request), _config(request)
    job, plan = await _chat_job(request, chat, rid, namespace, lora)
    builder = ResponseBuilder(rid, body, model, created, plan)
    if body.stream:
        opened = await until_disconnect(request, open_streams(backend, [job]), config.disconnect_poll_s)
        return SSEResponse(sse_events(opened, lambda _, out: builder.events(out), lambda _: [], rid),
                           headers=_headers(request, builder.id, [opened[0].stream.replica_id]))

    async def work() -> tuple[RequestOutput, str]:
        opened = await open_streams(backend, [job])
        return (await run_to_end(opened))[0], opened[0].stream.replica_id
    out, replica = await until_disconnect(request, work(), config.disconnect_poll_s)
    return JSONResponse(builder.response(out), headers=_headers(request, builder.id, [replica]))


async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request,
                            tenant: str | None = Depends(tenant_of)) -> PlainTextResponse:
    """Load (or reload with new weights) an adapter on every replica, from an allowed root
    (adapters.py: ownership and paths); 400 for a bad adapter."""
    backend, name = _backend(request), body.lora_name
    if name in (*_base_names(request), backend.model_name):
        raise APIError(400, f"'{name}' is the base model's name", param="lora_name")
    path = await asyncio.to_thread(allowed_lora_path, body.lora_path, _config(request).allowed_lora_roots)
    owners = _owners(request)
    previous = owners.claim(name, tenant, backend.model_names())  # before the await: no racing claim
    try:
        with backend_errors():
            try:
                await backend.load_adapter(name, path)
            except OSError:  # unreadable after all (a race, a file it may not open): the one refusal
                raise path_refused() from None
    except BaseException:
        owners.restore(name, previous)
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request,
                              tenant: str | None = Depends(tenant_of)) -> PlainTextResponse:
    backend, name, owners = _backend(request), body.lora_name, _owners(request)
    owners.check_unload(name, tenant, backend.model_names())
    with backend_errors():
        try:
            await backend.unload_adapter(name)
        except KeyError:
            raise not_loaded(name) from None
        finally:
            owners.forget(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _model_cards(request: Request, tenant: str | None) -> list[ModelCard]:
    """The base model under each served name, then each LoRA adapter the tenant may use.
    ``root`` is the model's local directory, so a client can load the tokenizer from it."""
    backend, base, created = _backend(request), _base_name(request), int(time.time())
    limit, names = _max_model_len(request), _base_names(request)
    cards = [ModelCard(id=n, created=created, root=backend.model_root, max_model_len=limit) for n in names]
    known = backend.model_names()
    for name in known:
        if name not in (*names, backend.model_name) and _owners(request).visible(name, tenant, known):
            cards.append(ModelCard(id=name, created=created, root=name, parent=base, max_model_len=limit))
    return cards


async def list_models(request: Request, tenant: str | None = Depends(tenant_of)) -> JSONResponse:
    return JSONResponse(ModelList(data=_model_cards(request, tenant)).model_dump(mode="json"))


async def get_model(model_id: str, request: Request, tenant: str | None = Depends(tenant_of)) -> JSONResponse:
    card = next((c for c in _model_cards(request, tenant) if c.id == model_id), None)
    if card is None:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return JSONResponse(card.model_dump(mode="json"))


async def version(_: Request) -> JSONResponse:
    return JSONResponse({"version": __version__})


async def ping(request: Request) -> Response:
    """vLLM's /ping (SageMaker's health route): /health under another name."""
    return await health(request)


async def tokenize(body: TokenizeRequest, request: Request,
                   tenant: str | None = Depends(tenant_of)) -> JSONResponse:
    _resolve_model(request, body.model, tenant)
    tok = _backend(request).tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
    if body.messages is not None:
        ids, _text = await _encode_chat(request, chat_messages(body.messages), body.add_generation_prompt)
    else:
        prompt = valid_text(body.prompt, "prompt")
        _check_length(request, prompt, "prompt")
        ids = await asyncio.to_thread(tok.encode, prompt, body.add_special_tokens)
    strs = [tok.id_to_token(t) for t in ids] if body.return_token_strs else None
    resp = TokenizeResponse(count=len(ids), max_model_len=_max_model_len(request), tokens=ids, token_strs=strs)
    return JSONResponse(resp.model_dump(mode="json"))


async def detokenize(body: DetokenizeRequest, request: Request,
                     tenant: str | None = Depends(tenant_of)) -> JSONResponse:
    _resolve_model(request, body.model, tenant)
    tok = _backend(request).tokenizer
    bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})", param="tokens")
    text = await asyncio.to_thread(tok.decode, body.tokens)  # a long list: off the event loop
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))


async def health(request: Request) -> Response:
    """Open (no API key): load balancers and Serve probe it."""
    await _require_healthy(_backend(request))
    return Response(status_code=200)


async def metrics(request: Request, _: None = Depends(metrics_access)) -> PlainTextResponse:
    with backend_errors():
        text = await _backend(request).metrics_text()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request, _: str | None = Depends(tenant_of)) -> JSONResponse:
    return JSONResponse(request.app.openapi())
