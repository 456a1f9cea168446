"""AsyncLLMEngine: the engine stepping in a background thread, requests as async iterators.

The model runs in its own thread (torch releases the GIL in its kernels), so
an asyncio server stays responsive while a step computes. Requests and aborts
reach the engine thread through an inbox; outputs come back to each request's
asyncio queue with ``call_soon_threadsafe``.

Progress watchdog: the loop stamps ``_progress_at`` whenever it is idle or a
step ran the model (or finished a request); ``stalled_for()`` is how long it
has had work without either, so a replica whose engine hangs inside a step, or
steps without ever scheduling anything, can fail its health check.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from radixserve.engine.cache.peer import PeerHint
from radixserve.engine.config import EngineConfig, ModelConfig
from radixserve.engine.core.llm_engine import LLMEngine
from radixserve.engine.core.peer_driver import PeerFetcher
from radixserve.engine.entrypoints.llm import engine_config
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.lora.request import LoRARequest
from radixserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; requests cannot be served until restart."""


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    params: SamplingParams
    prompt_token_ids: list[int] | None
    namespace: tuple[str, ...]
    sink: Callable[[RequestOutput | BaseException], None]
    lora_request: LoRARequest | None = None
    peer_hint: PeerHint | None = None
    accepted: Future = field(default_factory=Future)


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread (aborts, snapshots, resets)."""

    fn: Callable[[LLMEngine], Any]
    done: Future = field(default_factory=Future)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, launcher=None, engine_id: str | None = None,
                 peer_fetcher: PeerFetcher | None = None):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._ids = itertools.count()
        self._stop = False
        self._dead: BaseException | None = None
        self._progress_at = time.monotonic()
        # The engine is built on the thread that steps it: a model loaded and warmed up on
        # one thread and run on another gets a second OpenMP thread team, and the two teams
        # oversubscribe the cores (measured on 2 CPU cores: a smollm2 decode step 48-55 ms
        # instead of 30 ms).
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(config, launcher, engine_id, peer_fetcher, built),
                                        name="radixserve-engine", daemon=True)
        self._thread.start()
        built.result()  # re-raises what the construction raised
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_kwargs(cls, model: str = ModelConfig.model, launcher=None, engine_id: str | None = None,
                    **kwargs: Any) -> AsyncLLMEngine:
        return cls(engine_config(model, **kwargs), launcher=launcher, engine_id=engine_id)

    # -- public API ---------------------------------------------------------------

    async def generate(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                       namespace: Sequence[str] = (),
                       lora_request: LoRARequest | None = None,
                       peer_hint: PeerHint | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes.

        Raises ValueError before the first output for an invalid request (a bad
        or unknown adapter included; one named with a path is loaded first,
        reading it off the engine thread). Closing the iterator early (a client
        disconnect) aborts the request and frees its blocks.
        """
        self._check_alive()
        if lora_request is not None and self.engine.lora is not None:
            to_read = self.engine.lora.pending_read(lora_request)
            if to_read is not None:
                await self.load_lora(to_read)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = request_id or f"req-{next(self._ids)}"
        add = _Add(rid, prompt, sampling_params or SamplingParams(**self.engine.default_sampling),
                   list(prompt_token_ids) if prompt_token_ids is not None else None,
                   tuple(namespace), lambda item: loop.call_soon_threadsafe(q.put_nowait, item), lora_request,
                   peer_hint)
        self._post(add)
        await asyncio.wrap_future(add.accepted)  # raises the engine's ValueError, if any
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._post(_Call(lambda e: self._abort_now(e, rid)))

    async def load_lora(self, lora_request: LoRARequest):
        """Load (or reload) an adapter: read + validate + hash in a thread, then
        register it between two steps. ValueError for a bad directory."""
        if self.engine.lora is None:
            raise ValueError("LoRA is not enabled on this engine; start it with enable_lora=True")
        parsed = await asyncio.to_thread(self.engine.lora.read, lora_request)
        return await self.call(lambda e: e.register_lora(lora_request, parsed))

    async def unload_lora(self, name: str) -> None:
        await self.call(lambda e: e.unload_lora(name))

    async def list_loras(self) -> list:
        return await self.call(lambda e: e.list_loras())

    async def abort(self, request_id: str) -> None:
        await self.call(lambda e: self._abort_now(e, request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) between two steps, on the engine thread."""
        self._check_alive()
        c = _Call(fn)
        self._post(c)
        return await asyncio.wrap_future(c.done)

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive() and self.engine.is_healthy()

    def stalled_for(self) -> float:
        """Seconds the engine has had work queued without making progress (about 0 while
        it is idle or stepping usefully; grows while a step hangs or schedules nothing)."""
        return max(0.0, time.monotonic() - self._progress_at)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # -- engine thread -------------------------------------------------------------

    def _post(self, item: _Add | _Call) -> None:
        self._inbox.put(item)
        self._wake.set()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead}")

    def _abort_now(self, engine: LLMEngine, request_id: str) -> None:
        sink = self._sinks.pop(request_id, None)
        out = engine.abort_request(request_id)
        if sink is not None and out is not None:
            sink(out)

    def _steps_run(self) -> int:
        # Counted by the engine for each step that ran the model (read on its own thread).
        return self.engine.metrics.histograms["step_seconds"].count

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Add):
                try:
                    self.engine.add_request(item.request_id, item.prompt, item.params,
                                            item.prompt_token_ids, item.namespace,
                                            lora_request=item.lora_request, peer_hint=item.peer_hint)
                except Exception as exc:
                    item.accepted.set_exception(exc)
                    continue
                self._sinks[item.request_id] = item.sink
                item.accepted.set_result(None)
            else:
                try:
                    item.done.set_result(item.fn(self.engine))
                except Exception as exc:
                    item.done.set_exception(exc)

    def _run(self, config: EngineConfig, launcher, engine_id: str | None, peer_fetcher: PeerFetcher | None,
             built: Future) -> None:
        try:
            engine = LLMEngine(config, launcher=launcher, engine_id=engine_id, peer_fetcher=peer_fetcher)
        except BaseException as exc:
            built.set_exception(exc)
            return
        self.engine = engine
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._progress_at = time.monotonic()
                    self.engine.check_workers()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self._progress_at = time.monotonic()
                    continue
                steps = self._steps_run()
                outs = self.engine.step()
                if outs or self._steps_run() != steps:
                    self._progress_at = time.monotonic()
                for out in outs:
                    sink = self._sinks.get(out.request_id)
                    if sink is not None:
                        if out.finished:
                            del self._sinks[out.request_id]
                        sink(out)
        except BaseException as exc:  # never leave requests waiting on a dead thread
            log.exception("engine loop died")
            self._dead = exc
            err = EngineDeadError(f"the engine stopped: {exc}")
            for sink in self._sinks.values():
                sink(err)
            self._sinks.clear()
