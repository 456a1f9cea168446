"""Per-request grammars on the engine side: compile off the step loop, mask, advance.

The engine owns every matcher (as vLLM's V1 engine core does): before a step
it writes the allowed-token bitmask of each constrained sample row into the
SchedulerOutput; rank 0 applies it to the logits (``mask.apply_grammar_mask``);
after the step each matcher accepts its sequence's token. Workers keep no
grammar state, so tensor parallelism, preemption (recompute or swap: the
output tokens and so the matcher state survive) and worker restarts need
nothing more.

Grammars compile in a thread pool; a request whose grammar is not ready stays
in the waiting queue (``Request.grammar_pending``) while others run. Compiled
grammars are cached by ``StructuredOutputsParams.key`` (this engine has one
tokenizer, so the key plus the engine is the (grammar, tokenizer) pair).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from radixserve.engine.config import StructuredOutputsConfig
from radixserve.engine.core.scheduler_output import GrammarMask, SampledToken, SchedulerOutput
from radixserve.engine.core.sequence import Request, Sequence
from radixserve.engine.structured import xgrammar_backend as xgb
from radixserve.engine.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from radixserve.engine.core.metrics import EngineMetrics
    from radixserve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: frozenset[int],
                 config: StructuredOutputsConfig, metrics: EngineMetrics | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        self.stop_token_ids = stop_token_ids
        self.config = config
        self.metrics = metrics
        self._pool: ThreadPoolExecutor | None = None  # started on the first constrained request
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool, bool], Future] = OrderedDict()
        self._pending: dict[str, tuple[Request, Future]] = {}
        self._matchers: dict[int, tuple[Sequence, Any]] = {}  # seq id -> (sequence, xgrammar matcher)
        self.compile_seconds: list[float] = []  # per compile, for the benchmark

    # -- requests ---------------------------------------------------------------------------

    def prepare(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar of ``params`` (cached, or compiling in the pool).

        Builds the grammar here first, so a bad schema, regex or EBNF raises
        ValueError now, naming the problem; only the tokenizer-dependent part
        runs in the pool.
        """
        key = params.key
        fut = self._cache.get(key)
        if fut is not None and not (fut.done() and fut.exception() is not None):
            self._cache.move_to_end(key)
            self._count("grammar_cache_hits")
            return fut
        grammar = xgb.build_grammar(params)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.grammar_compile_threads, thread_name_prefix="radixserve-grammar")
        fut = self._pool.submit(self._compile, grammar)
        self._cache[key] = fut
        while len(self._cache) > self.config.grammar_cache_size:
            self._cache.popitem(last=False)  # requests already holding it keep their future
        return fut

    def add_request(self, request: Request) -> None:
        params = request.params.structured_outputs
        if params is None:
            return
        request.grammar_pending = True
        self._pending[request.request_id] = (request, self.prepare(params))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def poll(self) -> list[tuple[Request, str]]:
        """Give requests whose grammar compiled their matchers; (request, error) for failed compiles."""
        failed = []
        for rid, (request, fut) in list(self._pending.items()):
            if request.is_finished:  # aborted while compiling
                del self._pending[rid]
            elif fut.done():
                del self._pending[rid]
                exc = fut.exception()
                if exc is not None:
                    failed.append((request, f"structured_outputs: the grammar failed to compile: {exc}"))
                    continue
                xgr = xgb.import_xgrammar()
                for seq in request.seqs:
                    self._matchers[seq.seq_id] = (seq, xgr.GrammarMatcher(fut.result()))
                request.grammar_pending = False
        return failed

    # -- one step --------------------------------------------------------------------------

    def fill_mask(self, so: SchedulerOutput) -> GrammarMask | None:
        """Bitmasks of the step's constrained sample rows; None when none is constrained."""
        if not self._matchers:
            return None
        rows = [i for i, r in enumerate(so.sample_rows) if r.seq_id in self._matchers]
        if not rows:
            return None
        import torch  # xgrammar fills torch tensors; the engine process has torch anyway
        bitmask = torch.empty((len(rows), self.num_words), dtype=torch.int32)  # [rows, words]
        for j, i in enumerate(rows):
            self._matchers[so.sample_rows[i].seq_id][1].fill_next_token_bitmask(bitmask, j)
        return GrammarMask(rows=rows, num_words=self.num_words,
                           bitmask=bitmask.numpy().astype(np.dtype("<i4"), copy=False).tobytes())

    def accept(self, updated: list[tuple[Sequence, SampledToken]],
               finish: Callable[[Sequence, str], None]) -> None:
        """Advance each constrained sequence's matcher by its new token; a matcher
        that reached its end (or, defensively, refused the token) finishes it with "stop"."""
        for seq, st in updated:
            entry = self._matchers.get(seq.seq_id)
            if entry is None:
                continue
            matcher = entry[1]
            if not matcher.accept_token(st.token_id):
                log.warning("sequence %d: token %d is outside its grammar; stopping it", seq.seq_id, st.token_id)
                if not seq.is_finished:
                    finish(seq, "stop")
            elif matcher.is_terminated() and not seq.is_finished:
                finish(seq, "stop")
            if seq.is_finished:
                del self._matchers[seq.seq_id]

    def release_finished(self) -> None:
        """Drop matchers of sequences ended outside ``accept`` (stop strings, aborts, failures)."""
        for seq_id in [i for i, (seq, _) in self._matchers.items() if seq.is_finished]:
            del self._matchers[seq_id]

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- compile thread ---------------------------------------------------------------------

    def _compile(self, grammar: Any) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                xgr = xgb.import_xgrammar()
                info = xgb.tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.config.grammar_compile_threads)
        t0 = time.perf_counter()
        compiled = self._compiler.compile_grammar(grammar)
        self.compile_seconds.append(time.perf_counter() - t0)
        self._count("grammar_compiles")
        return compiled

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name)
