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
from radixserve.engine.cache.kv_manager import KVCacheManager, StepTransfers
from radixserve.engine.core.sequence import Sequence
from tests.cpu.helpers import complete_all, make_seq, run_seq, settle, tree_tiers

BS = 4  # make_seq's default block size


def test_demote_then_promote_roundtrip():
    kv = KVCacheManager(8, BS, True, num_cpu_blocks=16, demote_window=8)
    a = run_seq(kv, list(range(13)))  # 3 full blocks
    kv.free(a)
    assert kv.plan_transfers().wait  # the write-back of a's cached blocks
    complete_all(kv)
    assert kv.num_cpu_cached_blocks == 3 and kv.num_gpu_cached_blocks == 0  # demoted, device copies freed
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
    settle(kv)
    b = make_seq(list(range(9)) + [5])
    assert kv.allocate(b, 1, kv.lookup(b))
    settle(kv, ok=False)
    kv.free(b)
    kv.check_invariants([])
    assert kv.num_gpu_cached_blocks == 0 and kv.num_cpu_cached_blocks == 2  # the CPU copies are intact
    assert kv.num_free_blocks == kv.num_blocks


def test_abort_during_swap_in_defers_the_free():
    kv = KVCacheManager(8, BS, True, num_cpu_blocks=16, demote_window=8)
    kv.free(run_seq(kv, list(range(9))))
    settle(kv)
    b = make_seq(list(range(9)) + [5])
    assert kv.allocate(b, 1, kv.lookup(b))
    kv.free(b)  # aborted while the copy runs: its blocks must not be reused yet
    assert kv.num_free_blocks < kv.num_blocks
    kv.check_invariants([])
    settle(kv)
    kv.check_invariants([])
    assert kv.num_free_blocks == kv.num_blocks


def test_cpu_eviction_may_drop_a_copy_on_evict_copy_in_flight():
    # X has a CPU copy, its child Y none; one step's allocations evict both
    # (Y copied out before the forward, X just loses its device copy), then
    # that step's write-back needs X's CPU block: X goes, with Y still being written.
    kv = KVCacheManager(5, BS, True, num_cpu_blocks=2, demote_window=8)
    kv.free(run_seq(kv, list(range(5))))
    settle(kv)  # X demoted: CPU-only
    a = make_seq(list(range(9)))
    assert kv.allocate(a, 5, kv.lookup(a)) and kv.is_swapping_in(a)
    settle(kv)
    a.num_computed_tokens = 9
    kv.commit(a)
    kv.free(a)
    z = run_seq(kv, [70, 71, 72, 73, 74])
    kv.free(z)  # Z, freed last: the write-back candidate
    b = make_seq([90 + i for i in range(16)])
    assert kv.allocate(b, 16)
    step = kv.plan_transfers()
    assert step.before_forward and len(step.wait) == 2
    kv.check_invariants([b])
    complete_all(kv)
    kv.check_invariants([b])
    assert not kv.is_cached(a.block_hashes[0]) and not kv.is_cached(a.block_hashes[1])
    assert tree_tiers(kv) == {z.block_hashes[0]: {"cpu"}}  # only Z is left, written back


def test_recompute_free_keeps_blocks_off_the_cpu_tier_until_hit_again():
    kv = KVCacheManager(8, BS, True, num_cpu_blocks=16, demote_window=8)
    kv.free(run_seq(kv, list(range(13))), demote=False)  # what a recompute preemption does
    assert kv.plan_transfers().wait == [] and kv.num_cpu_cached_blocks == 0  # no write-back
    b = run_seq(kv, list(range(13)) + [7])  # a device hit: in use again, demotable like any block
    kv.free(b)
    assert kv.plan_transfers().wait
    complete_all(kv)
    assert kv.num_cpu_cached_blocks == 3
    kv.check_invariants([])


def test_recompute_freed_blocks_are_evicted_without_a_copy():
    kv = KVCacheManager(4, BS, True, num_cpu_blocks=16, demote_window=0)
    kv.free(run_seq(kv, list(range(9))), demote=False)
    assert kv.num_cached_blocks == 2
    run_seq(kv, [50 + i for i in range(16)])  # needs all 4 blocks: both cached ones are reused
    assert kv.plan_transfers() == StepTransfers()  # no copy-on-evict
    assert kv.num_cached_blocks == 4 and kv.num_cpu_cached_blocks == 0 and kv.num_evicted_blocks == 2


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

    def _collect(self, evict_ok: bool = True, demote_ok: bool = True):
        # End of a step, as in the engine: its swap-outs (copy-on-evict before the
        # forward, write-back beside it) complete before it replies, so before
        # anything allocates again; swap-ins may stay in flight for several steps.
        step = self.kv.plan_transfers()
        for t in self.kv.take_transfers():
            if t.task_id in step.wait:
                self.kv.complete_transfer(t.task_id, evict_ok if t.task_id in step.before_forward else demote_ok)
            else:
                self.pending.append(t)

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
        self._collect(demote_ok=ok)  # a step that admits nothing: only the write-back

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def complete_swap_in(self, data, ok):
        t = data.draw(st.sampled_from(self.pending))  # swap-ins may finish in any order
        self.pending.remove(t)
        self.kv.complete_transfer(t.task_id, ok)
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
            self.kv.complete_transfer(t.task_id, True)
        for seq in self.live:
            self.kv.free(seq)
        self.kv.check_invariants([])
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert self.kv.num_free_cpu_blocks == self.kv.num_cpu_blocks


TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)
