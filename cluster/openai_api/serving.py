"""The life of one generation request: open streams, watch the client, close.

Every stream is primed (its first output awaited) before the HTTP response
starts, so an invalid request or an engine failure still gets its proper
status code instead of a broken 200 stream. Whatever ends a request early (a
client disconnect, an error, a cancelled handler) closes its streams, which
aborts them in the engine and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from radixserve.cluster.backend import Backend, BackendUnavailableError, GenerationStream
from radixserve.cluster.openai_api.protocol import ErrorInfo, ErrorResponse
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal colour codes (Ray's exception text has them)


class APIError(Exception):
    """An error answered in the OpenAI error shape. ``detail`` (internal: exception text,
    replica ids) goes to the log only, never to the client."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, detail: str | None = None):
        message = _ANSI.sub("", message)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.detail = detail

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def server_error(message: str, detail: str | None = None) -> APIError:
    return APIError(500, message, "server_error", code="internal_error", detail=detail)


def unavailable(message: str, detail: str | None = None) -> APIError:
    return APIError(503, message, "service_unavailable_error", code="service_unavailable", detail=detail)


def for_client(exc: APIError, request_id: str) -> APIError:
    """A server-side error as the client sees it: our message plus the request id; what
    went wrong inside is logged here under that id."""
    level = logging.WARNING if exc.status == 503 else logging.ERROR  # 503: expected while replicas restart
    log.log(level, "request %s: %d %s%s", request_id, exc.status, exc.message,
            f": {exc.detail}" if exc.detail else "", exc_info=exc.__cause__)
    return APIError(exc.status, f"{exc.message} (request id: {request_id})", exc.type, exc.param, exc.code)


def client_message(exc: BaseException) -> str:
    """The text of a bad-request error. One raised on a replica arrives wrapped by Ray
    (its text then holds the traceback, pid and node address): use the cause's text."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)


@contextlib.contextmanager
def backend_errors() -> Iterator[None]:
    """Backend exceptions -> APIError, per the Backend contract."""
    try:
        yield
    except APIError:
        raise
    except BackendUnavailableError as exc:
        raise unavailable("no model replica can serve the request now; retry later", str(exc)) from exc
    except ValueError as exc:
        raise APIError(400, client_message(exc), param=getattr(exc, "param", None)) from exc
    except Exception as exc:
        raise server_error("internal server error", f"{type(exc).__name__}: {exc}") from exc


def check_output(out: RequestOutput) -> None:
    """An engine-side failure of this request is a 500 (or an error event once streaming)."""
    failed = next((c for c in out.outputs if c.finish_reason == "error"), None)
    if out.error is not None or failed is not None:
        raise server_error("the engine failed this request", out.error or "unknown error")


# -- streams ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One prompt of a request, ready for the backend."""

    token_ids: list[int]
    text: str | None
    params: SamplingParams
    request_id: str
    namespace: tuple[str, ...]
    lora: str | None = None  # adapter name (None: base model)


@dataclass
class Opened:
    stream: GenerationStream
    first: RequestOutput


async def close_all(opened: list[Opened] | list[GenerationStream]) -> None:
    """Close (abort) every stream, even while our caller is being cancelled."""
    streams = [o.stream if isinstance(o, Opened) else o for o in opened]

    async def close() -> None:
        for s in streams:
            try:
                await s.aclose()
            except Exception:
                log.exception("closing a generation stream failed")
    # shield: a cancelled handler must still get its aborts through.
    await asyncio.shield(asyncio.ensure_future(close()))


async def open_streams(backend: Backend, jobs: list[Job]) -> list[Opened]:
    """Submit every job, then await each one's first output."""
    streams: list[GenerationStream] = []
    try:
        with backend_errors():
            for job in jobs:
                streams.append(await backend.generate(job.token_ids, job.params, job.request_id,
                                                      job.namespace, job.text, job.lora))
            opened = []
            for s in streams:
                try:
                    first = await s.__anext__()
                except StopAsyncIteration:
                    raise server_error("the backend ended a request without any output") from None
                check_output(first)
                opened.append(Opened(s, first))
        return opened
    except BaseException:
        await close_all(streams)
        raise


async def merge(opened: list[Opened]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from every stream as they come, first outputs first."""
    for i, o in enumerate(opened):
        yield i, o.first
    live = [(i, o.stream) for i, o in enumerate(opened) if not o.first.finished]
    if len(live) == 1:  # the common case needs no tasks
        i, stream = live[0]
        with backend_errors():
            async for out in stream:
                yield i, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: GenerationStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
            queue.put_nowait((i, None, None))
        except Exception as exc:
            queue.put_nowait((i, None, exc))
    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                with backend_errors():
                    raise exc
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        # A stream's generator cannot be closed while a pump is still inside it.
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))


async def run_to_end(opened: list[Opened]) -> list[RequestOutput]:
    """Final outputs of every stream (non-streaming responses)."""
    last = [o.first for o in opened]
    try:
        async with contextlib.aclosing(merge(opened)) as outs:
            async for i, out in outs:
                check_output(out)
                last[i] = out
    finally:
        await close_all(opened)
    return last


async def until_disconnect(request: Request, work: Awaitable[T], poll_s: float) -> T:
    """Await ``work``, cancelling it (which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientDisconnected()
    finally:
        if not task.done():  # we were cancelled ourselves
            task.cancel()


# -- server-sent events -----------------------------------------------------------------------

def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_events(opened: list[Opened], render: Callable[[int, RequestOutput], list[BaseModel]],
                     final: Callable[[list[RequestOutput]], list[BaseModel]],
                     request_id: str = "") -> AsyncIterator[str]:
    """The SSE body: render(stream index, output) per output, then final(last outputs), then [DONE].

    An engine failure after the headers went out becomes an error event (as vLLM does).
    """
    last = [o.first for o in opened]
    try:
        # aclosing: merge's pump tasks must be gone before close_all touches the streams.
        async with contextlib.aclosing(merge(opened)) as outs:
            async for i, out in outs:
                check_output(out)
                last[i] = out
                for chunk in render(i, out):
                    yield sse(chunk)
        for chunk in final(last):
            yield sse(chunk)
    except APIError as exc:
        yield sse((for_client(exc, request_id) if exc.status >= 500 else exc).body())
    finally:
        await close_all(opened)
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator.

    Starlette cancels the sending task on disconnect, which can leave the
    generator suspended at a ``yield``; closing it runs its ``finally``, which
    aborts the request now rather than whenever the generator is collected.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await asyncio.shield(asyncio.ensure_future(aclose()))
