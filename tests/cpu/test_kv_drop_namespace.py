"""KVCacheManager.drop_namespace: evict a namespace's unreferenced cached blocks
(what unloading a LoRA adapter does), leaving other namespaces and referenced blocks."""
from __future__ import annotations

from radixserve.engine.cache.kv_manager import KVCacheManager
from tests.cpu.helpers import compute, make_seq, tree_tiers


def test_drop_namespace_evicts_only_that_namespace_unreferenced():
    kv = KVCacheManager(32, 4, True)
    toks = list(range(100, 113))
    a1, a2, b = make_seq(toks, ("lora:a:1",)), make_seq(toks[:9] + [7, 7, 7], ("lora:a:1",)), make_seq(toks, ("b",))
    for s in (a1, a2, b):
        compute(kv, s, s.num_tokens)
    kv.free(a1)
    kv.free(b)
    n = kv.num_cached_blocks
    # a2 still holds the shared first two blocks and its third; a1's own third block is free
    assert kv.drop_namespace("lora:a:1") == 1
    assert kv.num_cached_blocks == n - 1 and kv.is_cached(b.block_hashes[0])
    kv.check_invariants([a2])
    kv.free(a2)
    assert kv.drop_namespace("lora:a:1") == 3
    assert kv.drop_namespace("lora:a:1") == 0
    assert kv.num_cached_blocks == 3  # b's three blocks
    kv.check_invariants([])


def test_dropped_blocks_are_plain_free():
    kv = KVCacheManager(8, 4, True)
    for i in range(3000):  # distinct one-block chains through an 8-block pool: constant eviction
        s = make_seq([10 + i, 1, 2, 3, 4], ("lora:x:1",) if i % 2 else ())
        compute(kv, s, s.num_tokens)
        kv.free(s)
    cached = kv.num_cached_blocks
    dropped = kv.drop_namespace("lora:x:1")
    assert dropped == cached - kv.num_cached_blocks > 0
    evicted = kv.num_evicted_blocks
    s = make_seq(list(range(5000, 5000 + 4 * dropped)))  # takes `dropped` blocks
    compute(kv, s, s.num_tokens)
    assert kv.num_evicted_blocks == evicted  # the dropped blocks were handed out first: no eviction


def test_drop_namespace_covers_the_cpu_tier_and_events():
    from radixserve.engine.cache.events import BlockIndex, EventLog
    from tests.cpu.helpers import settle
    log = EventLog("e")
    kv = KVCacheManager(8, 4, True, num_cpu_blocks=16, events=log, demote_window=8)
    s = make_seq(list(range(13)), ("lora:a:1",))
    compute(kv, s, s.num_tokens)
    kv.free(s)
    settle(kv)  # demote its blocks
    assert kv.num_cpu_cached_blocks == 3
    assert kv.drop_namespace("lora:a:1") == 3
    assert kv.num_cached_blocks == 0 and kv.num_free_cpu_blocks == 16
    index = BlockIndex()
    assert index.apply(log.drain()) and index.tiers == tree_tiers(kv) == {}
    kv.check_invariants([])


def test_drop_namespace_reaches_every_tenant_of_the_adapter():
    kv = KVCacheManager(32, 4, True)
    for ns in (("lora:a:1", "tenant:x"), ("lora:a:1", "tenant:y"), ("lora:b:2", "tenant:x")):
        s = make_seq(list(range(9)), ns)
        compute(kv, s, s.num_tokens)
        kv.free(s)
    assert kv.drop_namespace("lora:a:1") == 4
    assert kv.num_cached_blocks == 2
