"""Peer KV bookkeeping (no model): a holder's and a puller's schedulers under random
export / pull / failure / abort sequences never leak or double-free a block."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from radixserve.engine.cache.peer import WRITING, PeerHint, Pull
from radixserve.engine.core.sequence import SeqStatus
from radixserve.engine.sampling_params import SamplingParams
from tests.cpu.helpers import make_request
from tests.cpu.test_scheduler_tier import complete_swap_in, live_seqs, step, tier_scheduler


def run_step(sched, rng) -> None:
    for t in step(sched, rng):  # CPU-tier swap-ins complete at once: pulls are what is tested here
        complete_swap_in(sched, t, True)


def tokens(prefix: int, extra: int) -> list[int]:
    return [40 + prefix] * 12 + [prefix * 10 + 20 + i for i in range(extra)]


class PeerMachine(RuleBasedStateMachine):
    imported = 0  # pulls (over all examples) whose blocks went in
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.rng = random.Random(seed)
        self.holder = tier_scheduler("swap")
        self.puller = tier_scheduler("swap")
        self.puller.peer_enabled = True
        self.fetching: list[Pull] = []
        self.writing: list[tuple[Pull, int]] = []

    @rule(prefix=st.integers(0, 2), extra=st.integers(1, 8))
    def warm_holder(self, prefix, extra):
        self.holder.add_request(make_request(tokens(prefix, extra), SamplingParams(max_tokens=2)))
        for _ in range(4):
            run_step(self.holder, self.rng)

    @rule(prefix=st.integers(0, 2), extra=st.integers(1, 8), hint=st.integers(0, 6), n=st.integers(1, 2))
    def add_pulling(self, prefix, extra, hint, n):
        req = make_request(tokens(prefix, extra), SamplingParams(max_tokens=3, n=n))
        req.peer_hint = PeerHint("holder", hint)
        self.puller.add_request(req)

    @rule(steps=st.integers(1, 3))
    def step_puller(self, steps):
        for _ in range(steps):
            run_step(self.puller, self.rng)
            self.fetching += self.puller.kv.peer.take_started()

    @precondition(lambda self: self.fetching)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "raise", "short"]))
    def fetched(self, data, outcome):
        """What PeerDriver.poll/_write do when a fetch returns: export on the holder, then write."""
        p = data.draw(st.sampled_from(self.fetching))
        self.fetching.remove(p)
        if not self.puller.kv.peer.is_live(p):
            return  # aborted while fetching
        book = self.holder.kv.peer
        pin = book.pin_export(p.block_hashes)
        for b in pin.gpu_blocks:
            assert self.holder.kv.pool.ref_cnt[b] > 0, "an exported block must be pinned"
        book.unpin(pin)
        got = len(pin.block_hashes) if outcome == "ok" else len(pin.block_hashes) // 2 if outcome == "short" else 0
        if got == 0:
            self.puller.finish_pull(p, 0)
            return
        p.state = WRITING
        self.writing.append((p, got))

    @precondition(lambda self: self.writing)
    @rule(data=st.data(), ok=st.booleans())
    def written(self, data, ok):
        p, got = data.draw(st.sampled_from(self.writing))
        self.writing.remove((p, got))
        live = p.seq.status == SeqStatus.SWAPPING_IN
        self.puller.finish_pull(p, got if ok else 0)
        if ok and live:
            PeerMachine.imported += 1
            assert p.seq.num_cached_tokens == (p.first + got) * self.puller.kv.block_size

    @rule(data=st.data())
    def abort(self, data):
        if self.puller.requests:
            self.puller.abort_request(data.draw(st.sampled_from(list(self.puller.requests))))

    @invariant()
    def consistent(self):
        for s in (self.holder, self.puller):
            s.kv.check_invariants(live_seqs(s))
        for q in self.puller.swapping.values():
            assert q.status == SeqStatus.SWAPPING_IN
        for p in self.puller.kv.peer.pulls.values():  # pulled blocks are not in the tree until written
            assert p.seq.num_committed_blocks <= p.first and p.seq.num_cached_tokens < 0

    def teardown(self):
        if not hasattr(self, "puller"):
            return
        for p, got in self.writing:
            self.puller.finish_pull(p, got)
        for p in self.fetching + self.puller.kv.peer.take_started():
            if self.puller.kv.peer.is_live(p):
                self.puller.finish_pull(p, 0)
        for s in (self.holder, self.puller):
            for _ in range(500):
                if not s.has_work():
                    break
                run_step(s, self.rng)
                for p in s.kv.peer.take_started():
                    s.finish_pull(p, 0)
            s.kv.check_invariants([])
            assert s.kv.num_free_blocks == s.kv.num_blocks, "a device block leaked"
            assert s.kv.num_free_cpu_blocks == s.kv.num_cpu_blocks, "a CPU block leaked"
            assert not s.kv.peer.pulls


def test_peer_kv_machine():
    PeerMachine.imported = 0
    run_state_machine_as_test(PeerMachine, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
    assert PeerMachine.imported > 0, "no pull ever brought blocks in"


def test_pull_estimate_pulls_only_where_it_beats_recomputing():
    from radixserve.engine.core.peer_driver import PullEstimate
    e = PullEstimate(16)
    assert e.worth(8)  # nothing measured yet: pull
    e.note_pull(0.05, 4)
    e.note_pull(0.06, 8)  # a call's fixed ~40 ms, then 2.5 ms per block
    assert e.pull_s(8) == pytest.approx(0.06, rel=0.05) and e.pull_s(40) == pytest.approx(0.14, rel=0.05)
    e.note_step(1.0, 1000)  # 1 ms per prompt token: 8 blocks recompute in 128 ms, pull in 60
    assert e.worth(8)
    small = PullEstimate(16)
    small.note_pull(0.05, 4)
    small.note_pull(0.06, 8)
    small.note_step(0.01, 1000)  # a toy model: 8 blocks recompute in 1.3 ms
    tries = [small.worth(8) for _ in range(2 * PullEstimate.EXPLORE)]
    assert tries.count(True) == 2  # declined, but tried again now and then
    small.note_step(0.01, 10)  # a decode step says nothing about prefill cost
    assert small.token_s == pytest.approx(1e-5)
