"""Block tables of sequences over the device KV pool, with the two-tier radix cache.

The scheduler asks which prefix of a new sequence is cached (``lookup``),
whether the blocks for the next tokens can be had (``allocate``), and gives
them back (``free``). After each step ``commit`` makes newly completed blocks
shareable at once. The CPU tier (engine/cache/cpu_tier.py) hooks into device
eviction: a cached block with a CPU copy loses only its device copy; the
scheduler and engine drive its transfers through this class only
(``plan_transfers``, ``take_transfers``, ``complete_transfer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.engine.cache.block_pool import BlockPool
from radixserve.engine.cache.cpu_tier import CpuTier, Transfer
from radixserve.engine.cache.events import (
    CLEARED,
    CPU,
    EVICTED,
    GPU,
    STORED,
    EventLog,
    Snapshot,
    SnapshotEntry,
)
from radixserve.engine.cache.hashing import parent_hash
from radixserve.engine.cache.peer import PeerBook
from radixserve.engine.cache.radix import RadixNode, RadixTree
from radixserve.engine.core.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixHit:
    """A cached prefix: device-tier nodes, then CPU-tier nodes to swap in."""

    gpu_nodes: list[RadixNode] = field(default_factory=list)
    cpu_nodes: list[RadixNode] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.gpu_nodes) + len(self.cpu_nodes)

    def num_tokens(self, block_size: int) -> int:
        return self.num_blocks * block_size


@dataclass(frozen=True)
class StepTransfers:
    """Cache-queue task ids of the swap-outs one step starts."""

    before_forward: list[int] = field(default_factory=list)  # copy-on-evict: before the step writes a block
    wait: list[int] = field(default_factory=list)  # every swap-out: done before the step replies


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 num_cpu_blocks: int = 0, events: EventLog | None = None, demote_window: int = 0,
                 max_pulls: int = 4):
        if num_cpu_blocks and not enable_prefix_caching:
            raise ValueError("the CPU tier (swap_space > 0) holds prefix-cache blocks; "
                             "it needs enable_prefix_caching=True")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.events = events or EventLog("local")
        self.tree = RadixTree()
        self.pool = BlockPool(num_blocks, is_cached=self.tree.holds_block, on_evict=self._evict_gpu)
        self.cpu = CpuTier(self, num_cpu_blocks, demote_window) if num_cpu_blocks else None
        self.peer = PeerBook(self, max_pulls)  # peer KV export pins and import pulls (cache/peer.py)
        self.num_evicted_blocks = 0
        self.namespaces: dict[int, tuple[str, ...]] = {}  # root hash -> the namespace it hashes

    # -- queries -------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Device blocks an allocation can take (plain free plus evictable cached)."""
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of device blocks referenced by live sequences (evictable cache counts as free)."""
        return self.pool.num_used / self.pool.num_blocks

    @property
    def has_cpu_tier(self) -> bool:
        return self.cpu is not None

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu.pool.num_blocks if self.cpu is not None else 0

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.cpu.pool.num_free if self.cpu is not None else 0

    @property
    def cpu_usage(self) -> float:
        return self.cpu.usage if self.cpu is not None else 0.0

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the radix tree holds, in either tier."""
        return len(self.tree)

    @property
    def num_gpu_cached_blocks(self) -> int:
        return self.tree.num_gpu

    @property
    def num_cpu_cached_blocks(self) -> int:
        return self.tree.num_cpu

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self.tree

    def snapshot(self) -> Snapshot:
        """Every cached block and its ready tiers, as of the last recorded event."""
        blocks = [SnapshotEntry(n.block_hash, n.parent_hash, n.root,
                                ([GPU] if n.gpu_ready else []) + ([CPU] if n.cpu_ready else []))
                  for n in self.tree.nodes() if n.gpu_ready or n.cpu_ready]
        return Snapshot(self.events.engine_id, self.events.next_seq - 1, blocks)

    def lookup(self, seq: Sequence) -> PrefixHit:
        """Longest cached prefix of the sequence's full blocks, device tier first.

        Capped one token short of the sequence so its last token is always
        recomputed: that token's logits are what the next sample needs.
        """
        if not self.enable_prefix_caching:
            return PrefixHit()
        max_blocks = (seq.num_tokens - 1) // self.block_size
        nodes = self.tree.match(seq.block_hashes[:max_blocks])
        split = next((i for i, n in enumerate(nodes) if not n.gpu_ready), len(nodes))
        return PrefixHit(nodes[:split], nodes[split:])

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> int:
        """Free-queue blocks an allocation would take (new ones + revived evictable hits)."""
        hit = hit or PrefixHit()
        held = len(seq.block_ids) + hit.num_blocks
        computed = seq.num_computed_tokens + hit.num_tokens(self.block_size)
        new = max(0, cdiv(computed + num_new_tokens, self.block_size) - held)
        revived = sum(1 for n in hit.gpu_nodes if self.pool.ref_cnt[n.gpu_id] == 0)
        return new + len(hit.cpu_nodes) + revived

    # -- mutations -----------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Grow the block table to hold ``num_new_tokens`` more tokens.

        A ``hit`` (only for a sequence holding no blocks yet) is shared first
        and counts as computed; its CPU-tier part gets fresh device blocks and
        a swap-in that must complete before the sequence runs (see
        ``is_swapping_in``). Returns False, changing nothing, when blocks are short.
        """
        if self.blocks_needed(seq, num_new_tokens, hit) > self.pool.num_free:
            return False
        if hit is not None and hit.num_blocks:
            assert not seq.block_ids, "prefix hits apply only to a sequence with no blocks"
            for node in hit.gpu_nodes:  # revive before allocating, or they could be evicted
                self._share(node)
            seq.block_ids = [n.gpu_id for n in hit.gpu_nodes]
            if hit.cpu_nodes:
                self._tier().start_promotion(seq, hit.cpu_nodes)
            seq.num_computed_tokens = hit.num_tokens(self.block_size)
            seq.num_committed_blocks = hit.num_blocks
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        seq.block_ids.extend(self.pool.allocate_many(total - len(seq.block_ids)))
        return True

    def is_swapping_in(self, seq: Sequence) -> bool:
        return self.cpu is not None and self.cpu.is_promoting(seq)

    def commit(self, seq: Sequence) -> None:
        """Insert the sequence's newly computed full blocks into the radix tree."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for i in range(seq.num_committed_blocks, num_full):
            parent = parent_hash(seq.block_hashes, i)
            own = seq.block_ids[i]
            existing = self.tree.get(seq.block_hashes[i])
            if existing is not None and existing.gpu_pending:
                break  # its copy is still being swapped in: commit on a later step
            fresh = existing is None or existing.gpu is None
            if i == 0:
                self.namespaces.setdefault(seq.root_hash, tuple(seq.request.namespace))
            node = self.tree.insert(parent, seq.root_hash, seq.block_hashes[i], own)
            if fresh:
                self.events.record_node(True, GPU, node, STORED)
            elif node.gpu != own:
                # Another sequence cached the same block first: adopt its copy
                # (same tokens, same KV) so every committed block of a sequence
                # is a tree node and a referenced node's ancestors stay
                # referenced -- which is what keeps eviction from the bottom.
                self._share(node)
                self.pool.free([own])
                seq.block_ids[i] = node.gpu_id
            seq.num_committed_blocks = i + 1

    def free(self, seq: Sequence, demote: bool = True) -> None:
        """Release every block of the sequence (cached ones stay evictable).

        ``demote=False`` (a recompute preemption): the cached blocks this
        releases stay in the device tree but never get a CPU copy, so evicting
        one drops it, as without a CPU tier.
        """
        if self.cpu is not None and self.cpu.defer_free(seq):
            return  # a swap-in still writes its blocks: released when it completes
        if self.peer.defer_free(seq):
            return  # a peer import still writes its blocks: released when it completes
        if not demote and self.cpu is not None:
            for block in seq.block_ids:
                if self.pool.ref_cnt[block] == 1 and self.tree.holds_block(block):
                    node = self.tree.node_of_block(block)
                    node.keep_off_cpu = node.cpu is None
        self._release(seq)

    def release(self, seq: Sequence) -> None:
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.free(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_committed_blocks = 0

    def _share(self, node: RadixNode) -> None:
        """One more reference to a cached device block (a hit, or an adopted copy)."""
        assert node.gpu is not None
        self.pool.touch(node.gpu)
        node.keep_off_cpu = False  # in use again: demotable like any other block

    # -- CPU-tier transfers (the scheduler and engine drive them through these) ----------

    def _tier(self) -> CpuTier:
        assert self.cpu is not None, "no CPU tier (swap_space = 0)"
        return self.cpu

    @property
    def has_inflight_transfers(self) -> bool:
        return self.cpu is not None and bool(self.cpu.inflight)

    def swapping_in_hashes(self) -> set[int]:
        """Blocks being promoted: a prompt continuing through them waits, not recomputes."""
        hashes = self.cpu.inflight_hashes() if self.cpu is not None else set()
        return hashes | self.peer.inflight_hashes()

    def plan_transfers(self) -> StepTransfers:
        """End of a schedule: the swap-outs of the step. The copy-on-evict batch
        (blocks this step's allocations reuse) runs before its forward; the
        write-back of the next eviction candidates runs beside it."""
        if self.cpu is None:
            return StepTransfers()
        evicted = self.cpu.flush_evictions()
        demotion = self.cpu.plan_demotions()
        before = [evicted.task_id] if evicted is not None else []
        return StepTransfers(before, before + ([demotion.task_id] if demotion is not None else []))

    def take_transfers(self) -> list[Transfer]:
        """Transfers started since the last call, for the cache queue."""
        return self.cpu.take_started() if self.cpu is not None else []

    def complete_transfer(self, task_id: int, ok: bool) -> Transfer:
        """Apply a transfer every rank acknowledged (ok) or one that failed anywhere."""
        t = self._tier().complete(task_id, ok)
        if t.orphaned and t.seq is not None:
            self._release(t.seq)  # its sequence finished while the swap-in ran
        return t

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
        """Forget every cached block; False (nothing done) if any is in use."""
        if any(n.gpu is not None and self.pool.ref_cnt[n.gpu] for n in self.tree.nodes()):
            return False
        if (self.cpu is not None and self.cpu.inflight) or self.peer.pulls:
            return False
        for node in self.tree.clear():
            for tier, block in ((GPU, node.gpu), (CPU, node.cpu)):
                if block is not None:
                    self.events.record_node(False, tier, node, CLEARED)
            if node.gpu is not None:
                self.pool.uncache(node.gpu)
        return True

    def clear_all(self) -> None:
        """The workers lost their pools (restart): forget every block, both tiers."""
        for node in self.tree.nodes():
            for tier, ready in ((GPU, node.gpu_ready), (CPU, node.cpu_ready)):
                if ready:
                    self.events.record_node(False, tier, node, CLEARED)
        self.tree.clear()
        self.peer.clear()
        self.pool = BlockPool(self.pool.num_blocks, is_cached=self.tree.holds_block, on_evict=self._evict_gpu)
        if self.cpu is not None:
            self.cpu = CpuTier(self, self.cpu.pool.num_blocks, self.cpu.window)

    # -- eviction (called by the pools when a cached block is reused) ---------------------

    def _evict_gpu(self, block_id: int) -> None:
        node = self.tree.node_of_block(block_id)
        assert not node.cpu_pending, "evicting a device block whose CPU copy is being written"
        self.num_evicted_blocks += 1
        if node.cpu_ready or (self.cpu is not None and self.cpu.demote_on_evict(node)):
            # A CPU copy exists (or is being made before this block is overwritten):
            # only the device copy goes.
            self.tree.set_gpu(node, None)
            self.events.record_node(False, GPU, node, EVICTED)
            return
        self.drop_subtree(node)

    def drop_subtree(self, node: RadixNode) -> None:
        """Remove a node that lost its last copy, with every block under it
        (a chain without its prefix can never be hit). Nothing below may be
        in use: device copies are upward-closed, so below a node without a
        usable device copy there are only CPU-tier nodes."""
        for n in self.tree.remove_subtree(node):
            assert n is node or n.gpu is None, "dropping a block that has a device copy"
            for tier, ready in ((GPU, n.gpu_ready), (CPU, n.cpu_ready)):
                if ready:  # a copy still being written was never announced
                    self.events.record_node(False, tier, n, EVICTED)

    def drop_namespace(self, prefix: str) -> int:
        """Evict every unused cached block of the namespaces that start with
        ``prefix`` (e.g. an unloaded LoRA adapter's, under any tenant or cache
        salt), in both tiers; returns how many.

        Blocks still in use (referenced, or in a transfer) stay, with their
        prefixes: the unused nodes form whole subtrees, removed leaves first.
        """
        roots = {r for r, ns in self.namespaces.items() if ns[:1] == (prefix,)}
        dropped = 0
        for top in [n for n in self.tree.nodes() if n.root in roots and n.parent is None]:
            for n in list(top.subtree()):  # children before parents
                if n.children or self._in_use(n):
                    continue
                gpu, cpu = n.gpu, n.cpu
                self.drop_subtree(n)
                if gpu is not None:  # reuse it first, like a never-cached block
                    self.pool.uncache(gpu)
                if cpu is not None:
                    self._tier().pool.uncache(cpu)
                dropped += 1
        return dropped

    def _in_use(self, n: RadixNode) -> bool:
        if n.gpu_pending or n.cpu_pending:
            return True
        if n.gpu is not None and self.pool.ref_cnt[n.gpu]:
            return True
        return n.cpu is not None and self.cpu is not None and self.cpu.pool.ref_cnt[n.cpu] > 0

    def check_invariants(self, live: list[Sequence]) -> None:
        """Assert the bookkeeping is consistent with the live sequences (tests, debugging)."""
        refs = [0] * self.pool.num_blocks
        for seq in live:
            assert len(set(seq.block_ids)) == len(seq.block_ids), f"seq {seq.seq_id} holds a block twice"
            for b in seq.block_ids:
                refs[b] += 1
            for i in range(seq.num_committed_blocks):  # committed blocks are the tree's copies
                node = self.tree.get(seq.block_hashes[i])
                assert node is not None and node.gpu == seq.block_ids[i], \
                    f"seq {seq.seq_id} block {i} is committed but not the tree's copy"
        if self.cpu is not None:
            self.cpu.add_deferred_refs(refs)
        self.peer.add_deferred_refs(refs)
        assert refs == self.pool.ref_cnt, "ref counts differ from the blocks sequences hold"
        free = list(self.pool.free_queue)
        assert len(free) == len(set(free)) == len(self.pool.free_queue), "free queue corrupt"
        assert set(free) == {b for b in range(self.pool.num_blocks) if refs[b] == 0}, \
            "free queue must hold exactly the unreferenced blocks"
        for node in self.tree.nodes():
            assert node.gpu is not None or node.cpu is not None, "node without any copy"
            if node.keep_off_cpu:
                assert node.cpu is None and node.gpu is not None and not self.pool.ref_cnt[node.gpu], \
                    "a block kept off the CPU tier must be an unreferenced device-only block"
            if node.parent is not None:
                assert self.tree.get(node.parent.block_hash) is node.parent, "orphaned tree node"
                if node.gpu is not None:
                    assert node.parent.gpu is not None, "device copies are not upward-closed"
            if node.gpu is not None and self.pool.ref_cnt[node.gpu]:
                p = node.parent
                while p is not None:  # a used node's whole prefix is in use too
                    assert self.pool.ref_cnt[p.gpu_id], "referenced node under an unreferenced parent"
                    p = p.parent
        head_cached = next((b for b in free if self.tree.holds_block(b)), None)
        if head_cached is not None:
            assert not self.tree.node_of_block(head_cached).has_gpu_children(), \
                "next cached block to evict still has device-resident children"
        if self.cpu is not None:
            self.cpu.check_invariants()
