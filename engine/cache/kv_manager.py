"""Block tables of sequences over one KV pool, with the radix prefix cache.

The scheduler asks three things: which prefix of a new sequence is cached
(``lookup``), whether the blocks for the next tokens can be had
(``allocate``), and to give them back (``free``). After each step it calls
``commit`` so newly completed blocks become shareable at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.cache.block_pool import BlockPool
from engine.cache.radix import RadixTree
from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PrefixHit:
    block_ids: list[int]

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.tree = RadixTree()
        self.pool = BlockPool(num_blocks, is_cached=self.tree.holds_block,
                              on_evict=self._evict)
        self.num_evicted_blocks = 0
        # First block hash of every committed chain -> the root hash (namespace)
        # it starts from, so a namespace's blocks can be dropped (drop_namespace).
        self._chain_roots: dict[int, int] = {}

    # -- queries ---------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (evictable cache counts as free)."""
        return self.pool.num_used / self.pool.num_blocks

    def lookup(self, seq: Sequence) -> PrefixHit:
        """Longest cached prefix of the sequence's full blocks.

        Capped one token short of the sequence so its last token is always
        recomputed: that token's logits are what the next sample needs.
        """
        if not self.enable_prefix_caching:
            return PrefixHit([])
        max_blocks = (seq.num_tokens - 1) // self.block_size
        return PrefixHit(self.tree.match(seq.block_hashes[:max_blocks]))

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> int:
        """Free-queue blocks an allocation would consume (new ones + revived evictable hits)."""
        held = len(seq.block_ids) + (len(hit.block_ids) if hit else 0)
        computed = seq.num_computed_tokens + (hit.num_tokens(self.block_size) if hit else 0)
        new = max(0, cdiv(computed + num_new_tokens, self.block_size) - held)
        revived = sum(1 for b in hit.block_ids if self.pool.ref_cnt[b] == 0) if hit else 0
        return new + revived

    # -- mutations -------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Grow the block table to hold ``num_new_tokens`` more tokens.

        With a ``hit`` (only for a sequence holding no blocks yet) the cached
        blocks are shared first and count as computed. Returns False, changing
        nothing, when the pool cannot supply the blocks.
        """
        if self.blocks_needed(seq, num_new_tokens, hit) > self.pool.num_free:
            return False
        if hit is not None and hit.block_ids:
            assert not seq.block_ids, "prefix hits apply only to a sequence with no blocks"
            for block_id in hit.block_ids:  # revive before allocating, or they could be evicted
                self.pool.touch(block_id)
            seq.block_ids = list(hit.block_ids)
            seq.num_computed_tokens = hit.num_tokens(self.block_size)
            seq.num_committed_blocks = len(hit.block_ids)
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        seq.block_ids.extend(self.pool.allocate_many(total - len(seq.block_ids)))
        return True

    def commit(self, seq: Sequence) -> None:
        """Insert the sequence's newly computed full blocks into the radix tree."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for i in range(seq.num_committed_blocks, num_full):
            parent = seq.block_hashes[i - 1] if i else None
            own = seq.block_ids[i]
            node = self.tree.insert(parent, seq.block_hashes[i], own)
            if i == 0:
                self._note_chain_root(seq.block_hashes[0], seq.root_hash)
            if node.block_id != own:
                # Another sequence cached the same block first: adopt its copy
                # (same tokens, same KV) so every committed block of a sequence
                # is a tree node and a referenced node's ancestors stay
                # referenced -- which is what keeps eviction leaf-only.
                self.pool.touch(node.block_id)
                self.pool.free([own])
                seq.block_ids[i] = node.block_id
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence (cached ones stay evictable)."""
        self.pool.free(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_committed_blocks = 0

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Share the parent's blocks with a new child sequence.

        Full blocks are shared by reference; a partially filled last block is
        copied (copy-on-write up front), since both will append to it. Returns
        the (src, dst) block copies the workers must run before the next step,
        or raises RuntimeError if no block is free for the copy.
        """
        assert not child.block_ids
        num_full = parent.num_computed_tokens // self.block_size
        shared = parent.block_ids[:num_full]
        partial = parent.block_ids[num_full:num_full + 1] if parent.num_computed_tokens % self.block_size else []
        if partial and self.pool.num_free < 1:
            raise RuntimeError("no free block for copy-on-write")
        for block_id in shared:
            self.pool.touch(block_id)
        child.block_ids = list(shared)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_committed_blocks = min(parent.num_committed_blocks, num_full)
        copies = []
        if partial:
            new_block = self.pool.allocate()
            child.block_ids.append(new_block)
            copies.append((partial[0], new_block))
        return copies

    def reset_prefix_cache(self) -> bool:
        """Forget every evictable cached block; False if any is still in use."""
        if any(self.pool.ref_cnt[n.block_id] for n in self.tree.nodes()):
            return False
        for node in self.tree.clear():
            self.pool.free_queue.remove(node.block_id)
            self.pool.free_queue.appendleft(node.block_id)
        return True

    def _note_chain_root(self, first_hash: int, root: int) -> None:
        self._chain_roots[first_hash] = root
        if len(self._chain_roots) > 2 * len(self.tree) + 1024:  # amortised pruning of evicted chains
            self._chain_roots = {h: r for h, r in self._chain_roots.items() if h in self.tree}

    def drop_namespace(self, root: int) -> int:
        """Evict every unreferenced cached block whose chain starts at ``root``
        (e.g. an unloaded LoRA adapter's namespace); returns how many.

        Blocks still referenced by live sequences stay: a referenced node's
        whole prefix is referenced too, so the unreferenced nodes under a chain
        form whole subtrees, removed leaves first. Their blocks go to the head
        of the free queue, like never-cached ones.
        """
        dropped = 0
        for first, r in list(self._chain_roots.items()):
            if r != root:
                continue
            del self._chain_roots[first]
            node = self.tree.get(first)
            if node is None:
                continue
            order, stack = [], [node]
            while stack:  # pre-order; reversed it visits children before their parent
                n = stack.pop()
                order.append(n)
                stack.extend(n.children.values())
            for n in reversed(order):
                if self.pool.ref_cnt[n.block_id] == 0 and n.is_leaf:
                    self.tree.remove_block(n.block_id)
                    self.pool.free_queue.remove(n.block_id)
                    self.pool.free_queue.appendleft(n.block_id)
                    dropped += 1
            if first in self.tree:  # still referenced: keep knowing its root
                self._chain_roots[first] = root
        return dropped

    def check_invariants(self, live: list[Sequence]) -> None:
        """Assert the bookkeeping is consistent with the live sequences (tests, debugging)."""
        refs = [0] * self.pool.num_blocks
        for seq in live:
            assert len(set(seq.block_ids)) == len(seq.block_ids), f"seq {seq.seq_id} holds a block twice"
            for b in seq.block_ids:
                refs[b] += 1
            for i in range(seq.num_committed_blocks):  # committed blocks are the tree's copies
                node = self.tree.get(seq.block_hashes[i])
                assert node is not None and node.block_id == seq.block_ids[i], \
                    f"seq {seq.seq_id} block {i} is committed but not the tree's copy"
        assert refs == self.pool.ref_cnt, "ref counts differ from the blocks sequences hold"
        free = list(self.pool.free_queue)
        assert len(free) == len(set(free)) == len(self.pool.free_queue), "free queue corrupt"
        assert set(free) == {b for b in range(self.pool.num_blocks) if refs[b] == 0}, \
            "free queue must hold exactly the unreferenced blocks"
        for node in self.tree.nodes():
            if node.parent is not None:
                assert self.tree.get(node.parent.block_hash) is node.parent, "orphaned tree node"
            if self.pool.ref_cnt[node.block_id]:
                p = node.parent
                while p is not None:  # a used node's whole prefix is in use too
                    assert self.pool.ref_cnt[p.block_id], "referenced node under an unreferenced parent"
                    p = p.parent
        head_cached = next((b for b in free if self.tree.holds_block(b)), None)
        if head_cached is not None:
            assert self.tree.node_of_block(head_cached).is_leaf, "next cached block to evict is not a leaf"

    def _evict(self, block_id: int) -> None:
        self.tree.remove_block(block_id)
        self.num_evicted_blocks += 1
