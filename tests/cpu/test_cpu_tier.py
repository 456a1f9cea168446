"""The two-tier radix cache: demotion, promotion, failures, events (no model).

A hypothesis state machine interleaves admissions (with device and CPU
hits), compute, decode, frees/aborts, demotion planning and transfer
completions that succeed or fail in any order, and checks after every step
that neither tier leaks or double-frees a block, device copies stay
upward-closed, and replaying the event stream reproduces the tree per tier.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.engine.cache.events import BlockIndex, EventLog
from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.core.sequence import Sequence
from tests.cpu.helpers import make_seq, run_seq, tree_tiers

BS = 4  # make_seq's default block size


def settle(kv: KVCacheManager, ok: bool = True) -> None:
    kv.cpu.flush_evictions()
    for t in kv.cpu.take_started():
        kv.cpu.complete(t.task_id, ok)


def test_demote_then_promote_roundtrip():
    kv = KVCacheManager(8, BS, True, num_cpu_blocks=16, demote_window=8)
    a = run_seq(kv, list(range(13)))  # 3 full blocks
    kv.free(a)
    assert kv.cpu.plan_demotions() is not None
    settle(kv)
    assert kv.tree.num_cpu == 3 and kv.tree.num_gpu == 0  # demoted, device copies freed
    b = make_seq(list(range(13)) + [99])
    hit = kv.lookup(b)
    assert len(hit.gpu_nodes) == 0 and len(hit.cpu_nodes) == 3
    assert kv.allocate(b, 2, hit) and kv.is_swapping_in(b)
    c = make_seq(list(range(13)) + [98])
    assert kv.lookup(c).num_blocks == 0  # the chain is in flight: no second swap-in
    settle(kv)
    assert not kv.is_swapping_in(b)
    assert kv.lookup(c).num_blocks == 3 and len(kv.lookup(c).gpu_nodes) == 3
    kv.check_invariants([b])


def test_failed_swap_in_uncaches_the_device_copies():
    kv = KVCacheManager(8, BS, True, num_cpu_blocks=16, demote_window=8)
    kv.free(run_seq(kv, list(range(9))))
    kv.cpu.plan_demotions()
    settle(kv)
    b = make_seq(list(range(9)) + [5])
    assert kv.allocate(b, 1, kv.lookup(b))
    settle(kv, ok=False)
    kv.free(b)
    kv.check_invariants([])
    assert kv.tree.num_gpu == 0 and kv.tree.num_cpu == 2  # the CPU copies are intact
    assert kv.pool.num_free == kv.pool.num_blocks


def test_abort_during_swap_in_defers_the_free():
    kv = KVCacheManager(8, BS, True, num_cpu_blocks=16, demote_window=8)
    kv.free(run_seq(kv, list(range(9))))
    kv.cpu.plan_demotions()
    settle(kv)
    b = make_seq(list(range(9)) + [5])
    assert kv.allocate(b, 1, kv.lookup(b))
    kv.free(b)  # aborted while the copy runs: its blocks must not be reused yet
    assert kv.pool.num_free < kv.pool.num_blocks
    kv.check_invariants([])
    settle(kv)
    kv.check_invariants([])
    assert kv.pool.num_free == kv.pool.num_blocks


def test_gap_in_event_stream_is_detected():
    log = EventLog("e")
    kv = KVCacheManager(8, BS, True, events=log)
    run_seq(kv, list(range(9)))
    first = log.drain()
    run_seq(kv, [50 + i for i in range(9)])
    second = log.drain()
    index = BlockIndex()
    assert not index.apply(second)  # the first batch was missed: gap
    assert index.apply(first) and index.apply(second)
    assert index.tiers == tree_tiers(kv)


class TierMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.log = EventLog("m")
        self.kv = KVCacheManager(12, BS, True, num_cpu_blocks=10, events=self.log, demote_window=6)
        self.index = BlockIndex()
        self.live: list[Sequence] = []  # running or waiting for a swap-in
        self.pending = []  # started transfers not yet completed

    def _collect(self, evict_ok: bool = True):
        # End of a step: copy-on-evict swap-outs ran before the forward and are
        # acknowledged with it; swap-ins may stay in flight for several steps.
        evicted = self.kv.cpu.flush_evictions()
        started = self.kv.cpu.take_started()
        if evicted is not None:
            started.remove(evicted)
            self.kv.cpu.complete(evicted.task_id, evict_ok)
        self.pending += started

    @rule(prefix=st.integers(0, 2), length=st.integers(2, 14), evict_ok=st.booleans())
    def admit(self, prefix, length, evict_ok):
        seq = make_seq([prefix * 100 + i for i in range(length)])
        hit = self.kv.lookup(seq)
        n = seq.num_tokens - hit.num_tokens(BS)
        if self.kv.allocate(seq, n, hit):
            if not self.kv.is_swapping_in(seq):
                seq.num_computed_tokens += n
                self.kv.commit(seq)
            self.live.append(seq)
        self._collect(evict_ok)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2), evict_ok=st.booleans())
    def decode(self, data, token, evict_ok):
        seq = data.draw(st.sampled_from(self.live))
        if self.kv.is_swapping_in(seq):
            return
        n = seq.num_tokens - seq.num_computed_tokens  # tokens left after a swap-in
        seq.append_token(token)
        if self.kv.allocate(seq, n + 1):
            seq.num_computed_tokens += n + 1
            self.kv.commit(seq)
        else:  # preempt (recompute)
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            self.live.remove(seq)
        self._collect(evict_ok)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.kv.free(seq)  # includes aborts of sequences still swapping in
        self.live.remove(seq)

    @rule(ok=st.booleans())
    def demote(self, ok):
        # As in the engine: planned at the end of a schedule, copied during that
        # step, completed before anything allocates again.
        t = self.kv.cpu.plan_demotions()
        self._collect(ok)
        if t is not None:
            self.pending.remove(t)
            self.kv.cpu.complete(t.task_id, ok)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def complete_swap_in(self, data, ok):
        t = data.draw(st.sampled_from(self.pending))  # swap-ins may finish in any order
        self.pending.remove(t)
        self.kv.cpu.complete(t.task_id, ok)
        if not ok and t.seq in self.live:
            self.kv.free(t.seq)  # the scheduler fails that request
            self.live.remove(t.seq)

    @invariant()
    def consistent(self):
        self.kv.check_invariants(self.live)
        assert self.index.apply(self.log.drain())
        assert self.index.tiers == tree_tiers(self.kv)

    def teardown(self):
        self._collect()
        for t in list(self.pending):
            self.kv.cpu.complete(t.task_id, True)
        for seq in self.live:
            self.kv.free(seq)
        self.kv.check_invariants([])
        assert self.kv.pool.num_free == self.kv.pool.num_blocks
        assert self.kv.cpu.pool.num_free == self.kv.cpu.pool.num_blocks


TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)
