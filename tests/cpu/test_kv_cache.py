"""Block pool, radix tree and KV manager: unit tests plus hypothesis state machines.

The property: after any sequence of allocate / compute / append / fork / free /
preempt operations, no block is leaked, double-freed, or shared without a
reference, the tree is consistent, and the next cached block to be evicted is
always a leaf.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.engine.cache.block_pool import FreeBlockQueue
from radixserve.engine.cache.hashing import prompt_block_hashes
from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.core.sequence import Sequence
from tests.cpu.helpers import compute, make_seq

BS = 4
def test_free_queue_order_and_o1_ops():
    q = FreeBlockQueue(4)
    assert list(q) == [0, 1, 2, 3]
    q.remove(1)
    q.append(1)
    q.remove(2)
    q.appendleft(2)
    assert list(q) == [2, 0, 3, 1]
    assert q.popleft() == 2 and len(q) == 3


def test_hashes_chain_and_namespace():
    toks = list(range(10))
    a = prompt_block_hashes(toks, BS)
    assert len(a) == 2  # only full blocks
    assert prompt_block_hashes(toks[:8] + [99], BS) == a  # the partial tail does not matter
    assert prompt_block_hashes([1] + toks[1:], BS)[1] != a[1]  # a change upstream changes the chain
    assert prompt_block_hashes(toks, BS, ("salt",)) != a  # a namespace never shares blocks


def test_prefix_hit_is_block_aligned_and_leaves_last_token():
    kv = KVCacheManager(16, BS, True)
    a = make_seq(list(range(12)))
    compute(kv, a, 12)
    kv.free(a)
    b = make_seq(list(range(12)))  # identical prompt: last token must be recomputed
    hit = kv.lookup(b)
    assert hit.num_tokens(BS) == 8
    c = make_seq(list(range(13)))
    assert kv.lookup(c).num_tokens(BS) == 12
    d = make_seq(list(range(6)) + [77] * 7)
    assert kv.lookup(d).num_tokens(BS) == 4


def test_eviction_only_when_needed_lru_leaf_first():
    kv = KVCacheManager(6, BS, True)
    a = make_seq(list(range(8)) + [0])  # 2 full blocks + 1 partial
    compute(kv, a, 9)
    kv.free(a)
    assert len(kv.tree) == 2 and kv.pool.num_free == 6  # cached blocks stay, evictable
    b = make_seq([50 + i for i in range(12)])  # needs 3 blocks: 3 plain free ones exist
    compute(kv, b, 12)
    assert len(kv.tree) == 5 and kv.num_evicted_blocks == 0
    c = make_seq([90, 91, 92])  # 1 block: the partial block of `a` was plain free -> no eviction
    compute(kv, c, 3)
    assert kv.num_evicted_blocks == 0
    e = make_seq([80, 81])  # now an eviction: a's deepest block (a leaf) goes first
    compute(kv, e, 2)
    assert kv.num_evicted_blocks == 1
    assert kv.lookup(make_seq(list(range(9)))).num_tokens(BS) == 4
    kv.check_invariants([b, c, e])


def test_duplicate_blocks_are_adopted():
    kv = KVCacheManager(16, BS, True)
    a, b = make_seq(list(range(9))), make_seq(list(range(9)))
    assert kv.allocate(a, 9) and kv.allocate(b, 9)  # both miss: computed side by side
    for s in (a, b):
        s.num_computed_tokens = 9
        kv.commit(s)
    assert a.block_ids[:2] == b.block_ids[:2]  # b adopted a's cached copies
    kv.check_invariants([a, b])
    kv.free(a)
    kv.free(b)
    kv.check_invariants([])
    assert kv.pool.num_free == 16


def test_fork_shares_full_blocks_and_copies_partial():
    kv = KVCacheManager(16, BS, True)
    p = make_seq(list(range(10)))
    compute(kv, p, 10)
    child = make_seq(list(range(10)))
    copies = kv.fork(p, child)
    assert child.block_ids[:2] == p.block_ids[:2]
    assert copies == [(p.block_ids[2], child.block_ids[2])]
    kv.check_invariants([p, child])


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(16, BS, False)
    a = make_seq(list(range(12)))
    compute(kv, a, 12)
    kv.free(a)
    assert kv.lookup(make_seq(list(range(12)))).num_tokens(BS) == 0 and len(kv.tree) == 0


class KVMachine(RuleBasedStateMachine):
    """Random interleavings over a small pool with heavily shared prompts."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(24, BS, True)
        self.live: list[Sequence] = []

    @rule(prefix=st.integers(0, 3), length=st.integers(1, 14), tail=st.integers(0, 5),
          ns=st.sampled_from([(), ("tenant-a",)]))
    def admit(self, prefix, length, tail, ns):
        tokens = [prefix * 100 + i for i in range(length)] + [7] * tail
        seq = make_seq(tokens, ns)
        hit = self.kv.lookup(seq)
        n = seq.num_tokens - hit.num_tokens(BS)
        if self.kv.allocate(seq, n, hit):
            seq.num_computed_tokens += n
            self.kv.commit(seq)
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 3))
    def decode(self, data, token):
        seq = data.draw(st.sampled_from(self.live))
        seq.append_token(token)
        if self.kv.allocate(seq, 1):
            seq.num_computed_tokens += 1
            self.kv.commit(seq)
        else:  # what the scheduler does when the pool is dry: preempt (recompute)
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            self.live.remove(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = make_seq(list(parent.token_ids), parent.request.namespace)
        try:
            self.kv.fork(parent, child)
        except RuntimeError:
            return
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.kv.free(seq)
        self.live.remove(seq)

    @invariant()
    def consistent(self):
        self.kv.check_invariants(self.live)

    def teardown(self):
        for seq in self.live:
            self.kv.free(seq)
        self.kv.check_invariants([])
        assert self.kv.pool.num_free == self.kv.pool.num_blocks  # nothing leaked


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
