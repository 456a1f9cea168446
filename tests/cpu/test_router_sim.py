"""benchmarks/router_sim.py: its engine-like cache and a tiny end-to-end run (pure Python, no Ray)."""
from __future__ import annotations

import json

from radixserve.benchmarks.router_sim import (
    BlockCache,
    SimConfig,
    SimReplica,
    load_trace,
    oracle_hit_rate,
    simulate,
)
from radixserve.cluster.routing_policy import LoadReport


def test_cache_evicts_least_recent_leaf_first_and_keeps_pinned_blocks():
    c = BlockCache(4)
    assert c.admit((1, 2, 3), 0, 0)  # a chain 1 <- 2 <- 3, pinned while it runs
    assert not c.admit((7, 8), 0, 0)  # 1 block empty, none evictable: waits, like the engine
    c.release((1, 2, 3), 0)
    assert c.admit((9,), 0, 0)  # the empty block
    c.release((9,), 0)
    assert c.admit((1, 5), 1, 0)  # hit on 1; needs one block: evicts leaf 3, not its parents
    assert list(c.lru) == [2, 9, 5, 1] and c.hit((1, 2, 3), 3) == 2
    c.release((1, 5), 0)
    assert c.admit((6, 7), 0, 0)  # evicts the two oldest leaves (2, then 9), never pinned ones
    assert set(c.lru) == {5, 1, 6, 7}


def conversations(tmp_path, n: int, cfg: SimConfig):
    """A Mooncake-format trace of ``n`` conversations of 5 growing turns (each extends its predecessor)."""
    rows = []
    for i in range(5 * n):
        conv, turn = i % n, i // n
        ids = [1000 * conv + k for k in range(turn + 2)]
        rows.append({"timestamp": i * 50, "input_length": 512 * len(ids), "output_length": 8, "hash_ids": ids})
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    return load_trace(cfg, trace)


def test_simulated_cluster_ours_keeps_the_cache_that_pow2_loses(tmp_path):
    cfg = SimConfig(replicas=4, blocks_per_replica=64, max_blocks=16, rate_per_replica=0)
    reqs = conversations(tmp_path, 48, cfg)
    assert len(reqs) == 240 and reqs[0].block_hashes[0] == reqs[1].block_hashes[0]  # the system block
    oracle = oracle_hit_rate(reqs, cfg)
    ours, pow2 = simulate(reqs, cfg, "prefix_affinity", oracle=oracle), simulate(reqs, cfg, "pow2", oracle=oracle)
    assert ours.requests == pow2.requests == 240
    assert ours.hit_rate > 1.3 * pow2.hit_rate and ours.hit_over_oracle > 0.9
    assert ours.load_max_over_mean < 1.3
    assert ours.ttft_p50_s <= pow2.ttft_p50_s


def test_lagged_view_sees_the_past():
    """publish_interval_s > 0: the router sees blocks and load as last published, not as they are."""
    c = BlockCache(2)
    c.admit((1,), 0, 0, pin=False, now=1.0)
    c.admit((2,), 0, 0, pin=False, now=2.0)
    c.admit((3,), 0, 0, pin=False, now=3.0)  # pushes 1 out at t=3
    assert c.hit((1,), 1) == 0 and c.seen_hit((1,), 1, 2.5) == 1  # evicted since the view: still believed
    assert c.hit((3,), 1) == 1 and c.seen_hit((3,), 1, 2.5) == 0  # stored since the view: unseen
    cfg = SimConfig(replicas=2, blocks_per_replica=64, max_blocks=16, publish_interval_s=0.5, sync_lag_s=0.1)
    rep = SimReplica("replica-00", cfg)
    rep._record(LoadReport(100, 1.0, 64, 64))
    rep._record(LoadReport(300, 1.3, 64, 64))
    seen = rep.seen_at(1.45)
    assert seen <= 1.35 and rep.load(1.45).queued_tokens == (300 if seen >= 1.3 else 100)
    assert rep.load(10.0).queued_tokens == 300


def test_peer_pulls_recover_what_round_robin_scatters(tmp_path):
    cfg = SimConfig(replicas=4, blocks_per_replica=64, max_blocks=16, rate_per_replica=0)
    reqs = conversations(tmp_path, 47, cfg)  # 47 conversations: round robin sends each turn elsewhere
    scattered = simulate(reqs, cfg, "round_robin+nopull")
    pulled = simulate(reqs, cfg, "round_robin+pull")
    assert scattered.remote_hit_rate == 0 and pulled.policy == "round_robin+pull"
    # each turn lands on another replica than its predecessor; the pull brings the conversation
    assert pulled.remote_hit_rate > 0.2 and pulled.hit_rate > 1.5 * scattered.hit_rate
    assert pulled.hit_rate <= pulled.oracle_hit_rate + 1e-9
    # and pricing pulls does not scatter what affinity keeps together (nor pin it all on one replica)
    ours, ours_pull = simulate(reqs, cfg, "prefix_affinity+nopull"), simulate(reqs, cfg, "prefix_affinity")
    assert ours_pull.hit_rate >= 0.95 * ours.hit_rate and ours_pull.load_max_over_mean < 1.3
