"""Scheduler behaviour and a hypothesis state machine, driven with fake step results.

No model runs here: a "step" samples a random token for every sample row,
which is all the scheduler can observe of the workers.
"""
from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.config import SchedulerConfig
from radixserve.engine.core.scheduler import Scheduler
from radixserve.engine.core.scheduler_output import SampledToken, StepResult
from radixserve.engine.core.sequence import SeqStatus, Sequence
from radixserve.engine.sampling_params import SamplingParams
from tests.cpu.helpers import BS, EOS, make_request


def make_scheduler(num_blocks=64, budget=32, max_seqs=8, chunked=True, caching=True, max_len=200, **policy):
    """``policy``: schedule_policy / prefill_step_tokens / max_wait_s (default: FCFS over the whole budget)."""
    kv = KVCacheManager(num_blocks, BS, caching)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_chunked_prefill=chunked, **policy)
    return Scheduler(cfg, kv, max_len, frozenset({EOS}))


def fake_step(sched: Scheduler, rng: random.Random, token=None):
    so = sched.schedule()
    sampled = [SampledToken(r.seq_id, token if token is not None else rng.randrange(4, 50), -1.0)
               for r in so.sample_rows]
    return so, sched.update(so, StepResult(so.step_id, sampled))


def live_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for s in sched.seqs.values() if s.block_ids]


def run_to_end(sched: Scheduler, rng: random.Random, max_steps=2000):
    for _ in range(max_steps):
        if not sched.has_work():
            return
        fake_step(sched, rng)
        sched.kv.check_invariants(live_seqs(sched))
        for rid in [r for r, req in sched.requests.items() if req.is_finished]:
            sched.pop_finished_request(rid)
    raise AssertionError("scheduler did not drain")


def test_chunked_prefill_respects_budget_and_decodes_join():
    sched = make_scheduler(budget=8)
    rng = random.Random(0)
    a = make_request(list(range(5, 25)), SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add_request(a)
    so, _ = fake_step(sched, rng)
    assert so.num_tokens == 8 and not so.sample_rows  # first chunk, nothing sampled yet
    for _ in range(2):
        fake_step(sched, rng)
    assert a.seqs[0].num_output_tokens == 1  # 20 tokens = 8 + 8 + 4: third step sampled
    b = make_request(list(range(40, 44)), SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request(b)
    so, _ = fake_step(sched, rng)
    ids = {s.seq_id for s in so.seqs}
    assert ids == {a.seqs[0].seq_id, b.seqs[0].seq_id}  # the new request joins the decode batch
    assert so.num_tokens == 1 + 4


def test_no_chunking_waits_for_whole_prompt():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add_request(make_request(list(range(5, 15)), SamplingParams(max_tokens=1)))
    sched.add_request(make_request(list(range(20, 30)), SamplingParams(max_tokens=1)))
    so = sched.schedule()
    assert [len(s.token_ids) for s in so.seqs] == [10]  # the second does not fit: no partial chunk


def test_max_num_seqs_and_fcfs():
    sched = make_scheduler(max_seqs=2, budget=100)
    reqs = [make_request([5 + i] * 3, SamplingParams(max_tokens=5, ignore_eos=True)) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()
    assert {s.seq_id for s in so.seqs} == {reqs[0].seqs[0].seq_id, reqs[1].seqs[0].seq_id}


def test_preemption_recompute_and_prefix_hit_on_resume():
    # 6 blocks of 4: two sequences growing to 12 tokens (3 blocks each) cannot both fit.
    sched = make_scheduler(num_blocks=6, budget=64, max_len=64)
    rng = random.Random(1)
    old = make_request(list(range(5, 13)), SamplingParams(max_tokens=10, ignore_eos=True), arrival=0)
    young = make_request(list(range(20, 28)), SamplingParams(max_tokens=10, ignore_eos=True), arrival=1)
    sched.add_request(old)
    sched.add_request(young)
    run_to_end(sched, rng)
    assert sched.metrics.values["num_preemptions"] >= 1
    assert old.seqs[0].num_output_tokens == young.seqs[0].num_output_tokens == 10
    assert sched.kv.num_free_blocks == 6


def test_abort_frees_every_block():
    sched = make_scheduler()
    rng = random.Random(2)
    r = make_request(list(range(5, 30)), SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    sched.add_request(r)
    for _ in range(3):
        fake_step(sched, rng)
    assert all(s.block_ids for s in r.seqs)  # forked
    sched.abort_request(r.request_id)
    assert all(s.finish_reason == "abort" for s in r.seqs)
    sched.kv.check_invariants([])
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_n_children_share_prompt_blocks():
    sched = make_scheduler(budget=64)
    rng = random.Random(3)
    r = make_request(list(range(5, 15)), SamplingParams(n=3, max_tokens=3, ignore_eos=True))
    sched.add_request(r)
    so, _ = fake_step(sched, rng)
    assert len(so.sample_rows) == 3 and len({x.source for x in so.sample_rows}) == 1
    so, _ = fake_step(sched, rng)
    assert so.block_copies  # the partial prompt block is copied for each child
    heads = {tuple(s.block_ids[:2]) for s in r.seqs}
    assert len(heads) == 1  # the two full prompt blocks are shared by all three


def test_eos_and_max_model_len_finish():
    sched = make_scheduler(max_len=12)
    rng = random.Random(4)
    a = make_request(list(range(5, 10)), SamplingParams(max_tokens=100))
    sched.add_request(a)
    fake_step(sched, rng, token=EOS)
    assert a.seqs[0].finish_reason == "stop"
    b = make_request(list(range(5, 10)), SamplingParams(max_tokens=100, ignore_eos=True))
    sched.add_request(b)
    run_to_end(sched, rng)
    assert b.seqs[0].finish_reason == "length" and b.seqs[0].num_tokens == 12


class SchedulerMachine(RuleBasedStateMachine):
    policy: dict = {}

    def __init__(self):
        super().__init__()
        self.sched = make_scheduler(num_blocks=20, budget=24, max_seqs=4, max_len=48, **self.policy)
        self.rng = random.Random(0)

    @rule(prefix=st.integers(0, 2), extra=st.integers(1, 12), n=st.integers(1, 3),
          max_tokens=st.integers(1, 12), plp=st.booleans())
    def add(self, prefix, extra, n, max_tokens, plp):
        tokens = [10 + prefix] * 8 + [20 + i for i in range(extra)]
        params = SamplingParams(n=n, max_tokens=max_tokens, prompt_logprobs=0 if plp else None)
        self.sched.add_request(make_request(tokens, params))

    @rule()
    def step(self):
        fake_step(self.sched, self.rng)

    @rule(data=st.data())
    def abort(self, data):
        if self.sched.requests:
            rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
            self.sched.abort_request(rid)

    @invariant()
    def consistent(self):
        s = self.sched
        s.kv.check_invariants(live_seqs(s))
        assert len(s.running) <= s.config.max_num_seqs
        assert all(seq.status == SeqStatus.RUNNING for seq in s.running)
        assert all(seq.status == SeqStatus.WAITING and not seq.block_ids for seq in s.waiting)

    def teardown(self):
        run_to_end(self.sched, self.rng)
        self.sched.kv.check_invariants([])
        assert self.sched.kv.num_free_blocks == self.sched.kv.num_blocks


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


class SjfSchedulerMachine(SchedulerMachine):
    """The same invariants with shortest-uncached-first admission and a small prefill step
    (max_wait_s huge: the test requests' arrival stamps are counters, not clock times)."""

    policy = {"schedule_policy": "sjf", "prefill_step_tokens": 6, "max_wait_s": 1e12}


TestSjfSchedulerMachine = SjfSchedulerMachine.TestCase
TestSjfSchedulerMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_same_prefix_in_one_batch_is_computed_once():
    sched = make_scheduler(budget=64)
    rng = random.Random(5)
    shared = list(range(5, 25))  # 5 full blocks
    a = make_request(shared + [40, 41], SamplingParams(max_tokens=2, ignore_eos=True))
    b = make_request(shared + [50, 51], SamplingParams(max_tokens=2, ignore_eos=True))
    c = make_request([60, 61, 62], SamplingParams(max_tokens=2, ignore_eos=True))
    for r in (a, b, c):
        sched.add_request(r)
    so, _ = fake_step(sched, rng)
    # b would recompute a's blocks in the same step: it waits one step instead; c is unaffected
    assert {s.seq_id for s in so.seqs} == {a.seqs[0].seq_id, c.seqs[0].seq_id}
    fake_step(sched, rng)
    assert b.seqs[0].num_cached_tokens == 20
