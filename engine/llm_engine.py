"""The synchronous engine: requests in, one scheduler step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq

from engine.cache.hashing import root_hash
from engine.cache.kv_manager import KVCacheManager
from engine.config import EngineConfig
from engine.executor import Executor, UniprocExecutor, WorkerFailure
from engine.lora.request import LoRARequest
from engine.metrics import EngineMetrics
from engine.model.default_models import resolve_model
from engine.model.hf_config import load_arch_config
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import StepResult
from engine.sequence import Request, Sequence
from engine.tokenizer import Tokenizer
from engine.worker import WorkerSpec

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, launcher=None):
        """``launcher`` starts tensor-parallel workers (default: local processes)."""
        self.config = config
        self.launcher = launcher
        self.dead: str | None = None  # set when the workers could not be restarted
        self.model_dir = resolve_model(config.model.model, config.model.cache_dir)
        self.arch = load_arch_config(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir, extra_eos_token_ids=list(self.arch.eos_token_ids))
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.block_size = config.cache.block_size
        self.max_model_len = self._max_model_len()
        self.metrics = EngineMetrics()
        self.lora = None  # LoRAManager with enable_lora
        if config.lora.enable_lora:
            from engine.lora.manager import LoRAManager
            self.lora = LoRAManager(config.lora, self.arch, lambda root: self.kv.drop_namespace(root))
            for name, path in config.lora.lora_modules:  # validated before any worker starts
                self.lora.load(LoRARequest(name, path))
        self.executor = self._make_executor()
        # A lone sequence must always fit the pool, or preemption could loop forever.
        self.max_model_len = min(self.max_model_len, self.executor.num_blocks * self.block_size)
        self.kv = KVCacheManager(self.executor.num_blocks, self.block_size,
                                 config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.eos_token_ids, self.lora)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler, self.metrics)
        self._seq_ids = itertools.count()
        self._last_stats = (0, 0, 0)

    # -- setup -----------------------------------------------------------------

    def _max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        if self.arch.sliding_window:
            limit = min(limit, self.arch.sliding_window)  # no sliding-window attention: stay inside it
        wanted = self.config.model.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len = {wanted} exceeds the model's limit of {limit} tokens "
                             f"(max_position_embeddings / sliding_window in config.json)")
        length = wanted or limit
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < length:
            raise ValueError(f"without chunked prefill max_num_batched_tokens "
                             f"({sched.max_num_batched_tokens}) must be >= max_model_len ({length})")
        return length

    def _worker_spec(self, rank: int = 0, dist_init_method: str | None = None) -> WorkerSpec:
        return WorkerSpec(self.config, str(self.model_dir), rank, self.max_model_len,
                          tuple(sorted(self.eos_token_ids)), dist_init_method)

    def _make_executor(self) -> Executor:
        if self.config.parallel.tensor_parallel_size == 1:
            return UniprocExecutor(self._worker_spec())
        from engine.multiproc import MultiprocExecutor
        return MultiprocExecutor(self.config, self._worker_spec, self.launcher)

    # -- requests ----------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None = None,
                    params: SamplingParams | None = None, prompt_token_ids: Seq[int] | None = None,
                    namespace: Seq[str] = (), arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> Request:
        """Validate and queue a request; raises ValueError with a clear message.

        With ``lora_request`` the request runs on that adapter (loaded from its
        path first if needed) and its blocks live in the adapter's namespace.
        """
        if self.dead is not None:
            raise RuntimeError(f"engine is down: {self.dead}")
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        self.validate_prompt(ids)
        adapter = self.resolve_lora(lora_request) if lora_request is not None else None
        namespace = ((adapter.namespace,) if adapter is not None else ()) + tuple(namespace)
        request = Request(request_id, prompt, ids, params, namespace,
                          arrival_time if arrival_time is not None else time.monotonic(), lora=adapter)
        self._make_seqs(request)
        self.scheduler.add_request(request)
        self.outputs.add_request(request)
        return request

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             f"it must be shorter to leave room for at least one output token")
        vocab = self.arch.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")

    # -- LoRA adapters -----------------------------------------------------------------

    def _lora_manager(self):
        if self.lora is None:
            raise ValueError("LoRA is not enabled on this engine; start it with enable_lora=True")
        return self.lora

    def resolve_lora(self, lora_request: LoRARequest | str):
        """The adapter version a new request would run on (loads or reloads it if needed)."""
        if isinstance(lora_request, str):
            lora_request = LoRARequest(lora_request)
        return self._lora_manager().resolve(lora_request)

    def load_lora(self, lora_request: LoRARequest):
        """Load (or reload: same name, new weights) an adapter; ValueError for a bad directory.
        Returns its LoRAInfo."""
        adapter = self._lora_manager().load(lora_request)
        return next(i for i in self.lora.infos() if i.name == adapter.name)

    def register_lora(self, lora_request: LoRARequest, parsed):
        """Second half of load_lora, for a ``parsed`` adapter read elsewhere (off the engine thread)."""
        adapter = self._lora_manager().register(lora_request, parsed)
        return next(i for i in self.lora.infos() if i.name == adapter.name)

    def unload_lora(self, name: str) -> None:
        """Stop accepting requests for ``name``. Requests already on it finish on
        it; its slot and cached blocks are freed once the last one is done."""
        self._lora_manager().unload(name)

    def list_loras(self) -> list:
        return self.lora.infos() if self.lora is not None else []

    def _make_seqs(self, request: Request) -> None:
        root = root_hash(request.namespace)
        head = Sequence(next(self._seq_ids), request, 0, list(request.prompt_token_ids),
                        self.block_size, root)
        request.seqs.append(head)
        for i in range(1, request.num_seqs):
            request.seqs.append(Sequence(next(self._seq_ids), request, i, list(request.prompt_token_ids),
                                         self.block_size, root, block_hashes=list(head.block_hashes),
                                         parent=head))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        self.metrics.inc("num_requests_aborted")
        return self.outputs.finish_and_release(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests) or self.scheduler.has_work()

    # -- stepping ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        so = self.scheduler.schedule()
        if so.is_empty and not so.finished_seq_ids:
            return self.outputs.drain_finished()
        try:
            result = self.executor.execute(so)
        except WorkerFailure as exc:
            log.error("workers failed: %s", exc)
            return self._recover(str(exc))
        except Exception as exc:  # a bug or OOM in this step: fail its requests, keep serving
            log.exception("engine step failed")
            result = StepResult(so.step_id, error=f"{type(exc).__name__}: {exc}")
        if result.lora_errors:
            return self._fail_lora_loads(result)
        if result.error is not None:
            if self.lora is not None:  # whether the workers applied this step's loads is unknown
                for ld in so.lora_loads:
                    self.lora.invalidate_slot(ld.slot)
            return self._fail_step(so, result.error)
        updated = self.scheduler.update(so, result)
        outputs = self.outputs.process(updated, result.prompt_logprobs)
        self._record_step(time.perf_counter() - start)
        return outputs

    def _recover(self, error: str) -> list[RequestOutput]:
        """The workers lost their KV pools: fail every request, forget the
        cache, and restart the workers (or mark the engine dead)."""
        outs = []
        for request in self.scheduler.fail_all():
            self.metrics.inc("num_requests_failed")
            outs.append(self.outputs.finish_and_release(request, error=f"worker failure: {error}"))
        self.scheduler.reset_worker_state()
        self.kv.reset_prefix_cache()
        try:
            self.executor.restart()
        except Exception as exc:
            self.dead = f"workers failed ({error}) and could not be restarted: {exc}"
            log.error(self.dead)
        return outs

    def is_healthy(self) -> bool:
        return self.dead is None and self.executor.is_healthy()

    def _fail_step(self, so, error: str) -> list[RequestOutput]:
        failed = {self.scheduler.seqs[s.seq_id].request for s in so.seqs if s.seq_id in self.scheduler.seqs}
        outs = []
        for request in failed:
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish_seq(seq, "error")
            self.metrics.inc("num_requests_failed")
            outs.append(self.outputs.finish_and_release(request, error=error))
        return outs

    def _fail_lora_loads(self, result: StepResult) -> list[RequestOutput]:
        """Some adapter could not be loaded into its slot, so nothing ran: fail the
        requests on those adapters (and stop accepting them); every other
        scheduled sequence simply runs again next step."""
        failed: dict[int, str] = {}
        for err in result.lora_errors:
            adapter = self.lora.fail_slot(err.slot)
            if adapter is not None:
                failed[adapter.uid] = f"LoRA adapter {adapter.name!r} could not be loaded: {err.message}"
                log.error(failed[adapter.uid])
        outs = []
        for request in list(self.scheduler.requests.values()):
            if request.lora is None or request.lora.uid not in failed:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish_seq(seq, "error")
            self.metrics.inc("num_requests_failed")
            outs.append(self.outputs.finish_and_release(request, error=failed[request.lora.uid]))
        return outs

    def _record_step(self, seconds: float) -> None:
        m, st = self.metrics, self.scheduler.stats
        m.observe("step_seconds", seconds)
        queries, hits, preempt = st.prefix_queries_tokens, st.prefix_hits_tokens, st.num_preemptions
        q0, h0, p0 = self._last_stats
        m.inc("prefix_cache_queries_tokens", queries - q0)
        m.inc("prefix_cache_hits_tokens", hits - h0)
        m.inc("prefix_cache_gpu_hits_tokens", hits - h0)
        m.inc("num_preemptions", preempt - p0)
        self._last_stats = (queries, hits, preempt)
        m.set("num_requests_running", len({s.request.request_id for s in self.scheduler.running}))
        m.set("num_requests_waiting", len({s.request.request_id for s in self.scheduler.waiting}))
        m.set("kv_cache_usage_perc", self.kv.usage)
        m.set("num_cached_blocks", len(self.kv.tree))
        if self.lora is not None:
            st = self.lora.stats
            m.set("lora_slot_loads", st.slot_loads)
            m.set("lora_slot_evictions", st.slot_evictions)
            m.set("num_loras_loaded", len(self.lora.adapters))
            m.set("num_loras_resident", self.lora.num_resident)

    def shutdown(self) -> None:
        self.executor.shutdown()
