"""The synchronous engine: requests in, one scheduler step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Sequence as Seq

from radixserve.engine.cache.events import EventLog, Snapshot
from radixserve.engine.cache.hashing import cache_namespace, root_hash
from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.cache.peer import KVExport, PeerHint
from radixserve.engine.cache.transfer import CacheTransferClient
from radixserve.engine.config import EngineConfig
from radixserve.engine.core.metrics import EngineMetrics, StatsLogger
from radixserve.engine.core.output_processor import OutputProcessor
from radixserve.engine.core.peer_driver import PeerDriver, PeerFetcher
from radixserve.engine.core.scheduler import Scheduler, for_device
from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult
from radixserve.engine.core.sequence import Request, Sequence
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.executor.base import Executor, UniprocExecutor, WorkerFailure
from radixserve.engine.executor.protocol import TransferTask, WorkerSpec
from radixserve.engine.lora.request import LoRARequest
from radixserve.engine.model.default_models import resolve_model
from radixserve.engine.model.hf_config import generation_defaults, load_arch_config
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.structured.manager import StructuredOutputManager
from radixserve.engine.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
_RESTART_ATTEMPTS = 3  # fresh worker groups tried after a failure before the engine gives up


class LLMEngine:
    def __init__(self, config: EngineConfig, launcher=None, engine_id: str | None = None,
                 peer_fetcher: PeerFetcher | None = None):
        """``launcher`` starts tensor-parallel workers (default: local processes);
        ``engine_id`` names this engine in its block events (default: random);
        ``peer_fetcher`` gets a prefix's KV from another replica (engine/core/peer_driver.py)."""
        self.config = config
        self.launcher = launcher
        self.engine_id = engine_id or uuid.uuid4().hex[:12]
        self.dead: str | None = None  # set when the workers could not be restarted
        self.model_dir = resolve_model(config.model.model, config.model.cache_dir, config.model.revision)
        self.arch = load_arch_config(self.model_dir)
        self.tokenizer = load_tokenizer(config.model, self.model_dir)
        # Request defaults for fields a request leaves unset (the model's generation_config.json).
        self.default_sampling = generation_defaults(self.model_dir, config.model.generation_config)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.block_size = config.cache.block_size
        self.max_model_len = self._max_model_len()
        check_host_memory(config)
        self.metrics = EngineMetrics(config.model.model)  # shared: each component counts what it does
        self.stats_logger = StatsLogger(self.metrics, config.log_stats_interval_s)
        self.lora = None  # LoRAManager with enable_lora
        if config.lora.enable_lora:
            from radixserve.engine.lora.manager import LoRAManager
            self.lora = LoRAManager(config.lora, self.arch, lambda ns: self.kv.drop_namespace(ns), self.metrics)
            for name, path in config.lora.lora_modules:  # validated before any worker starts
                self.lora.load(LoRARequest(name, path))
        self.executor = self._make_executor()
        self.transfers: CacheTransferClient | None = None
        try:
            num_cpu_blocks = self._init_pools(peer_kv=peer_fetcher is not None)
        except BaseException:
            self.shutdown()
            raise
        # A lone sequence must always fit the pool, or preemption could loop forever.
        self.max_model_len = min(self.max_model_len, self.executor.num_blocks * self.block_size)
        self.events = EventLog(self.engine_id)
        self.kv = self._make_kv(num_cpu_blocks)
        self.scheduler = Scheduler(for_device(config.scheduler, runs_on_cpu(config.device)), self.kv,
                                   self.max_model_len, self.eos_token_ids, self.lora, self.metrics)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler, self.metrics)
        self.structured = StructuredOutputManager(self.tokenizer, self.arch.vocab_size, self.eos_token_ids,
                                                  config.structured_outputs, self.metrics)
        self._seq_ids = itertools.count()
        self.peer = PeerDriver(self, peer_fetcher)

    def _init_pools(self, peer_kv: bool) -> int:
        """Size the CPU tier from what a block weighs on each rank, start the
        cache queue, and have every rank allocate its pools."""
        cache, par = self.config.cache, self.config.parallel
        num_cpu = cache.num_cpu_blocks
        if num_cpu is None:
            num_cpu = int(cache.swap_space * 2**30) // self.executor.block_bytes
        if not num_cpu and self.config.scheduler.preemption_mode == "swap":  # before the workers allocate
            raise ValueError(f"preemption_mode='swap' needs a CPU tier, but swap_space = {cache.swap_space} GiB "
                             f"holds no {self.executor.block_bytes}-byte block")
        if num_cpu or peer_kv:  # peer KV moves bytes over the cache queue too
            self.transfers = CacheTransferClient(par.worker_host, par.cache_queue_port, par.tensor_parallel_size,
                                                 self.executor.auth, self.executor.epoch)
        address = self.transfers.address if self.transfers else ""
        self.executor.init_cache(self.executor.num_blocks, num_cpu, address)
        if self.transfers:
            self.transfers.wait_connected(par.worker_timeout_s)
        return num_cpu

    def _make_kv(self, num_cpu_blocks: int) -> KVCacheManager:
        sched = self.config.scheduler
        # Keep one step's worth of allocations written back ahead of eviction.
        window = min(self.executor.num_blocks // 2,
                     sched.max_num_batched_tokens // self.block_size + sched.max_num_seqs)
        return KVCacheManager(self.executor.num_blocks, self.block_size,
                              self.config.cache.enable_prefix_caching, num_cpu_blocks, self.events,
                              demote_window=window, max_pulls=self.config.cache.max_concurrent_pulls)

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
        from radixserve.engine.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(self.config, self._worker_spec, self.launcher)

    # -- requests ----------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None = None,
                    params: SamplingParams | None = None, prompt_token_ids: Seq[int] | None = None,
                    namespace: Seq[str] = (), arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None, peer_hint: PeerHint | None = None) -> Request:
        """Validate and queue a request; raises ValueError with a clear message.

        With ``lora_request`` the request runs on that adapter (loaded from its
        path first if needed) and its blocks live in the adapter's namespace.
        """
        if self.dead is not None:
            raise RuntimeError(f"engine is down: {self.dead}")
        params = params or SamplingParams(**self.default_sampling)  # the model's generation_config
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        self.validate_prompt(ids)
        self.validate_params(params)
        adapter = self.resolve_lora(lora_request) if lora_request is not None else None
        namespace = cache_namespace(adapter.namespace if adapter is not None else None, namespace)
        request = Request(request_id, prompt, ids, params, namespace,
                          arrival_time if arrival_time is not None else time.monotonic(), lora=adapter)
        request.peer_hint = peer_hint
        self._make_seqs(request)
        self.scheduler.add_request(request)
        self.outputs.add_request(request)
        self.structured.add_request(request)  # its grammar compiles off this thread; it waits for it
        return request

    def validate_params(self, params: SamplingParams) -> None:
        """A request whose sequences can never run together is refused, not queued forever."""
        over = params.over_seq_limit(self.config.scheduler.max_num_seqs)
        if over is not None:
            raise ValueError(over[1])
        if params.structured_outputs is not None:
            # Builds the grammar now (a bad one is a ValueError naming the problem) and
            # starts its compile, so add_request finds it cached.
            self.structured.prepare(params.structured_outputs)

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
        return self.outputs.finish_and_release(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests) or self.scheduler.has_work()

    # -- stepping ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        failed = []
        if self.structured.has_pending:  # requests whose grammar compiled become schedulable
            failed = [self._fail_request(r, err) for r, err in self.structured.poll()]
        outputs = self._step()
        self.structured.release_finished()
        return failed + outputs

    def _step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        so = self.scheduler.schedule()
        so.grammar_mask = self.structured.fill_mask(so)
        try:
            self.peer.start()
            self.peer.poll()
            self._send_transfers()
            if so.is_empty and not so.finished_seq_ids:
                # Nothing to compute: maybe swap-ins are running. Wait a little for them.
                return self._finish_transfers(wait_s=0.005) + self.outputs.drain_finished()
            result = self.executor.execute(so)
            failed = self._finish_transfers(wait_for=so.wait_transfers)
        except (WorkerFailure, TimeoutError) as exc:
            log.error("workers failed: %s", exc)
            return self._recover(str(exc))
        except Exception as exc:  # a bug or OOM in this step: fail its requests, keep serving
            log.exception("engine step failed")
            result, failed = StepResult(so.step_id, error=f"{type(exc).__name__}: {exc}"), []
        if result.lora_errors:
            return failed + self._fail_lora_loads(result)
        if result.error is not None:
            if self.lora is not None:  # whether the workers applied this step's loads is unknown
                for ld in so.lora_loads:
                    self.lora.invalidate_slot(ld.slot)
            return failed + self._fail_step(so, result.error)
        updated = self.scheduler.update(so, result)
        self.structured.accept(updated, self.scheduler.finish_seq)
        outputs = failed + self.outputs.process(updated, result.prompt_logprobs)
        seconds = time.perf_counter() - start
        self._record_step(seconds)
        self.peer.estimate.note_step(seconds, sum(len(s.token_ids) for s in so.seqs if len(s.token_ids) > 1))
        self.stats_logger.maybe_log()
        return outputs

    def _send_transfers(self) -> None:
        for t in self.scheduler.take_transfers():
            self.transfers.send(TransferTask(t.task_id, t.kind, t.gpu_blocks, t.cpu_blocks))

    def _finish_transfers(self, wait_for: list[int] = (), wait_s: float = 0.0) -> list[RequestOutput]:
        """Apply finished transfers; outputs for requests whose swap-in failed."""
        if self.transfers is None:
            if wait_s:
                time.sleep(wait_s)  # idle without a CPU tier: nothing will arrive
            return []
        done = self.peer.early + self.transfers.poll(set(wait_for), self.config.parallel.worker_timeout_s)
        self.peer.early = []
        if not done and wait_s:
            if self.kv.has_inflight_transfers or self.peer.writing:
                self.transfers.wait_any(0.05)  # returns as soon as an ack arrives
                done = self.transfers.poll()
            else:
                time.sleep(wait_s)
        outs = []
        for d in done:
            if self.peer.on_done(d):
                continue
            t, seq = self.scheduler.apply_transfer(d.task_id, d.ok)
            if d.ok:
                self.metrics.inc(f"{t.kind}_blocks", len(t.gpu_blocks))  # swap_in_blocks / swap_out_blocks
                self.metrics.inc(f"{t.kind}_bytes", d.num_bytes)
                self.metrics.observe("cache_transfer_seconds", d.seconds)
            if seq is not None:  # its prefix could not be restored: fail the whole request
                outs.append(self._fail_request(seq.request, f"cache transfer failed: {d.error}"))
        return outs

    def _recover(self, error: str) -> list[RequestOutput]:
        """The workers lost their KV pools: fail every request, forget the
        cache, and restart the workers (or mark the engine dead)."""
        outs = [self._fail_request(r, f"worker failure: {error}") for r in list(self.scheduler.requests.values())]
        self.scheduler.reset_worker_state()
        self.kv.clear_all()
        self.peer.reset()
        if self.lora is not None:  # new workers start with empty adapter slots
            self.lora.reset_slots()
        for attempt in range(1, _RESTART_ATTEMPTS + 1):
            try:
                self._restart_workers()
                break
            except Exception as exc:  # e.g. a rank killed again while loading: try a fresh group
                log.error("restarting the workers failed (attempt %d of %d): %s", attempt, _RESTART_ATTEMPTS, exc)
                if attempt == _RESTART_ATTEMPTS:
                    self.dead = f"workers failed ({error}) and could not be restarted: {exc}"
                    log.error(self.dead)
        return outs

    def _restart_workers(self) -> None:
        self.executor.restart()  # a new epoch: frames of the old group are dropped from here on
        if self.transfers is not None:
            self.transfers.reset(self.executor.epoch)
            self.transfers.wait_connected(self.config.parallel.worker_timeout_s)

    def is_healthy(self) -> bool:
        return self.dead is None and self.executor.is_healthy()

    def check_workers(self) -> None:
        """Restart a worker group that lost a rank while idle: no step would notice
        (steps run only with work queued), so the engine would stay unhealthy for good."""
        if self.dead is None and not self.has_unfinished_requests() and not self.executor.is_healthy():
            log.error("a worker exited while the engine was idle: restarting the group")
            self._recover("a worker exited while idle")

    def _fail_request(self, request: Request, error: str) -> RequestOutput:
        """End every unfinished sequence of ``request`` with "error"; its final output."""
        self.scheduler.finish_request(request, "error")
        self.metrics.inc("num_requests_failed")
        return self.outputs.finish_and_release(request, error=error)

    def _fail_step(self, so: SchedulerOutput, error: str) -> list[RequestOutput]:
        """The step raised: fail the requests it scheduled (each once, in step order)."""
        seqs = (self.scheduler.seqs.get(s.seq_id) for s in so.seqs)
        failed = {seq.request.request_id: seq.request for seq in seqs if seq is not None}
        return [self._fail_request(r, error) for r in failed.values()]

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
        return [self._fail_request(r, failed[r.lora.uid]) for r in list(self.scheduler.requests.values())
                if r.lora is not None and r.lora.uid in failed]

    def _record_step(self, seconds: float) -> None:
        """The step's time and the gauges. Counters are counted where things happen:
        preemptions and prefix hits in the scheduler, finished requests and tokens
        in the output processor, slot loads in the LoRA manager, failures and
        cache transfers here."""
        m = self.metrics
        m.observe("step_seconds", seconds)
        if self.kv.has_cpu_tier:
            m.set("cpu_cache_usage_perc", self.kv.cpu_usage)
        m.set("num_requests_running", len({s.request.request_id for s in self.scheduler.running}))
        m.set("num_requests_waiting", len({s.request.request_id for s in self.scheduler.waiting}))
        m.set("kv_cache_usage_perc", self.kv.usage)
        m.set("num_cached_blocks", self.kv.num_cached_blocks)
        if self.lora is not None:
            m.set("num_loras_loaded", len(self.lora.adapters))
            m.set("num_loras_resident", self.lora.num_resident)

    def snapshot(self) -> Snapshot:
        """Every cached block and its tiers, as of the last recorded event."""
        return self.kv.snapshot()

    def export_kv(self, block_hashes: list[int]) -> KVExport:
        """Peer KV: this engine's blocks of a chain (its longest cached prefix), for another replica."""
        return self.peer.export(block_hashes)

    def shutdown(self) -> None:
        if getattr(self, "peer", None) is not None:
            self.peer.shutdown()
        if getattr(self, "structured", None) is not None:
            self.structured.shutdown()
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown()
        if getattr(self, "transfers", None) is not None:
            self.transfers.close()


def runs_on_cpu(device: str) -> bool:
    """Whether the engine's device (EngineConfig.device) resolves to the CPU."""
    import torch
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def check_host_memory(config: EngineConfig) -> None:
    """Fail at startup, clearly, if the CPU tier cannot fit in host memory."""
    want = config.cache.swap_space * config.parallel.tensor_parallel_size
    if not want:
        return
    if not config.cache.enable_prefix_caching:
        raise ValueError("swap_space > 0 adds a CPU tier to the prefix cache; it needs "
                         "enable_prefix_caching=True")
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        available = int(meminfo["MemAvailable"].split()[0]) / 2**20  # kB -> GiB
    except (OSError, KeyError, ValueError):
        return  # not Linux: cannot check
    if want > available:
        raise ValueError(f"swap_space = {config.cache.swap_space} GiB per rank x "
                         f"{config.parallel.tensor_parallel_size} rank(s) = {want:.1f} GiB exceeds the "
                         f"{available:.1f} GiB of host memory available")
