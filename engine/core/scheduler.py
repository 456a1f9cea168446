"""Continuous batching with chunked prefill, prefix-cache lookup and preemption.

Every step spends a token budget: first on running sequences (a decode token
each, or the next chunk of an unfinished prefill), oldest first, preempting
the youngest running sequence when blocks run out; then on waiting sequences
in arrival order (FCFS), each looked up in the prefix cache before its blocks
are allocated. The output names token ids and block ids only.

``schedule_policy`` "sjf" admits the waiting prompts with the fewest uncached
tokens first, and ``prefill_step_tokens`` keeps a step's prefill small: where a
step's time grows with its tokens (CPU), a mostly-cached prompt then gets its
first token one short step after arriving instead of after every long prefill
queued with it. A prompt waiting over ``max_wait_s`` goes first regardless.

Preemption drops a sequence's KV and requeues it; its cached blocks stay in
the tree, so the re-prefill usually hits them. ``preemption_mode`` "swap" (the
default with a CPU tier) lets those blocks move to the CPU tier and come back
as a CPU-tier hit; "recompute" keeps them device-only: once evicted, they are
computed again.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from radixserve.engine.cache.cpu_tier import Transfer
from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.cache.peer import Pull
from radixserve.engine.config import SchedulerConfig
from radixserve.engine.core.metrics import EngineMetrics
from radixserve.engine.core.scheduler_output import (
    NewSampler,
    SampledToken,
    SampleRow,
    ScheduledSeq,
    SchedulerOutput,
    StepResult,
)
from radixserve.engine.core.sequence import Request, SeqStatus, Sequence
from radixserve.engine.sampling_params import check_stop_token

if TYPE_CHECKING:
    from radixserve.engine.lora.manager import LoRAManager


def _priority(seq: Sequence) -> tuple[float, int]:
    return (seq.request.arrival_time, seq.seq_id)


# On CPU a step costs ~1 ms a token past a ~40 ms weight pass (smollm2, 2 cores): a mostly-cached
# prompt (a few dozen new tokens) shares its step with other short ones, not with a full prompt of
# a few hundred (measured: with 256, a 150-token RAG prompt joined two 28-token ones and delayed them).
CPU_PREFILL_STEP_TOKENS = 128


def for_device(config: SchedulerConfig, on_cpu: bool) -> SchedulerConfig:
    """Resolve the device-dependent defaults: sjf and a small prefill step on CPU, where a step's
    time grows with its tokens; fcfs and the whole budget on CUDA, where batching prefills is cheap."""
    policy = config.schedule_policy if config.schedule_policy != "auto" else ("sjf" if on_cpu else "fcfs")
    cap = config.prefill_step_tokens
    if cap is None:
        cap = min(CPU_PREFILL_STEP_TOKENS, config.max_num_batched_tokens) if on_cpu else config.max_num_batched_tokens
    return replace(config, schedule_policy=policy, prefill_step_tokens=cap)


def preempts_by_swap(mode: str, has_cpu_tier: bool) -> bool:
    """Resolve ``SchedulerConfig.preemption_mode``: auto is swap with a CPU tier."""
    if mode == "swap" and not has_cpu_tier:
        raise ValueError("preemption_mode='swap' moves preempted blocks to the CPU tier, but there is "
                         "none: set swap_space > 0 (or num_cpu_blocks > 0), or use preemption_mode="
                         "'recompute' or 'auto'")
    return mode == "swap" or (mode == "auto" and has_cpu_tier)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 eos_token_ids: frozenset[int], lora: LoRAManager | None = None,
                 metrics: EngineMetrics | None = None):
        self.config = config
        self.kv = kv
        # Built directly (tests, tools), "auto" and None keep plain FCFS over the whole budget;
        # the engine passes a config resolved by for_device.
        self.sjf = config.schedule_policy == "sjf"
        self.prefill_cap = config.prefill_step_tokens or config.max_num_batched_tokens
        self.swap_preempted = preempts_by_swap(config.preemption_mode, kv.has_cpu_tier)
        self.lora = lora  # adapter slots; None when LoRA is disabled
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by priority (arrival, seq id)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self.metrics = metrics or EngineMetrics()  # preemptions and prefix hits, counted as they happen
        self._step_id = 0
        self._has_sampler: set[int] = set()  # seq ids rank 0 holds sampling state for
        self._finished_ids: list[int] = []
        self._pending_copies: list[tuple[int, int]] = []
        self.swapping: dict[int, Sequence] = {}  # seq id -> sequence waiting for its swap-in (or peer pull)
        self.peer_enabled = False  # the engine sets it when it can import (a cache queue and a fetcher)
        self.pull_worth: Callable[[int], bool] = lambda blocks: True  # the engine's PullEstimate.worth
        self.pull_timeout_s = 10.0

    # -- requests ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        if request.lora is not None:
            self._loras().acquire(request.lora)
        for seq in request.seqs:
            self.seqs[seq.seq_id] = seq
        head, *children = request.seqs
        head.status = SeqStatus.WAITING
        for child in children:
            child.status = SeqStatus.FORK_PENDING
        self.waiting.append(head)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, "abort")
        self.metrics.inc("num_requests_aborted")
        return request

    def finish_request(self, request: Request, reason: str) -> None:
        """Finish every unfinished sequence of ``request`` (abort, engine error)."""
        for seq in request.seqs:
            if not seq.is_finished:
                self.finish_seq(seq, reason)

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        assert not seq.is_finished, "a sequence finished twice"
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SeqStatus.SWAPPING_IN:
            del self.swapping[seq.seq_id]
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.request.num_finished += 1
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.seq_id in self._has_sampler:
            self._has_sampler.discard(seq.seq_id)
            self._finished_ids.append(seq.seq_id)
        if seq.request.is_finished:
            seq.request.finished_time = time.monotonic()

    def pop_finished_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id)
        for seq in request.seqs:
            self.seqs.pop(seq.seq_id, None)
        if request.lora is not None:
            self._loras().release(request.lora)

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens admitted or queued but not computed yet: the queue a
        newly routed request would wait behind (the cluster router reads it)."""
        waiting = sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)
        running = sum(s.num_uncomputed - 1 for s in self.running if s.num_uncomputed > 1)
        return waiting + running

    def _loras(self) -> LoRAManager:
        """The adapter manager; a request on an adapter is only accepted with LoRA on."""
        assert self.lora is not None, "a LoRA request on an engine without LoRA"
        return self.lora

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapping or self._finished_ids
                    or self._pending_copies)

    # -- scheduling ----------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        """Drop the KV and requeue at the front (see the module docstring)."""
        self.running.remove(seq)
        self.kv.free(seq, demote=self.swap_preempted)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.metrics.inc("num_preemptions")
        self.metrics.inc("num_preemptions_swap" if self.swap_preempted else "num_preemptions_recompute")

    def _schedule_running(self, budget: int, out: list[tuple[Sequence, int]]) -> tuple[int, bool]:
        preempted = False
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            n = seq.num_uncomputed
            if n > budget and not self.config.enable_chunked_prefill:
                continue
            n = min(n, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SeqStatus.RUNNING:
                out.append((seq, n))
                budget -= n
        return budget, preempted

    def _seats(self, seq: Sequence) -> int:
        """Running slots a waiting sequence takes, counting n>1 children to fork."""
        return 1 + sum(1 for c in seq.request.seqs
                       if c.parent is seq and c.status == SeqStatus.FORK_PENDING)

    def _inflight_hashes(self) -> set[int]:
        """Block hashes that running prefills are computing but have not committed yet."""
        inflight = self.kv.swapping_in_hashes()
        for seq in self.running:
            if seq.num_uncomputed > 1:
                inflight.update(seq.block_hashes[seq.num_computed_tokens // self.kv.block_size:])
        return inflight

    def _overdue(self, seq: Sequence, now: float) -> bool:
        return now - seq.request.arrival_time > self.config.max_wait_s

    @staticmethod
    def _wants_prompt_logprobs(seq: Sequence) -> bool:
        """Prompt logprobs need every prompt position computed: such a prompt skips the cache."""
        return seq.request.params.prompt_logprobs is not None and seq.request.prompt_logprobs is None

    def _uncached(self, seq: Sequence) -> int:
        cached = 0 if self._wants_prompt_logprobs(seq) else self.kv.lookup(seq).num_tokens(self.kv.block_size)
        return seq.num_tokens - seq.num_computed_tokens - cached

    def _order_waiting(self, now: float) -> None:
        """sjf: overdue prompts first (arrival order), then fewest uncached tokens first."""
        if not self.sjf or len(self.waiting) < 2:
            return
        key = {s.seq_id: (0, 0) if self._overdue(s, now) else (1, self._uncached(s)) for s in self.waiting}
        self.waiting = deque(sorted(self.waiting, key=lambda s: (*key[s.seq_id], *_priority(s))))

    def _over_cap(self, prefill: int, n: int) -> bool:
        """Whether ``n`` more prefill tokens would take the step's admissions past the cap (no
        starvation: the head of the queue, overdue prompts first, is always admitted)."""
        return prefill > 0 and prefill + n > self.prefill_cap

    def _schedule_waiting(self, budget: int, out: list[tuple[Sequence, int]]) -> int:
        now = time.monotonic()
        self._order_waiting(now)
        # Prefill tokens admitted from the queue this step. A running prompt's next chunk is not
        # counted: it computes this step whatever is admitted, so a short prompt joining it waits
        # for nothing it would not wait for anyway.
        prefill = 0
        # Seats taken: running sequences plus the n>1 children they will fork into.
        used = sum(self._seats(s) for s in self.running) + len(self.swapping)
        inflight = self._inflight_hashes() if self.kv.enable_prefix_caching else set()
        # LoRA: adapters of running (or swapping-in) sequences keep their slots (uids)
        pinned = {s.request.lora.uid for s in [*self.running, *self.swapping.values()]
                  if s.request.lora is not None}
        deferred: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.request.grammar_pending:  # its grammar is compiling: let the others go first
                deferred.append(self.waiting.popleft())
                continue
            seats = self._seats(seq)
            if used + seats > self.config.max_num_seqs:
                break
            hit = None if self._wants_prompt_logprobs(seq) else self.kv.lookup(seq)
            hit_blocks = hit.num_blocks if hit else 0
            if (hit is not None and hit_blocks < len(seq.block_hashes)
                    and seq.block_hashes[hit_blocks] in inflight and len(deferred) < self.config.max_num_seqs):
                # Its next block is being computed by another prefill right now:
                # wait a step and hit it, instead of computing the same prefix twice.
                deferred.append(self.waiting.popleft())
                continue
            hit_tokens = hit_blocks * self.kv.block_size
            remote = self._remote_blocks(seq, hit_blocks) if hit is not None and not hit.cpu_nodes else 0
            swap_in = (hit is not None and bool(hit.cpu_nodes)) or remote > 0
            # A sequence that must swap in (or pull from a peer) computes nothing
            # this step: its tokens get blocks once it runs.
            n = 0 if swap_in else min(seq.num_tokens - hit_tokens, budget)
            if n < seq.num_tokens - hit_tokens and not swap_in and not self.config.enable_chunked_prefill:
                break
            if self._over_cap(prefill, n):
                break  # sjf: the prompts after it are no shorter; fcfs: none overtakes it
            lora = seq.request.lora
            if lora is not None and not self._loras().can_reserve(lora, pinned):
                # Every slot is pinned by running adapters: let later requests (base
                # model, resident adapters) go first; this one retries next step.
                deferred.append(self.waiting.popleft())
                continue
            # A swap-in also takes the blocks of its uncached suffix now: admitting
            # others into them would force a preemption the moment it runs.
            if not self.kv.allocate(seq, seq.num_tokens - hit_tokens if swap_in else n, hit):
                break
            self.waiting.popleft()
            used += seats
            if lora is not None:
                self._loras().reserve_slot(lora, pinned)
                pinned.add(lora.uid)
            if self.kv.enable_prefix_caching:
                inflight.update(seq.block_hashes[hit_blocks:])
            if remote:  # its hit is counted when the pull ends (finish_pull)
                hint, seq.request.peer_hint = seq.request.peer_hint, None  # one try: a failed pull recomputes
                assert hint is not None
                self.kv.peer.start_pull(seq, hint, hit_blocks, remote, time.monotonic() + self.pull_timeout_s)
            elif seq.num_cached_tokens < 0:  # first admission: this is the request's prefix hit
                seq.num_cached_tokens = hit_tokens
                seq.num_cpu_cached_tokens = len(hit.cpu_nodes) * self.kv.block_size if hit else 0
                self._count_prefix_hit(seq)
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = time.monotonic()
            if swap_in:
                seq.status = SeqStatus.SWAPPING_IN
                self.swapping[seq.seq_id] = seq
                continue
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_priority)
            out.append((seq, n))
            budget -= n
            prefill += n
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _count_prefix_hit(self, seq: Sequence) -> None:
        m, cpu, remote = self.metrics, seq.num_cpu_cached_tokens, seq.num_remote_cached_tokens
        m.inc("prefix_cache_queries_tokens", seq.num_tokens)
        m.inc("prefix_cache_hits_tokens", seq.num_cached_tokens)
        m.inc("prefix_cache_gpu_hits_tokens", seq.num_cached_tokens - cpu - remote)
        m.inc("prefix_cache_cpu_hits_tokens", cpu)
        m.inc("prefix_cache_remote_hits_tokens", remote)

    # -- peer KV (engine/cache/peer.py) ------------------------------------------

    def _remote_blocks(self, seq: Sequence, hit_blocks: int) -> int:
        """Blocks past the local hit a peer could give this sequence (0: none, or no pull now)."""
        hint = seq.request.peer_hint
        if hint is None or seq.index != 0 or not self.peer_enabled or seq.num_cached_tokens >= 0:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.kv.block_size  # the last token is always computed
        count = min(hint.num_blocks, max_blocks) - hit_blocks
        return count if count > 0 and self.kv.peer.can_pull() and self.pull_worth(count) else 0

    def finish_pull(self, pull: Pull, num_in: int) -> None:
        """A pull ended with its first ``num_in`` blocks written (0: failed). The
        sequence runs from there, recomputing whatever did not come, in its own blocks."""
        seq = pull.seq
        if self.kv.peer.finish(pull) or seq.status != SeqStatus.SWAPPING_IN:
            return
        bs = self.kv.block_size
        seq.num_computed_tokens = (pull.first + num_in) * bs
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_remote_cached_tokens = num_in * bs
        self._count_prefix_hit(seq)
        self.kv.commit(seq)
        del self.swapping[seq.seq_id]
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=_priority)

    def schedule(self) -> SchedulerOutput:
        self._step_id += 1
        chosen: list[tuple[Sequence, int]] = []
        budget, preempted = self._schedule_running(self.config.max_num_batched_tokens, chosen)
        if not preempted:  # admitting while preempting would thrash the pool
            self._schedule_waiting(budget, chosen)
        out = SchedulerOutput(step_id=self._step_id, finished_seq_ids=self._finished_ids,
                              block_copies=self._pending_copies,
                              lora_loads=self.lora.take_loads() if self.lora is not None else [])
        transfers = self.kv.plan_transfers()  # copy out reused blocks first, write back the next ones
        out.transfers_before_forward.extend(transfers.before_forward)
        out.wait_transfers.extend(transfers.wait)
        self._finished_ids, self._pending_copies = [], []
        for seq, n in chosen:
            self._emit(seq, n, out)
        return out

    def _emit(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        want_plp = (seq.request.params.prompt_logprobs is not None and seq.index == 0
                    and seq.request.prompt_logprobs is None and start < seq.prompt_len)
        end = start + n
        lora_slot = -1
        if seq.request.lora is not None:
            slot = seq.request.lora.slot
            assert slot is not None, "a scheduled LoRA sequence must hold a slot"
            lora_slot = slot
            self._loras().touch(seq.request.lora)
        out.seqs.append(ScheduledSeq(
            seq.seq_id, seq.token_ids[start:end], start, list(seq.block_ids),
            seq.request.params.prompt_logprobs if want_plp else None,
            seq.token_ids[end] if want_plp and end < seq.prompt_len else -1, lora_slot))
        if end < seq.num_tokens:
            return  # a prefill chunk that is not the last one: nothing to sample
        source = len(out.seqs) - 1
        samplers = [seq] + [c for c in seq.request.seqs if c.parent is seq and c.status == SeqStatus.FORK_PENDING]
        for s in samplers:
            out.sample_rows.append(SampleRow(s.seq_id, source))
            if s.seq_id not in self._has_sampler:
                self._has_sampler.add(s.seq_id)
                out.new_samplers.append(NewSampler(
                    s.seq_id, seq.request.params, seq.request.prompt_token_ids,
                    s.output_token_ids, child_index=s.index))

    # -- results -------------------------------------------------------------

    def update(self, out: SchedulerOutput, result: StepResult) -> list[tuple[Sequence, SampledToken]]:
        """Advance sequences by a finished step; returns those that got a token."""
        for ss in out.seqs:
            seq = self.seqs.get(ss.seq_id)
            if seq is None or seq.status != SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens = ss.start_pos + len(ss.token_ids)
            self.kv.commit(seq)
        updated = []
        now = time.monotonic()
        for st in result.sampled:
            seq = self.seqs.get(st.seq_id)
            if seq is None or seq.is_finished:
                continue
            if seq.status == SeqStatus.FORK_PENDING:
                self._fork(seq)
            seq.append_token(st.token_id)
            seq.cumulative_logprob += st.logprob
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            updated.append((seq, st))
            self._check_token_stop(seq, st.token_id)
        return updated

    def _fork(self, child: Sequence) -> None:
        parent = child.parent
        assert parent is not None, "only an n>1 child waits to fork"
        try:
            self._pending_copies.extend(self.kv.fork(parent, child))
            child.status = SeqStatus.RUNNING
            bisect.insort(self.running, child, key=_priority)
        except RuntimeError:  # no block to copy into: re-prefill later (prefix hits make it cheap)
            child.num_computed_tokens = 0
            child.status = SeqStatus.WAITING
            self.waiting.appendleft(child)
        child.num_cached_tokens = parent.num_cached_tokens
        child.num_cpu_cached_tokens = parent.num_cpu_cached_tokens

    def _check_token_stop(self, seq: Sequence, token_id: int) -> None:
        reason = check_stop_token(token_id, seq.request.params, self.eos_token_ids,
                                  seq.num_output_tokens)
        if reason is not None:
            stop_reason = token_id if reason == "stop" and token_id not in self.eos_token_ids else None
            self.finish_seq(seq, reason, stop_reason)
        elif seq.num_tokens >= self.max_model_len:
            self.finish_seq(seq, "length")

    def take_transfers(self) -> list[Transfer]:
        """Transfers started since the last call, for the cache queue."""
        return self.kv.take_transfers()

    def apply_transfer(self, task_id: int, ok: bool) -> tuple[Transfer, Sequence | None]:
        """A transfer finished on every rank. Returns (the Transfer, the sequence
        whose swap-in failed -- already finished with "error" -- or None)."""
        t = self.kv.complete_transfer(task_id, ok)
        seq = t.seq
        if seq is None or t.orphaned or seq.status != SeqStatus.SWAPPING_IN:
            return t, None
        if not ok:
            self.finish_seq(seq, "error")
            return t, seq
        del self.swapping[seq.seq_id]
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=_priority)
        return t, None

    def reset_worker_state(self) -> None:
        """Workers restarted: they hold no sampling state and owe no copies."""
        self._has_sampler.clear()
        self._finished_ids.clear()
        self._pending_copies.clear()
        if self.lora is not None:
            self.lora.reset_slots()
