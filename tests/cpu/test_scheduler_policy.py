"""Admission order and the prefill step cap: sjf lets mostly-cached prompts pass long prefills,
prefill_step_tokens keeps a step's prefill small, max_wait_s keeps anything from starving."""
from __future__ import annotations

import random
import time

import pytest

from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.config import SchedulerConfig
from radixserve.engine.core.scheduler import CPU_PREFILL_STEP_TOKENS, Scheduler, for_device
from radixserve.engine.core.scheduler_output import SampledToken, StepResult
from radixserve.engine.sampling_params import SamplingParams
from tests.cpu.helpers import BS, EOS, make_request

PREFIX = list(range(5, 21))  # 4 full blocks


def scheduler(**policy) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, **policy)
    return Scheduler(cfg, KVCacheManager(64, BS, True), 200, frozenset({EOS}))


def step(sched: Scheduler, rng: random.Random) -> set[int]:
    """One step with random tokens; the ids of the sequences it computed."""
    so = sched.schedule()
    sched.update(so, StepResult(so.step_id, [SampledToken(r.seq_id, rng.randrange(30, 60), -1.0)
                                             for r in so.sample_rows]))
    return {s.seq_id for s in so.seqs}


def request(tokens: list[int], arrival: float | None = None):
    return make_request(tokens, SamplingParams(max_tokens=4, ignore_eos=True),
                        arrival=time.monotonic() if arrival is None else arrival)


def cached_and_long(sched: Scheduler, rng: random.Random):
    """PREFIX cached by a finished request; then a long new prompt, then one mostly cached."""
    warm = request(PREFIX + [60])
    sched.add_request(warm)
    while not warm.is_finished:
        step(sched, rng)
    long, hit = request(list(range(100, 120))), request(PREFIX + [61, 62])
    sched.add_request(long)
    sched.add_request(hit)
    return long.seqs[0].seq_id, hit.seqs[0].seq_id


def test_sjf_lets_a_mostly_cached_prompt_pass_a_long_prefill():
    rng = random.Random(0)
    sched = scheduler(schedule_policy="sjf", prefill_step_tokens=8)
    long, hit = cached_and_long(sched, rng)
    assert step(sched, rng) == {hit}  # 3 uncached tokens go first; the long prompt would pass the cap
    assert long in step(sched, rng)  # then the long one, alone over the cap


def test_fcfs_keeps_arrival_order_under_the_cap():
    rng = random.Random(0)
    sched = scheduler(schedule_policy="fcfs", prefill_step_tokens=8)
    long, hit = cached_and_long(sched, rng)
    assert step(sched, rng) == {long}  # first in line, admitted whole although over the cap
    assert hit in step(sched, rng)


def test_prefill_cap_gives_each_long_prompt_its_own_step_and_lets_decodes_join():
    rng = random.Random(1)
    sched = scheduler(prefill_step_tokens=16)
    a, b = request(list(range(100, 112))), request(list(range(200, 212)))
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched, rng) == {a.seqs[0].seq_id}  # 12 + 12 > 16
    assert step(sched, rng) == {a.seqs[0].seq_id, b.seqs[0].seq_id}  # b's prefill, a's decode
    uncapped = scheduler()
    for r in (request(list(range(100, 112))), request(list(range(200, 212)))):
        uncapped.add_request(r)
    assert len(step(uncapped, rng)) == 2  # default: the whole budget, as before


def test_an_overdue_prompt_goes_first():
    rng = random.Random(2)
    sched = scheduler(schedule_policy="sjf", prefill_step_tokens=8, max_wait_s=5.0)
    warm = request(PREFIX + [60])
    sched.add_request(warm)
    while not warm.is_finished:
        step(sched, rng)
    old = request(list(range(100, 120)), arrival=time.monotonic() - 10.0)
    hit = request(PREFIX + [61, 62])
    sched.add_request(hit)
    sched.add_request(old)
    assert step(sched, rng) == {old.seqs[0].seq_id}  # waited past max_wait_s: before the shorter one


def test_same_prefix_followers_still_wait_for_their_leader_under_sjf():
    rng = random.Random(3)
    sched = scheduler(schedule_policy="sjf", prefill_step_tokens=64)
    a, b = request(PREFIX + [40, 41]), request(PREFIX + [50, 51])
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched, rng) == {a.seqs[0].seq_id}
    step(sched, rng)
    assert b.seqs[0].num_cached_tokens == len(PREFIX)


def test_device_defaults_and_validation():
    cpu, cuda = for_device(SchedulerConfig(), on_cpu=True), for_device(SchedulerConfig(), on_cpu=False)
    assert (cpu.schedule_policy, cpu.prefill_step_tokens) == ("sjf", CPU_PREFILL_STEP_TOKENS)
    assert (cuda.schedule_policy, cuda.prefill_step_tokens) == ("fcfs", cuda.max_num_batched_tokens)
    mine = for_device(SchedulerConfig(schedule_policy="fcfs", prefill_step_tokens=99), on_cpu=True)
    assert (mine.schedule_policy, mine.prefill_step_tokens) == ("fcfs", 99)
    small = for_device(SchedulerConfig(max_num_batched_tokens=100), on_cpu=True)
    assert small.prefill_step_tokens == min(100, CPU_PREFILL_STEP_TOKENS)
    for bad in ({"schedule_policy": "lifo"}, {"prefill_step_tokens": 0}, {"max_wait_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SchedulerConfig(**bad)


def test_a_short_prompt_joins_a_running_chunk_under_the_cap():
    rng = random.Random(4)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, prefill_step_tokens=8)
    sched = Scheduler(cfg, KVCacheManager(64, BS, True), 200, frozenset({EOS}))
    long = request(list(range(100, 124)))  # 24 tokens: chunks of 16 and 8
    sched.add_request(long)
    step(sched, rng)
    short = request([200, 201, 202])
    sched.add_request(short)
    # the long prompt's last 8 tokens compute this step anyway: the short one comes along
    assert step(sched, rng) == {long.seqs[0].seq_id, short.seqs[0].seq_id}
