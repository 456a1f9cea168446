"""Sampled tokens -> text, stop strings, logprobs and RequestOutputs."""
from __future__ import annotations

from radixserve.engine.core.detokenizer import IncrementalDetokenizer
from radixserve.engine.core.metrics import EngineMetrics
from radixserve.engine.core.scheduler import Scheduler
from radixserve.engine.core.scheduler_output import PromptLogprobs, SampledToken
from radixserve.engine.core.sequence import Request, Sequence
from radixserve.engine.entrypoints.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from radixserve.engine.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler, metrics: EngineMetrics):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.metrics = metrics
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._logprobs: dict[int, list[PositionLogprobs]] = {}
        self._finished_pending: list[RequestOutput] = []

    def add_request(self, request: Request) -> None:
        for seq in request.seqs:
            self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, request.params,
                                                             request.prompt_token_ids)
            if request.params.logprobs is not None:
                self._logprobs[seq.seq_id] = []

    def process(self, updated: list[tuple[Sequence, SampledToken]],
                prompt_logprobs: list[PromptLogprobs]) -> list[RequestOutput]:
        for plp in prompt_logprobs:
            self._add_prompt_logprobs(plp)
        touched: dict[str, Request] = {}
        for seq, st in updated:
            self._add_token(seq, st)
            touched[seq.request.request_id] = seq.request
        outs = self._finished_pending
        self._finished_pending = []
        for request in touched.values():
            if request.params.best_of and request.params.best_of > request.params.n \
                    and not request.is_finished:
                continue  # best_of > n: which n win is known only at the end
            outs.append(self._build(request))
            if request.is_finished:
                self._release(request)
        return outs

    def drain_finished(self) -> list[RequestOutput]:
        outs, self._finished_pending = self._finished_pending, []
        return outs

    def finish_and_release(self, request: Request, error: str | None = None) -> RequestOutput:
        """Output for a request ended outside a step (abort, engine error)."""
        for seq in request.seqs:
            detok = self._detok.get(seq.seq_id)
            if detok is not None and not detok.finished:
                detok.finish()
        out = self._build(request, error)
        self._release(request)
        return out

    # -- internals -------------------------------------------------------------------

    def _add_token(self, seq: Sequence, st: SampledToken) -> None:
        detok = self._detok[seq.seq_id]
        if seq.is_finished and seq.finish_reason == "stop":  # EOS or a stop token id
            detok.add_token(st.token_id, is_stop_token=True)
        elif seq.is_finished:
            res = detok.add_token(st.token_id, is_last=True)
            if res.stop_str is not None:  # the last allowed token also completed a stop string
                seq.finish_reason, seq.stop_reason = "stop", res.stop_str
        else:
            res = detok.add_token(st.token_id)
            if res.stop_str is not None:
                self.scheduler.finish_seq(seq, "stop", res.stop_str)
        if seq.seq_id in self._logprobs:
            self._logprobs[seq.seq_id].append(self._position(st.token_id, st.logprob, st.top_logprobs))

    def _position(self, token_id: int, logprob: float,
                  top: list[tuple[int, float]] | None) -> PositionLogprobs:
        entry: PositionLogprobs = {}
        for rank, (tid, lp) in enumerate(top or [], start=1):
            entry[tid] = Logprob(lp, rank, self.tokenizer.decode([tid], skip_special_tokens=False))
        if token_id not in entry:
            rank = next((r for r, (_, lp) in enumerate(top or [], 1) if lp < logprob), None)
            entry[token_id] = Logprob(logprob, rank, self.tokenizer.decode([token_id], skip_special_tokens=False))
        return entry

    def _add_prompt_logprobs(self, plp: PromptLogprobs) -> None:
        seq = self.scheduler.seqs.get(plp.seq_id)
        if seq is None:
            return
        request = seq.request
        if request.prompt_logprobs_buffer is None:
            request.prompt_logprobs_buffer = [None]  # the first prompt token has no logprob
        ids = request.prompt_token_ids
        for j, lp in enumerate(plp.token_logprobs):
            pos = plp.start_pos + 1 + j
            if pos >= len(request.prompt_logprobs_buffer) and pos < len(ids):
                top = plp.top_logprobs[j] if plp.top_logprobs else None
                request.prompt_logprobs_buffer.append(self._position(ids[pos], lp, top))
        if len(request.prompt_logprobs_buffer) == len(ids):
            request.prompt_logprobs = request.prompt_logprobs_buffer

    def _build(self, request: Request, error: str | None = None) -> RequestOutput:
        seqs = request.seqs
        if request.is_finished and request.params.best_of and request.params.best_of > request.params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:request.params.n]
        outputs = []
        for i, seq in enumerate(seqs):
            detok = self._detok[seq.seq_id]
            text = detok.output_text if detok.finished else detok.streamable_text()
            outputs.append(CompletionOutput(
                index=i, text=text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(self._logprobs[seq.seq_id]) if seq.seq_id in self._logprobs else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time,
                                 request.first_token_time, request.finished_time)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             request.is_finished, max(seqs[0].num_cached_tokens, 0),
                             seqs[0].num_cpu_cached_tokens, request.prompt_logprobs, metrics, error)

    def _release(self, request: Request) -> None:
        m = self.metrics
        m.inc("num_requests_finished")
        m.inc("prompt_tokens", request.prompt_len)
        n_out = sum(s.num_output_tokens for s in request.seqs)
        m.inc("generation_tokens", n_out)
        if request.first_token_time is not None:
            m.observe("time_to_first_token_seconds", request.first_token_time - request.arrival_time)
            if request.finished_time is not None:
                m.observe("e2e_request_latency_seconds", request.finished_time - request.arrival_time)
                longest = max(s.num_output_tokens for s in request.seqs)
                if longest > 1:
                    m.observe("time_per_output_token_seconds",
                              (request.finished_time - request.first_token_time) / (longest - 1))
        for seq in request.seqs:
            self._detok.pop(seq.seq_id, None)
            self._logprobs.pop(seq.seq_id, None)
        self.scheduler.pop_finished_request(request.request_id)
