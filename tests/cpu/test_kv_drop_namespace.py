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
    n = len(kv.tree)
    # a2 still holds the shared first two blocks and its third; a1's own third block is free
    assert kv.drop_namespace("lora:a:1") == 1
    assert len(kv.tree) == n - 1 and kv.tree.get(b.block_hashes[0]) is not None
    kv.check_invariants([a2])
    kv.free(a2)
    assert kv.drop_namespace("lora:a:1") == 3
    assert kv.drop_namespace("lora:a:1") == 0
    assert len(kv.tree) == 3  # b's three blocks
    kv.check_invariants([])


def test_dropped_blocks_are_plain_free():
    kv = KVCacheManager(8, 4, True)
    for i in range(3000):  # distinct one-block chains through an 8-block pool: constant eviction
        s = make_seq([10 + i, 1, 2, 3, 4], ("lora:x:1",) if i % 2 else ())
        compute(kv, s, s.num_tokens)
        kv.free(s)
    cached = len(kv.tree)
    dropped = kv.drop_namespace("lora:x:1")
    assert dropped == cached - len(kv.tree) > 0
    head = [kv.pool.free_queue.popleft() for _ in range(dropped)]  # handed out first, no eviction needed
    assert not any(kv.tree.holds_block(b) for b in head)


def test_drop_namespace_covers_the_cpu_tier_and_events():
    from radixserve.engine.cache.events import BlockIndex, EventLog
    log = EventLog("e")
    kv = KVCacheManager(8, 4, True, num_cpu_blocks=16, events=log, demote_window=8)
    s = make_seq(list(range(13)), ("lora:a:1",))
    compute(kv, s, s.num_tokens)
    kv.free(s)
    t = kv.cpu.plan_demotions()
    kv.cpu.take_started()
    kv.cpu.complete(t.task_id, True)
    assert kv.tree.num_cpu == 3
    assert kv.drop_namespace("lora:a:1") == 3
    assert len(kv.tree) == 0 and kv.cpu.pool.num_free == 16
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
    assert len(kv.tree) == 2
