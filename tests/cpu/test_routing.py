"""Cluster routing and the metadata directory, without Ray: pure, deterministic logic."""
from __future__ import annotations

import pytest

from radixserve.cluster.metadata import CacheDirectory, FingerprintMismatch, LocalIndex
from radixserve.cluster.routing_policy import ReplicaState, RouterConfig, RoutingPolicy, rendezvous
from radixserve.engine.cache.events import EventLog
from radixserve.engine.cache.hashing import prompt_block_hashes
from radixserve.engine.cache.kv_manager import KVCacheManager
from tests.cpu.helpers import run_seq


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
    t = kva.cpu.plan_demotions()
    kva.cpu.take_started()
    kva.cpu.complete(t.task_id, True)
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
    from radixserve.engine.cache.events import Snapshot, SnapshotEntry
    snap = Snapshot("a", log.next_seq - 1, [SnapshotEntry(n.block_hash, None, n.root, ["gpu"])
                                            for n in kv.tree.nodes()])
    d.push_snapshot("a", snap)
    run_seq(kv, [90 + i for i in range(5)])
    assert d.push("a", log.drain())  # continues after the snapshot's sequence number
    assert set(d.replicas["a"].index.tiers) == {n.block_hash for n in kv.tree.nodes()}


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
