"""Load drivers (open loop, closed loop) and the targets they drive.

A *target* serves one request and reports what the client saw, with a
timestamp per streamed token:

- :class:`EngineTarget`: an in-process ``engine.AsyncLLMEngine`` (token ids in).
- :class:`HFTarget`: Hugging Face transformers ``generate`` on the same weights,
  one request at a time in a worker thread (what you get without a server):
  a request waits for the ones before it, then the first token's time comes
  from a generation streamer, so TTFT includes the queueing a user would see.
- :class:`HttpTarget`: an OpenAI-compatible ``/v1/completions`` or
  ``/v1/chat/completions`` endpoint over SSE (httpx), reading
  ``usage.prompt_tokens_details.cached_tokens`` from the final chunk
  (``stream_options.include_usage``) and the ``x-radixserve-replica`` header.

A *driver* decides when requests are sent. Every workload is a list of
sessions (single-turn workloads: sessions of one turn); the turns of a
session run in order, turn k+1 going out ``think_s`` after turn k's answer,
with the answer actually generated in its prompt.

- :func:`run_open_loop`: each session starts at its ``arrival_s`` (Poisson
  arrivals from :func:`benchmarks.workloads.with_poisson_arrivals`), whether
  or not earlier requests have finished.
- :func:`run_closed_loop`: ``users`` concurrent users, each taking the next
  session as soon as its last one finished.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from radixserve.benchmarks.metrics import RequestRecord
from radixserve.benchmarks.workloads import RequestSpec, assemble_ids, assemble_messages, assemble_text, sessions


@dataclass(frozen=True)
class Clock:
    """Seconds since the run started (perf_counter: monotonic wall clock)."""

    t0: float

    @classmethod
    def start(cls) -> Clock:
        return cls(time.perf_counter())

    def now(self) -> float:
        return time.perf_counter() - self.t0


@dataclass(frozen=True)
class TurnOutput:
    """A finished turn's answer, for the next turn's prompt."""

    token_ids: tuple[int, ...] = ()
    text: str = ""


class Target(Protocol):
    name: str

    async def open(self) -> None: ...  # called inside the run's event loop, before the first send

    async def close(self) -> None: ...

    async def send(self, spec: RequestSpec, history: Sequence[TurnOutput | None],
                   clock: Clock) -> tuple[RequestRecord, TurnOutput | None]: ...


def _failed(spec: RequestSpec, submit: float, clock: Clock, prompt_tokens: int, exc: BaseException,
            times: Sequence[float] = ()) -> tuple[RequestRecord, None]:
    return RequestRecord(spec.request_id, spec.session_id, spec.turn, submit, tuple(times), clock.now(),
                         prompt_tokens, 0, error=f"{type(exc).__name__}: {exc}"), None


# -- targets ------------------------------------------------------------------------


class EngineTarget:
    """An in-process AsyncLLMEngine; greedy, exactly ``output_len`` tokens (EOS ignored)."""

    def __init__(self, engine: Any, name: str = "engine"):
        self.engine = engine
        self.name = name
        self._ids = itertools.count()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, spec, history, clock):
        from radixserve.engine.sampling_params import SamplingParams
        ids = assemble_ids(spec, [h.token_ids if h else None for h in history])
        params = SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
        submit, times, out = clock.now(), [], None
        try:
            async for out in self.engine.generate(prompt_token_ids=ids, sampling_params=params,
                                                  request_id=f"{spec.request_id}#{next(self._ids)}"):
                new = len(out.outputs[0].token_ids) - len(times)
                times.extend([clock.now()] * max(new, 0))
        except Exception as exc:  # a failed request is a data point, not the end of the run
            return _failed(spec, submit, clock, len(ids), exc, times)
        tokens = tuple(out.outputs[0].token_ids) if out else ()
        rec = RequestRecord(spec.request_id, spec.session_id, spec.turn, submit, tuple(times), clock.now(),
                            len(ids), len(tokens), out.num_cached_tokens if out else 0,
                            error=out.error if out else "no output")
        return rec, TurnOutput(tokens) if rec.ok else None


class HFTarget:
    """transformers ``generate``, one request at a time, first-token time from a streamer."""

    def __init__(self, model: Any, name: str = "hf"):
        self.model = model
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, spec, history, clock):
        ids = assemble_ids(spec, [h.token_ids if h else None for h in history])
        submit = clock.now()
        try:
            times, tokens = await asyncio.wrap_future(self._pool.submit(self._generate, ids, spec.output_len, clock))
        except Exception as exc:
            return _failed(spec, submit, clock, len(ids), exc)
        rec = RequestRecord(spec.request_id, spec.session_id, spec.turn, submit, tuple(times), clock.now(),
                            len(ids), len(tokens))
        return rec, TurnOutput(tuple(tokens))

    def _generate(self, ids: list[int], n: int, clock: Clock) -> tuple[list[float], list[int]]:
        import torch
        streamer = _TimingStreamer(clock)
        x = torch.tensor([ids])
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, streamer=streamer, pad_token_id=0)
        return streamer.times, streamer.tokens

    def warm_up(self) -> None:
        """First-call costs must not land on the first measured request."""
        self._generate(list(range(10, 22)), 2, Clock.start())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class _TimingStreamer:
    """transformers streamer protocol: put(prompt) once, then put(new token) per step."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = self.clock.now()
        ids = value.flatten().tolist()
        self.times.extend([now] * len(ids))
        self.tokens.extend(ids)

    def end(self) -> None:
        pass


class HttpTarget:
    """An OpenAI-compatible server: ``api`` is "completions" or "chat"; prompts are text.

    ``decode`` turns a segment's token ids into text (the model's tokenizer, so
    that prompt lengths in tokens stay close to the spec's).
    """

    def __init__(self, base_url: str, model: str, decode: Callable[[list[int]], str],
                 api: str = "completions", name: str = "http", api_key: str | None = None,
                 timeout_s: float = 600.0):
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        self.timeout_s = timeout_s
        self.client: Any = None
        self.url = base_url.rstrip("/") + ("/v1/chat/completions" if api == "chat" else "/v1/completions")
        self.model, self.decode, self.api, self.name = model, decode, api, name
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def open(self) -> None:
        import httpx  # an httpx client belongs to one event loop: made per run
        self.client = httpx.AsyncClient(timeout=self.timeout_s)

    async def close(self) -> None:
        await self.client.aclose()
        self.client = None

    def body(self, spec: RequestSpec, history: Sequence[TurnOutput | None]) -> dict:
        answers = [h.text if h else None for h in history]
        body = {"model": self.model, "max_tokens": spec.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if self.api == "chat":
            body["messages"] = assemble_messages(spec, self.decode, answers)
        else:
            body["prompt"] = assemble_text(spec, self.decode, answers)
        return body

    async def send(self, spec, history, clock):
        body = self.body(spec, history)
        submit, times, text, usage, replica, server_id = clock.now(), [], [], {}, None, None
        try:
            async with self.client.stream("POST", self.url, json=body, headers=self.headers) as resp:
                replica = resp.headers.get("x-radixserve-replica")
                server_id = resp.headers.get("x-request-id")
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:300]
                    raise RuntimeError(f"HTTP {resp.status_code}: {detail}")
                async for chunk in _sse_chunks(resp):
                    piece = self._piece(chunk)
                    if piece:
                        times.append(clock.now())
                        text.append(piece)
                    usage = chunk.get("usage") or usage
        except Exception as exc:
            return _failed(spec, submit, clock, spec.prompt_len, exc, times)
        details = usage.get("prompt_tokens_details") or {}
        rec = RequestRecord(spec.request_id, spec.session_id, spec.turn, submit, tuple(times), clock.now(),
                            int(usage.get("prompt_tokens", spec.prompt_len)),
                            int(usage.get("completion_tokens", len(times))), int(details.get("cached_tokens") or 0),
                            replica=replica, server_request_id=server_id)
        return rec, TurnOutput(text="".join(text))

    def _piece(self, chunk: dict) -> str:
        choices = chunk.get("choices") or []
        if not choices:
            return ""
        if self.api == "chat":
            return (choices[0].get("delta") or {}).get("content") or ""
        return choices[0].get("text") or ""


async def _sse_chunks(resp: Any):
    """JSON payloads of ``data:`` lines until ``[DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"server error in stream: {chunk['error']}")
        yield chunk


# -- drivers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """How requests are sent: ``mode`` "open" (Poisson at ``rate`` req/s) or "closed" (``users``)."""

    mode: str = "closed"
    users: int = 8
    rate: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"load mode must be 'open' or 'closed', got {self.mode!r}")
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (inf: all at once), got {self.rate}")

    def label(self) -> str:
        return f"closed loop, {self.users} users" if self.mode == "closed" else (
            "open loop, all at t=0" if math.isinf(self.rate) else f"open loop, Poisson {self.rate:g} req/s")


def run(target: Target, requests: Sequence[RequestSpec], load: Load, desc: str = "",
        clock: Clock | None = None) -> list[RequestRecord]:
    """Drive ``requests`` (with arrival times already assigned for open loop) to completion.
    ``clock``: the run's time origin (default: now), for callers that relate records to other stamps."""
    async def main() -> list[RequestRecord]:
        await target.open()
        try:
            if load.mode == "open":
                return await run_open_loop(target, requests, desc, clock)
            return await run_closed_loop(target, requests, load.users, desc, clock)
        finally:
            await target.close()

    return asyncio.run(main())


async def _run_session(target: Target, turns: Sequence[RequestSpec], clock: Clock,
                       records: list[RequestRecord], bar: tqdm) -> None:
    history: list[TurnOutput | None] = []
    for spec in turns:
        if spec.turn and spec.think_s:
            await asyncio.sleep(spec.think_s)
        record, answer = await target.send(spec, history, clock)
        records.append(record)
        history.append(answer)
        bar.update(1)


async def run_open_loop(target: Target, requests: Sequence[RequestSpec], desc: str = "",
                        clock: Clock | None = None) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    clock = clock or Clock.start()

    async def session(turns: tuple[RequestSpec, ...]) -> None:
        await asyncio.sleep(max(0.0, turns[0].arrival_s - clock.now()))
        await _run_session(target, turns, clock, records, bar)

    with tqdm(total=len(requests), desc=desc or target.name, leave=False) as bar:
        await asyncio.gather(*(session(t) for t in sessions(requests)))
    return records


async def run_closed_loop(target: Target, requests: Sequence[RequestSpec], users: int,
                          desc: str = "", clock: Clock | None = None) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    clock = clock or Clock.start()
    queue = collections.deque(sessions(requests))

    async def user() -> None:
        while queue:
            await _run_session(target, queue.popleft(), clock, records, bar)

    with tqdm(total=len(requests), desc=desc or target.name, leave=False) as bar:
        await asyncio.gather(*(user() for _ in range(users)))
    return records
