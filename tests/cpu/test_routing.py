"""Cluster routing and the metadata directory, without Ray: pure, deterministic logic."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from radixserve.cluster.metadata import CacheDirectory, FingerprintMismatch, LocalIndex
from radixserve.cluster.routing_policy import ReplicaState, RouterConfig, RoutingPolicy, rendezvous
from radixserve.engine.cache.events import EventLog
from radixserve.engine.cache.hashing import prompt_block_hashes
from radixserve.engine.cache.kv_manager import KVCacheManager
from tests.cpu.helpers import run_seq, settle


def directory_with(events_by_replica: dict[str, EventLog]) -> CacheDirectory:
    from radixserve.engine.cache.events import Snapshot
    d = CacheDirectory()
    for r, log in events_by_replica.items():
        d.register(r, "fp")
        if not d.push(r, log.drain()):  # an idle replica's first (empty) push: baseline by snapshot
            d.push_snapshot(r, Snapshot(r, log.next_seq - 1, []))
    return d


def test_directory_tracks_tiers_and_router_copy_follows_deltas():
    logs = {"a": EventLog("a"), "b": EventLog("b")}
    kva = KVCacheManager(16, 4, True, num_cpu_blocks=16, events=logs["a"], demote_window=16)
    first = run_seq(kva, list(range(13)))
    d = directory_with(logs)
    local = LocalIndex()
    local.apply(d.pull(0))
    hashes = prompt_block_hashes(list(range(13)), 4)
    assert local.hit("a", hashes) == (3, 0) and local.hit("b", hashes) == (0, 0)
    # demote a's blocks: the router sees them move to the CPU tier
    kva.free(first)
    settle(kva)
    assert d.push("a", logs["a"].drain())
    local.apply(d.pull(local.version))
    assert local.hit("a", hashes) == (0, 3)
    d.drop("a")
    local.apply(d.pull(local.version))
    assert local.hit("a", hashes) == (0, 0)


def test_gap_asks_for_snapshot_and_snapshot_resyncs():
    log = EventLog("a")
    kv = KVCacheManager(16, 4, True, events=log)
    d = CacheDirectory()
    d.register("a", "fp")
    run_seq(kv, list(range(9)))
    log.drain()  # lost on the way
    run_seq(kv, [50 + i for i in range(9)])
    assert not d.push("a", log.drain())  # gap: the actor wants a snapshot
    d.push_snapshot("a", kv.snapshot())
    run_seq(kv, [90 + i for i in range(5)])
    assert d.push("a", log.drain())  # continues after the snapshot's sequence number
    assert set(d.replicas["a"].index.tiers) == {e.block_hash for e in kv.snapshot().blocks}


def test_fingerprint_mismatch_is_refused():
    d = CacheDirectory()
    d.register("a", "model-x:bs16:hash-v1")
    with pytest.raises(FingerprintMismatch, match="refusing"):
        d.register("b", "model-x:bs32:hash-v1")


def test_stale_replica_is_dropped():
    d = CacheDirectory(stale_after_s=5)
    d.register("a", "fp")
    assert d.drop_stale(now=d.replicas["a"].last_seen + 10) == ["a"]
    assert d.replica_ids() == []


def test_delta_log_overflow_gives_full_state():
    d = CacheDirectory(max_log=3)
    log = EventLog("a")
    kv = KVCacheManager(32, 4, True, events=log)
    d.register("a", "fp")
    run_seq(kv, list(range(25)))
    d.push("a", log.drain())
    delta = d.pull(0)
    assert delta.full is not None and len(delta.full["a"]) == 6
    local = LocalIndex()
    local.apply(delta)
    assert len(local.blocks["a"]) == 6


def states(**kw):
    return [ReplicaState(r, *v) for r, v in kw.items()]


def test_affinity_prefers_cached_replica_and_counts_cpu_hits_partly():
    p = RoutingPolicy(RouterConfig())
    prompt = list(range(256))  # 16 blocks
    s = states(a=(0, 0, 0, 0), b=(12, 0, 0, 0), c=(0, 12, 0, 0))
    order = [d.replica for d in p.choose(s, [1] * 16, prompt)]
    assert order == ["b", "c", "a"]  # device hit beats an equal CPU hit, which beats a miss
    assert p.choose(s, [1] * 16, prompt)[0].reason == "affinity"


def test_hot_prefix_spills_under_the_load_bound():
    p = RoutingPolicy(RouterConfig(load_epsilon=0.25))
    prompt = list(range(256))
    s = states(a=(16, 0, 10, 2000), b=(0, 0, 0, 0), c=(0, 0, 1, 100))
    first = p.choose(s, [1] * 16, prompt)[0]
    assert first.replica != "a"  # a is above (1.25 * mean + 1) in-flight


def test_no_hit_uses_rendezvous_so_repeats_converge():
    p = RoutingPolicy(RouterConfig())
    prompt = list(range(100))
    hashes = prompt_block_hashes(prompt, 16)
    s = states(a=(0, 0, 0, 0), b=(0, 0, 0, 0), c=(0, 0, 0, 0))
    picks = {p.choose(s, hashes, prompt)[0].replica for _ in range(5)}
    assert len(picks) == 1
    assert p.choose(s, hashes, prompt)[0].reason == "rendezvous"
    # rendezvous is stable when another replica joins: only moves if the new one wins
    before = rendezvous(b"k", ["a", "b", "c"])[0]
    after = rendezvous(b"k", ["a", "b", "c", "d"])[0]
    assert after in (before, "d")


def test_policies():
    s = states(a=(5, 0, 0, 0), b=(0, 0, 0, 0))
    rr = RoutingPolicy(RouterConfig(policy="round_robin"))
    firsts = [rr.choose(s, [1], [1])[0].replica for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    ch = RoutingPolicy(RouterConfig(policy="consistent_hash"))
    assert len({ch.choose(s, [7, 8], [1])[0].replica for _ in range(3)}) == 1
    with pytest.raises(ValueError, match="router policy"):
        RouterConfig(policy="random")


def test_cold_adapter_costs_a_load():
    p = RoutingPolicy(RouterConfig())
    prompt = list(range(64))
    s = [ReplicaState("a", 2, 0, 0, 0, adapter_cold=True), ReplicaState("b", 2, 0, 0, 0, adapter_cold=False)]
    assert p.choose(s, [1] * 4, prompt)[0].replica == "b"


# -- the cost model (routing_policy.py's module doc) and the router's accounting --------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from radixserve.cluster.metadata import decode_delta, encode_delta  # noqa: E402
from radixserve.cluster.routing_policy import Accounting, LoadReport  # noqa: E402

BS = 16


def prompt_of(blocks: list[int], tail: int = 5) -> tuple[list[int], list[int]]:
    """(block hashes, prompt tokens) of a prompt of ``blocks`` full blocks and a short tail."""
    return blocks, [b % 1000 for b in blocks for _ in range(BS)] + [7] * tail


def route_once(p: RoutingPolicy, key: str, cached: dict[str, set[int]], blocks: list[int], now: float,
               done: bool = True, loads: dict[str, LoadReport] | None = None) -> str:
    """One request through the policy and its accounting, as the adapter or simulator does."""
    hashes, prompt = prompt_of(blocks)
    states = []
    for r, held in cached.items():
        hit = 0
        for h in hashes:
            if h not in held:
                break
            hit += 1
        load = (loads or {}).get(r, LoadReport(0, now, -1, -1))
        states.append(p.state(r, (hit, 0), hashes, load, now))
    chosen = p.route(key, states, hashes, prompt, now)[0].replica
    p.accounting.routed(key, chosen, now)
    if done:
        p.accounting.completed(key, chosen)
    return chosen


def test_shared_system_block_on_one_replica_does_not_pin_every_new_conversation():
    """The issue's pinning case: every prompt starts with a system prompt (2 blocks), which
    only replica a holds; at low load (each request done before the next) new conversations
    must still spread, not all go to a because a hit there saves 32 tokens."""
    p = RoutingPolicy(RouterConfig(block_size=BS))
    cached = {"a": {1, 2}, "b": set(), "c": set()}  # reports never change: a static directory
    picks = Counter(route_once(p, f"r{i}", cached, [1, 2, 1000 + i, 2000 + i], now=i * 0.1) for i in range(300))
    assert set(picks) == {"a", "b", "c"}
    assert max(picks.values()) < 0.45 * 300, picks


def test_block_every_candidate_holds_does_not_decide():
    p = RoutingPolicy(RouterConfig(block_size=BS))
    cached = {"a": {1}, "b": {1}}
    picks = Counter(route_once(p, f"r{i}", cached, [1, 1000 + i], now=i) for i in range(200))
    assert min(picks.values()) > 0.35 * 200, picks


def test_load_terms_move_decisions_by_exactly_their_cost():
    cfg = RouterConfig(block_size=BS)
    p = RoutingPolicy(cfg)
    prompt = list(range(10 * BS + 3))
    hashes = list(range(1, 11))
    # a holds 10 blocks (160 tokens of prefill saved); b nothing; both hold nothing in common
    # (both carry 4 in-flight requests, so the in-flight backstop stays out of the way)
    under, over = 159 // cfg.per_request_tokens, 160 // cfg.per_request_tokens + 1  # in-flight worth < / > 160
    q_under, q_over = round(0.6 * 160 / cfg.queue_weight), round(1.3 * 160 / cfg.queue_weight)  # worth < / > 160
    for queued, inflight, want in ((q_under, 0, "a"), (q_over, 0, "b"), (0, under, "a"), (0, over, "b")):
        a = ReplicaState("a", 10, 0, 4 + inflight, queued)
        b = ReplicaState("b", 0, 0, 4, 0)
        delta = p.cost(len(prompt), a) - p.cost(len(prompt), b)
        assert delta == pytest.approx(cfg.queue_weight * queued + cfg.per_request_tokens * inflight - cfg.hit_weight * 160)
        assert p.choose([a, b], hashes, prompt)[0].replica == want, (queued, inflight)


def test_queued_work_counts_from_the_first_token():
    """No threshold: 64 queued tokens (far below one step's budget) already move a new prefix."""
    p = RoutingPolicy(RouterConfig(block_size=BS))
    for i in range(50):
        hashes, prompt = prompt_of([5000 + i])
        s = [ReplicaState("a", 0, 0, 0, 64), ReplicaState("b", 0, 0, 0, 0)]
        assert p.choose(s, hashes, prompt)[0].replica == "b"


def test_cache_pressure_sends_a_cold_prefix_to_free_blocks():
    cfg = RouterConfig(block_size=BS)
    p = RoutingPolicy(cfg)
    for i in range(50):  # whatever the prompt's rendezvous order, the full pool loses
        hashes, prompt = prompt_of([9000 + i, 9100 + i, 9200 + i])
        full = ReplicaState("full", 0, 0, 0, 0, empty_blocks=0)
        roomy = ReplicaState("roomy", 0, 0, 0, 0, empty_blocks=100)
        assert p.choose([full, roomy], hashes, prompt)[0].replica == "roomy"
    need = -(-len(prompt) // BS)
    assert p.pressure_tokens(len(prompt), full) == cfg.evict_cost * BS * need
    assert p.pressure_tokens(len(prompt), roomy) == 0
    # a hit lowers the pressure too: only the uncached blocks need room
    assert p.pressure_tokens(len(prompt), ReplicaState("x", 2, 0, 0, 0, empty_blocks=0)) == cfg.evict_cost * BS * (need - 2)


def test_pressure_from_reports_free_minus_cached():
    p = RoutingPolicy(RouterConfig(block_size=BS))
    s = p.state("a", (0, 0), [], LoadReport(0, 10.0, free_blocks=50, num_blocks=64), 10.0, cached_gpu_blocks=40)
    assert s.empty_blocks == 10
    assert p.state("a", (0, 0), [], LoadReport(0, 10.0), 10.0).empty_blocks is None  # not reported


def test_repeats_of_a_new_prefix_converge():
    p = RoutingPolicy(RouterConfig(block_size=BS))
    cached: dict[str, set[int]] = {r: set() for r in "abcd"}
    for i in range(20):  # 20 new prefixes, each repeated 5 times, before any report shows its blocks
        picks = {route_once(p, f"{i}-{j}", cached, [700 + i, 800 + i], now=i + j * 0.1) for j in range(5)}
        assert len(picks) == 1, (i, picks)
    # once a replica reports the prefix, a burst of its repeats (all in flight) stays there
    long = list(range(5000, 5020))
    home = route_once(p, "first", cached, long, now=200.0)
    cached[home] = set(long)
    picks = {route_once(p, f"burst{j}", cached, long + [6000 + j], now=201.0, done=False) for j in range(4)}
    assert picks == {home}


def test_new_prefixes_spread_by_load():
    p = RoutingPolicy(RouterConfig(block_size=BS))
    cached: dict[str, set[int]] = {r: set() for r in "abcd"}
    picks = Counter(route_once(p, f"k{i}", cached, [300 + i], now=0.0, done=False) for i in range(40))
    assert max(picks.values()) - min(picks.values()) <= 2, picks  # all in flight: load spreads them


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 2**63), min_size=20, max_size=60, unique=True), st.integers(0, 4))
def test_rendezvous_placement_is_stable_when_a_replica_leaves(keys, gone):
    p = RoutingPolicy(RouterConfig(block_size=BS))
    names = [f"replica-{i}" for i in range(5)]

    def first(replicas: list[str], k: int) -> str:
        hashes, prompt = prompt_of([k])
        return p.choose([ReplicaState(r, 0, 0, 0, 0) for r in replicas], hashes, prompt)[0].replica
    before = {k: first(names, k) for k in keys}
    left = [r for r in names if r != names[gone]]
    after = {k: first(left, k) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != names[gone])
    assert names[gone] not in after.values()


def test_ties_never_break_by_name():
    p = RoutingPolicy(RouterConfig(block_size=BS))
    firsts = Counter()
    for i in range(200):
        hashes, prompt = prompt_of([40_000 + i])
        firsts[p.choose([ReplicaState(r, 0, 0, 0, 0) for r in "abc"], hashes, prompt)[0].replica] += 1
    assert min(firsts.values()) > 40, firsts


def test_stale_replica_is_not_chosen():
    cfg = RouterConfig(block_size=BS, stale_after_s=5.0)
    p = RoutingPolicy(cfg)
    hashes, prompt = prompt_of([1, 2, 3, 4])
    now = 100.0
    stuck = p.state("stuck", (4, 0), hashes, LoadReport(0, now - 6.0), now)  # stopped reporting 6 s ago
    fresh = p.state("fresh", (0, 0), hashes, LoadReport(0, now - 0.1), now)
    order = p.choose([stuck, fresh], hashes, prompt)
    assert [d.replica for d in order] == ["fresh", "stuck"] and order[1].reason == "stale"
    unknown = p.state("new", (0, 0), hashes, None, now)  # never reported (the actor dropped it)
    assert p.choose([unknown, fresh], hashes, prompt)[0].replica == "fresh"
    # nobody reports (the metadata actor is down): route among all rather than refuse
    both_old = [replace(stuck, report_age_s=60.0), replace(fresh, report_age_s=60.0)]
    assert p.choose(both_old, hashes, prompt)[0].replica == "stuck"  # its hit decides again


def test_accounting_without_ray():
    cfg = RouterConfig(block_size=BS, reservation_ttl_s=30.0, delivery_s=0.05)
    acct = Accounting(cfg)
    acct.reserve("q1", "a", "affinity", tokens=100, hit=2, now=10.0, block_hashes=[11, 12])
    assert acct.inflight["a"] == 1
    assert acct.queued("a", LoadReport(50, 9.0), 10.0) == 150  # reported + chosen, not routed yet
    acct.routed("q1", "a", 10.0)
    assert acct.inflight["a"] == 1 and acct.decisions[("a", "affinity")] == 1 and acct.hit_blocks["a"] == 2
    assert acct.queued("a", LoadReport(50, 9.0), 10.1) == 150  # routed after the report was taken
    assert acct.queued("a", LoadReport(80, 11.0), 11.0) == 80  # the report includes it now
    assert acct.predicted_hit("a", [11, 12, 13], 10.5) == 2  # its blocks, before any report
    assert acct.predicted_hit("a", [11, 12], 10.0 + cfg.predict_ttl_s + 1) == 0
    acct.completed("q1", "a")
    assert acct.inflight["a"] == 0
    assert acct.queued("a", LoadReport(50, 9.0), 10.2) == 50  # finished: not queued, report late or not
    # Ray routed to another replica than chosen: counted there, without the cost made for a
    acct.reserve("q2", "a", "affinity", 100, 0, 20.0)
    acct.routed("q2", "b", 20.0)
    assert (acct.inflight["a"], acct.inflight["b"]) == (0, 1)
    assert acct.queued("b", LoadReport(0, 19.0), 20.0) == 0
    # a choice never routed (the request was cancelled) expires
    acct.reserve("q3", "c", "affinity", 10, 0, 30.0)
    acct.expire(30.0 + cfg.reservation_ttl_s + 1)
    assert acct.inflight["c"] == 0
    acct.forget("b")
    assert acct.inflight["b"] == 0


def test_load_report_and_device_block_count_reach_the_router():
    logs = {"a": EventLog("a")}
    kva = KVCacheManager(16, 4, True, events=logs["a"])
    run_seq(kva, list(range(13)))
    d = CacheDirectory()
    d.register("a", "fp")
    assert d.push("a", logs["a"].drain(), "", (42, 5.0, 13, 16))
    local = LocalIndex()
    local.apply(decode_delta(encode_delta(d.pull(0))))  # as it crosses to the router: msgpack
    assert local.loads["a"] == LoadReport(42, 5.0, 13, 16)
    assert local.gpu_blocks["a"] == 3
    d.push("a", logs["a"].drain(), "", (0, 6.0))  # an old replica's two-field report still parses
    local.apply(decode_delta(encode_delta(d.pull(local.version))))
    assert local.loads["a"] == LoadReport(0, 6.0, -1, -1)
    d.drop("a")
    local.apply(d.pull(local.version))
    assert "a" not in local.gpu_blocks


def test_predictions_survive_a_shared_first_block():
    """A system-prompt block sent to every replica must not hide the chains behind it on all but the last."""
    acct = Accounting(RouterConfig(block_size=BS))
    acct.routed("x", "a", 10.0, block_hashes=[1, 2, 3])  # system block 1, then x's own
    acct.routed("y", "b", 10.1, block_hashes=[1, 7])      # the same system block, elsewhere
    assert acct.predicted_hit("a", [1, 2, 3], 10.2) == 3
    assert acct.predicted_hit("b", [1, 7], 10.2) == 2
    assert acct.predicted_hit("b", [1, 2, 3], 10.2) == 1  # b holds the system block only


def _peer_states(holder_inflight: int, *, reported: int = 8, holder_age: float = 0.05):
    a = ReplicaState("a", 8, 0, holder_inflight, 0, empty_blocks=80, report_age_s=holder_age, reported_hit=reported)
    b = ReplicaState("b", 0, 0, 0, 0, empty_blocks=96, report_age_s=0.05, reported_hit=0)
    return [a, b]


def test_peer_kv_spills_a_loaded_holder_with_a_pull_and_keeps_an_idle_one():
    hashes, prompt = list(range(1, 10)), list(range(140))  # 8 cached blocks + a suffix
    pol = RoutingPolicy(RouterConfig(peer_kv=True))
    idle = _peer_states(0)
    assert pol.choose(idle, hashes, prompt)[0].replica == "a"  # its own hit beats a pull
    assert pol.peer_hint(idle, "a") is None
    busy = _peer_states(1)  # one request decoding there: 64 tokens of load, a pull costs ~26
    assert pol.choose(busy, hashes, prompt)[0].replica == "b"
    assert pol.peer_hint(busy, "b") == ("a", 8)
    # without peer KV the same load does not move it (recomputing 128 tokens costs more), and no hint
    plain = RoutingPolicy(RouterConfig())
    assert plain.choose(busy, hashes, prompt)[0].replica == "a" and plain.peer_hint(busy, "b") is None
    # the pull is priced between a CPU-tier hit and a recompute: at cost 1 it is a recompute
    assert RoutingPolicy(RouterConfig(peer_kv=True, remote_copy_cost=1.0)).choose(busy, hashes, prompt)[0].replica == "a"


def test_peer_hints_name_only_reported_fresh_holders_worth_a_pull():
    pol = RoutingPolicy(RouterConfig(peer_kv=True, pull_min_blocks=3))
    # blocks the router only predicts (sent moments ago, not reported) cannot be exported yet
    assert pol.peer_hint(_peer_states(1, reported=0), "b") is None
    assert pol.remote_blocks(_peer_states(1, reported=0), _peer_states(1, reported=0))["b"] == 0
    # a holder that stopped reporting may be gone
    assert pol.peer_hint(_peer_states(1, holder_age=60.0), "b") is None
    assert pol.peer_hint(_peer_states(1, reported=2), "b") is None  # 2 < pull_min_blocks
    assert pol.peer_hint(_peer_states(1, reported=3), "b") == ("a", 3)


def test_router_takes_peer_kv_from_the_engine_config():
    from radixserve.engine.config import EngineConfig
    assert RouterConfig.for_engine(EngineConfig.from_flat(model="tiny-llama")).peer_kv
    assert not RouterConfig.for_engine(EngineConfig.from_flat(model="tiny-llama", peer_kv=False)).peer_kv
    assert not RouterConfig.for_engine(EngineConfig.from_flat(model="tiny-llama", enable_prefix_caching=False)).peer_kv
    with pytest.raises(ValueError, match="peer_kv"):
        RouterConfig.for_engine(EngineConfig.from_flat(model="tiny-llama"), peer_kv=False)
    with pytest.raises(ValueError, match="remote_copy_cost"):
        RouterConfig(remote_copy_cost=1.5)


def test_a_remote_hit_is_priced_by_what_the_replica_measured():
    hashes, prompt = list(range(1, 10)), list(range(140))
    pol = RoutingPolicy(RouterConfig(peer_kv=True))
    a, b = _peer_states(1)
    cheap = replace(b, pull_cost=(10.0, 1.0))     # 10 tokens per call + 1 per block: pull 8 blocks for 18
    dear = replace(b, pull_cost=(400.0, 16.0))    # slower than recomputing: priced as a recompute
    assert pol.pull_tokens(cheap, 8) == 18 and pol.pull_tokens(dear, 8) == 8 * 16
    assert pol.pull_tokens(b, 8) == pytest.approx(0.2 * 8 * 16)  # not measured yet: the default share
    assert pol.choose([a, cheap], hashes, prompt)[0].replica == "b"
    assert pol.choose([a, dear], hashes, prompt)[0].replica == "a"  # recomputing there loses to waiting


def test_pull_estimate_in_router_tokens():
    from radixserve.engine.core.peer_driver import PullEstimate
    e = PullEstimate(16)
    assert e.in_tokens() == (-1.0, -1.0)
    e.note_pull(0.05, 4)
    e.note_pull(0.06, 8)
    e.note_step(1.0, 1000)  # 1 ms per token: 40 ms fixed = 40 tokens, 2.5 ms per block = 2.5 tokens
    fixed, per_block = e.in_tokens()
    assert fixed == pytest.approx(40, rel=0.05) and per_block == pytest.approx(2.5, rel=0.05)
