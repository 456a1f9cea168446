"""Where a request's TTFT goes on radixserve's HTTP server (bench_peer's ``ttft_breakdown``).

The benchmark's server process (``bench_peer --serve-ours``) wraps its backend
in :class:`TracingBackend` and its executor in :func:`trace_steps`, and serves
what they recorded at ``GET /bench/ttft_trace`` (read and cleared by the
client after each run). All stamps are ``CLOCK_MONOTONIC`` seconds
(``time.monotonic`` on the server, ``time.perf_counter`` on the client: the
same clock on Linux), so client and server times subtract directly.

A request's TTFT is cut into consecutive parts that sum to it:

  http_in   client submit -> the backend is called (HTTP, JSON, tokenize, validation)
  inbox     -> the engine thread takes it from its inbox (``arrival_time``: it drains the
            inbox only between steps, so this is the rest of the step running meanwhile)
  queue     -> first scheduled (steps it waited in the waiting queue: deferred behind an
            in-flight prefix, out of budget or seats)
  prefill   -> its first token is sampled (the step(s) computing its prompt, with whatever
            else shared them)
  out       -> the first output reaches the request's asyncio side
  sse       -> the client reads the first token (SSE framing, HTTP)
"""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from radixserve.cluster.backend import GenerationStream, LocalBackend
from radixserve.engine.entrypoints.outputs import RequestOutput

PARTS = ("http_in", "inbox", "queue", "prefill", "out", "sse")


@dataclass(frozen=True)
class ServerStamps:
    """One request's server-side stamps (monotonic seconds)."""

    backend_call: float
    arrival: float
    first_scheduled: float
    first_token: float
    first_output: float
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class StepStamp:
    """One engine step: when it ran and what it computed."""

    start: float
    end: float
    prefill_tokens: int  # tokens of sequences with more than one new token
    prefill_seqs: int
    decode_seqs: int


class _TracedStream(GenerationStream):
    def __init__(self, inner: GenerationStream, called: float, sink: dict[str, ServerStamps], request_id: str):
        self._inner, self._called, self._sink, self._rid = inner, called, sink, request_id
        self.replica_id = inner.replica_id
        self._first = True

    async def __anext__(self) -> RequestOutput:
        out = await self._inner.__anext__()
        if self._first:
            self._first = False
            m = out.metrics
            if m.first_scheduled_time is not None and m.first_token_time is not None:
                self._sink[self._rid] = ServerStamps(self._called, m.arrival_time, m.first_scheduled_time,
                                                     m.first_token_time, time.monotonic(),
                                                     len(out.prompt_token_ids), out.num_cached_tokens)
        return out

    async def aclose(self) -> None:
        await self._inner.aclose()


class TracingBackend(LocalBackend):
    """LocalBackend stamping each request's first output (keyed by the engine request id)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stamps: dict[str, ServerStamps] = {}
        self.steps: list[StepStamp] = []

    async def generate(self, prompt_token_ids, params, request_id, namespace, prompt_text, lora=None):
        called = time.monotonic()
        inner = await super().generate(prompt_token_ids, params, request_id, namespace, prompt_text, lora)
        return _TracedStream(inner, called, self.stamps, request_id)

    def take(self) -> dict[str, Any]:
        """Everything recorded since the last call, as JSON."""
        stamps, self.stamps = self.stamps, {}
        steps, self.steps = self.steps, []
        return {"requests": {k: asdict(v) for k, v in stamps.items()}, "steps": [asdict(s) for s in steps]}


def trace_steps(executor: Any, steps_of: TracingBackend) -> None:
    """Stamp every ``executor.execute`` (the model step) into ``steps_of.steps``. The list is
    swapped, not mutated, by ``take`` on the HTTP thread, so appends need no lock here."""
    execute = executor.execute
    lock = threading.Lock()

    def traced(so):
        t0 = time.monotonic()
        result = execute(so)
        pre = [len(s.token_ids) for s in so.seqs if len(s.token_ids) > 1]
        with lock:
            steps_of.steps.append(StepStamp(t0, time.monotonic(), sum(pre), len(pre), len(so.seqs) - len(pre)))
        return result
    executor.execute = traced


def parts(submit: float, first_token_client: float, s: Mapping[str, float]) -> dict[str, float]:
    """One request's TTFT cut into PARTS (seconds); they sum to first_token_client - submit."""
    marks = [submit, s["backend_call"], s["arrival"], s["first_scheduled"], s["first_token"], s["first_output"],
             first_token_client]
    return {name: round(b - a, 5) for name, a, b in zip(PARTS, marks, marks[1:])}


def breakdown(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Median and mean of each part over requests, and the median TTFT they sum to."""
    if not rows:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(rows)}
    for name in (*PARTS, "ttft"):
        xs = [r[name] for r in rows]
        out[name] = {"p50": round(statistics.median(xs), 4), "mean": round(statistics.fmean(xs), 4)}
    return out


def step_rows(steps: Sequence[Mapping[str, float]], t0: float) -> list[list[float]]:
    """Steps as compact rows [start_s, seconds, prefill_tokens, prefill_seqs, decode_seqs], start from t0."""
    return [[round(s["start"] - t0, 4), round(s["end"] - s["start"], 4), s["prefill_tokens"], s["prefill_seqs"],
             s["decode_seqs"]] for s in steps]
