"""The scheduler over a two-tier KV cache (no model): preemption modes and a state machine.

A "step" is what LLMEngine.step does around the workers: schedule, hand the
started transfers to the (fake) cache queue, complete the step's swap-outs
before it replies, feed back a fake token per sample row. Swap-ins stay in
flight until a rule completes (or fails) them, in any order, so sequences
really sit in SWAPPING_IN while others run, finish or are aborted.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from radixserve.engine.cache.cpu_tier import Transfer
from radixserve.engine.cache.events import BlockIndex, EventLog
from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.engine.core.scheduler import Scheduler
from radixserve.engine.core.scheduler_output import SampledToken, StepResult
from radixserve.engine.core.sequence import SeqStatus, Sequence
from radixserve.engine.sampling_params import SamplingParams
from tests.cpu.helpers import BS, EOS, make_request, tree_tiers


def tier_scheduler(mode: str, num_blocks: int = 10, num_cpu_blocks: int = 24, budget: int = 24,
                   max_seqs: int = 4, max_len: int = 40, events: EventLog | None = None) -> Scheduler:
    window = min(num_blocks // 2, budget // BS + max_seqs)  # as LLMEngine sizes it
    kv = KVCacheManager(num_blocks, BS, True, num_cpu_blocks=num_cpu_blocks, events=events,
                        demote_window=window)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, preemption_mode=mode)
    return Scheduler(cfg, kv, max_len, frozenset({EOS}))


def step(sched: Scheduler, rng: random.Random, swap_out_ok: bool = True) -> list[Transfer]:
    """One engine step; returns the swap-ins it started (still in flight)."""
    so = sched.schedule()
    swap_ins = []
    for t in sched.take_transfers():
        if t.task_id in so.wait_transfers:
            sched.apply_transfer(t.task_id, swap_out_ok)  # done before the step replies
        else:
            swap_ins.append(t)
    sampled = [SampledToken(r.seq_id, rng.randrange(EOS, 12), -1.0) for r in so.sample_rows]
    sched.update(so, StepResult(so.step_id, sampled))
    for rid in [r for r, req in sched.requests.items() if req.is_finished]:
        sched.pop_finished_request(rid)
    return swap_ins


def complete_swap_in(sched: Scheduler, t: Transfer, ok: bool) -> None:
    """What LLMEngine._finish_transfers does with one acknowledged swap-in."""
    _, failed = sched.apply_transfer(t.task_id, ok)
    if failed is not None:  # the whole request fails
        for other in failed.request.seqs:
            if not other.is_finished:
                sched.finish_seq(other, "error")


def drain(sched: Scheduler, rng: random.Random, pending: list[Transfer], max_steps: int = 2000) -> int:
    """Run every request to the end, swap-ins completing right away; returns
    how many blocks were swapped in."""
    swapped_in = 0
    for _ in range(max_steps):
        for t in pending:
            complete_swap_in(sched, t, True)
            swapped_in += len(t.gpu_blocks)
        pending.clear()
        if not sched.has_work():
            return swapped_in
        pending += step(sched, rng)
    raise AssertionError("scheduler did not drain")


def live_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for s in sched.seqs.values() if s.block_ids and not s.is_finished]


def run_preempting(mode: str) -> tuple[Scheduler, int]:
    # 8 device blocks of 4 tokens: two sequences growing to 6 blocks each cannot both fit.
    sched = tier_scheduler(mode, num_blocks=8, num_cpu_blocks=32, budget=64, max_len=64)
    rng = random.Random(1)
    for i, arrival in enumerate((0, 1)):
        req = make_request([20 * (i + 1) + j for j in range(12)],
                           SamplingParams(max_tokens=12, ignore_eos=True), arrival=arrival)
        sched.add_request(req)
    swapped_in = drain(sched, rng, [])
    sched.kv.check_invariants([])
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.kv.num_free_cpu_blocks == sched.kv.num_cpu_blocks
    return sched, swapped_in


def test_swap_preemption_brings_blocks_back_from_the_cpu_tier():
    sched, swapped_in = run_preempting("swap")
    m = sched.metrics.snapshot()
    assert m["num_preemptions"] == m["num_preemptions_swap"] > 0 and m["num_preemptions_recompute"] == 0
    assert swapped_in > 0  # the preempted sequence came back with a CPU-tier hit


def test_recompute_preemption_keeps_blocks_off_the_cpu_tier():
    sched, swapped_in = run_preempting("recompute")
    m = sched.metrics.snapshot()
    assert m["num_preemptions"] == m["num_preemptions_recompute"] > 0 and m["num_preemptions_swap"] == 0
    # The prompts are distinct and never reused: only a preempted sequence's own
    # blocks could come back from the CPU tier, and recompute never demotes them.
    assert swapped_in == 0


def test_auto_mode_is_swap_with_a_cpu_tier_else_recompute():
    assert tier_scheduler("auto").swap_preempted
    kv = KVCacheManager(8, BS, True)
    assert not Scheduler(SchedulerConfig(preemption_mode="auto"), kv, 32, frozenset({EOS})).swap_preempted
    with pytest.raises(ValueError, match="preemption_mode='swap'.*swap_space > 0"):
        Scheduler(SchedulerConfig(preemption_mode="swap"), kv, 32, frozenset({EOS}))


def test_swap_mode_needs_a_cpu_tier_in_the_config():
    with pytest.raises(ValueError, match="preemption_mode='swap'.*swap_space > 0"):
        EngineConfig(scheduler=SchedulerConfig(preemption_mode="swap"))
    with pytest.raises(ValueError, match="preemption_mode='swap'"):  # num_cpu_blocks wins over swap_space
        EngineConfig(cache=CacheConfig(swap_space=1, num_cpu_blocks=0),
                     scheduler=SchedulerConfig(preemption_mode="swap"))
    EngineConfig(cache=CacheConfig(num_cpu_blocks=8), scheduler=SchedulerConfig(preemption_mode="swap"))
    EngineConfig(scheduler=SchedulerConfig(preemption_mode="recompute"))


class SchedulerTierMachine(RuleBasedStateMachine):
    """Requests with shared prefixes over 10 device and 24 CPU blocks."""

    swapping_in_seen = 0  # runs (over all examples) that had a sequence in SWAPPING_IN

    @initialize(mode=st.sampled_from(["swap", "recompute"]), seed=st.integers(0, 2**16))
    def setup(self, mode, seed):
        self.log = EventLog("m")
        self.sched = tier_scheduler(mode, events=self.log)
        self.kv = self.sched.kv
        self.index = BlockIndex()
        self.rng = random.Random(seed)
        self.pending: list[Transfer] = []  # swap-ins in flight
        self.seen_swapping = False

    @rule(prefix=st.integers(0, 2), extra=st.integers(1, 12), n=st.integers(1, 2),
          max_tokens=st.integers(1, 16))
    def add(self, prefix, extra, n, max_tokens):
        tokens = [40 + prefix] * 8 + [prefix * 10 + 20 + i for i in range(extra)]
        self.sched.add_request(make_request(tokens, SamplingParams(n=n, max_tokens=max_tokens)))

    @rule(steps=st.integers(1, 4), swap_out_ok=st.booleans())
    def step(self, steps, swap_out_ok):
        for _ in range(steps):
            self.pending += step(self.sched, self.rng, swap_out_ok)
        if self.sched.swapping and not self.seen_swapping:
            self.seen_swapping = True
            SchedulerTierMachine.swapping_in_seen += 1
            event("a sequence waited in SWAPPING_IN")

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def complete_swap_in(self, data, ok):
        t = data.draw(st.sampled_from(self.pending))  # swap-ins may finish in any order
        self.pending.remove(t)
        complete_swap_in(self.sched, t, ok)

    @rule(data=st.data())
    def abort(self, data):
        if self.sched.requests:
            # insertion order, not sorted ids: ids come from a global counter, and
            # the same draw must pick the same request when hypothesis replays it
            self.sched.abort_request(data.draw(st.sampled_from(list(self.sched.requests))))

    @rule(data=st.data())
    def finish(self, data):
        # A stop string ends a running sequence early (after one of its tokens).
        seqs = [q for q in self.sched.running if q.num_output_tokens]
        if seqs:
            self.sched.finish_seq(data.draw(st.sampled_from(seqs)), "stop")

    @invariant()
    def consistent(self):
        s, kv = self.sched, self.kv
        kv.check_invariants(live_seqs(s))  # both tiers: ref counts, free queues, tree shape
        assert all(q.status == SeqStatus.RUNNING for q in s.running)
        assert all(q.status == SeqStatus.WAITING and not q.block_ids for q in s.waiting)
        assert all(q.status == SeqStatus.SWAPPING_IN and kv.is_swapping_in(q) for q in s.swapping.values())
        assert len(s.running) + len(s.swapping) <= s.config.max_num_seqs
        # a swap-in in flight has a sequence waiting for it, or one that finished meanwhile
        assert all(t.seq.status == SeqStatus.SWAPPING_IN or t.seq.is_finished for t in self.pending)
        assert kv.has_inflight_transfers or not self.pending
        other = "num_preemptions_recompute" if s.swap_preempted else "num_preemptions_swap"
        assert s.metrics.snapshot()[other] == 0
        assert self.index.apply(self.log.drain()) and self.index.tiers == tree_tiers(kv)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        drain(self.sched, self.rng, self.pending)
        self.kv.check_invariants([])
        assert self.kv.num_free_blocks == self.kv.num_blocks  # nothing leaked on the device
        assert self.kv.num_free_cpu_blocks == self.kv.num_cpu_blocks  # nor in the CPU tier


def test_scheduler_tier_machine():
    SchedulerTierMachine.swapping_in_seen = 0
    # Each rule may run several scheduler steps (and teardown drains every request):
    # on a loaded machine that trips the too_slow health check, not a bug.
    run_state_machine_as_test(SchedulerTierMachine, settings=settings(
        max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
    assert SchedulerTierMachine.swapping_in_seen > 0, "no run reached SWAPPING_IN"
