"""The CPU tier of the radix cache: which blocks move between the pools, and when.

Demotion (device -> CPU) is a write-back ahead of need: at the end of each
schedule, the cached blocks within ``demote_window`` of the device free
queue's head -- the next ones an allocation would evict -- get a CPU copy.
The copy runs beside that step's forward and completes before the step
replies, so no allocation can reuse a block mid-copy; once it completes the
device copy is dropped if nothing uses it. Eviction of a device block that
has a CPU copy then loses nothing.

Promotion (CPU -> device) happens when a prompt's prefix continues in the
CPU tier: fresh device blocks are allocated, the CPU blocks pinned, and the
sequence waits (possibly several steps) until every rank acknowledged the
swap-in. This module only keeps the books; engine/cache/transfer.py moves
the bytes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixserve.engine.cache.block_pool import BlockPool
from radixserve.engine.cache.events import CPU, DEMOTED, EVICTED, GPU, PROMOTED
from radixserve.engine.cache.radix import RadixNode

if TYPE_CHECKING:
    from radixserve.engine.cache.kv_manager import KVCacheManager
    from radixserve.engine.core.sequence import Sequence

SWAP_IN, SWAP_OUT = "swap_in", "swap_out"


@dataclass(eq=False)
class Transfer:
    task_id: int
    kind: str  # SWAP_IN (CPU -> device) or SWAP_OUT (device -> CPU)
    gpu_blocks: list[int]
    cpu_blocks: list[int]
    nodes: list[RadixNode] = field(repr=False)
    seq: Sequence | None = field(default=None, repr=False)  # SWAP_IN: who waits for it
    orphaned: bool = False  # the waiting sequence finished before the swap-in did
    before_forward: bool = False  # SWAP_OUT of evicted blocks: must run before the step writes them


def _depth(node: RadixNode) -> int:
    d = 0
    while node.parent is not None:
        node, d = node.parent, d + 1
    return d


class CpuTier:
    def __init__(self, kv: KVCacheManager, num_blocks: int, demote_window: int):
        self.kv = kv
        self.tree = kv.tree
        self.pool = BlockPool(num_blocks, is_cached=self.tree.holds_cpu_block, on_evict=self._evict)
        self.window = demote_window
        self.inflight: dict[int, Transfer] = {}
        self.started: list[Transfer] = []  # not yet handed to the transfer queue
        self._evicting: Transfer | None = None  # copy-on-evict swap-outs of the current step
        self._promoting: dict[int, Transfer] = {}  # seq id -> its swap-in
        self._ids = itertools.count(1)
        self.swapped_in_blocks = 0
        self.swapped_out_blocks = 0

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def inflight_hashes(self) -> set[int]:
        """Blocks being promoted: a prompt continuing through them waits, not recomputes."""
        return {n.block_hash for t in self.inflight.values() if t.kind == SWAP_IN for n in t.nodes}

    # -- promotion ------------------------------------------------------------------------

    def start_promotion(self, seq: Sequence, nodes: list[RadixNode]) -> Transfer:
        for node in nodes:  # pin the sources before allocating can evict anything
            self.pool.touch(node.cpu)
        gpu = self.kv.pool.allocate_many(len(nodes))
        for node, block in zip(nodes, gpu):  # parents first: device copies stay upward-closed
            self.tree.set_gpu(node, block, pending=True)
        seq.block_ids.extend(gpu)
        t = Transfer(next(self._ids), SWAP_IN, gpu, [n.cpu for n in nodes], nodes, seq)
        self.inflight[t.task_id] = t
        self.started.append(t)
        self._promoting[seq.seq_id] = t
        return t

    def is_promoting(self, seq: Sequence) -> bool:
        return seq.seq_id in self._promoting

    def defer_free(self, seq: Sequence) -> bool:
        """A finished sequence whose swap-in still runs keeps its blocks until it ends."""
        t = self._promoting.get(seq.seq_id)
        if t is None:
            return False
        t.orphaned = True
        return True

    # -- demotion ---------------------------------------------------------------------------

    def demote_on_evict(self, node: RadixNode) -> bool:
        """An allocation is about to reuse a cached device block that has no CPU
        copy yet (write-back did not get to it): copy it out first. The copy runs
        on the worker before the step's forward; until then the CPU copy is
        pending and cannot be hit. False if the CPU tier has no room."""
        if self.pool.num_free == 0:
            return False
        block = self.pool.allocate()
        self.tree.set_cpu(node, block, pending=True)
        batch = self._evicting
        if batch is None:
            batch = self._evicting = Transfer(next(self._ids), SWAP_OUT, [], [], [], before_forward=True)
            self.inflight[batch.task_id] = batch
        batch.gpu_blocks.append(node.gpu)
        batch.cpu_blocks.append(block)
        batch.nodes.append(node)
        return True

    def flush_evictions(self) -> Transfer | None:
        """Close this step's batch of copy-on-evict swap-outs (see demote_on_evict)."""
        t, self._evicting = self._evicting, None
        if t is not None:
            self.started.append(t)
        return t

    def plan_demotions(self) -> Transfer | None:
        """Give the next ``window`` eviction candidates a CPU copy."""
        nodes = []
        for i, block in enumerate(self.kv.pool.free_queue):
            if i >= self.window or self.pool.num_free == 0:
                break
            if not self.tree.holds_block(block):
                continue  # a plain free block: nothing to save
            node = self.tree.node_of_block(block)
            if node.cpu is None and not node.gpu_pending:
                nodes.append(node)
        if not nodes:
            return None
        cpu: list[int] = []
        for node in nodes:
            if self.pool.num_free == 0:
                nodes = nodes[:len(cpu)]
                break
            block = self.pool.allocate()  # may evict CPU-only subtrees; never these device nodes
            self.tree.set_cpu(node, block, pending=True)
            cpu.append(block)
        t = Transfer(next(self._ids), SWAP_OUT, [n.gpu for n in nodes], cpu, nodes)
        self.inflight[t.task_id] = t
        self.started.append(t)
        return t

    def take_started(self) -> list[Transfer]:
        started, self.started = self.started, []
        return started

    # -- completion ---------------------------------------------------------------------------

    def complete(self, task_id: int, ok: bool) -> Transfer:
        """Apply a transfer every rank acknowledged (ok) or one that failed anywhere."""
        t = self.inflight.pop(task_id)
        if t.kind == SWAP_IN:
            self._finish_promotion(t, ok)
        else:
            self._finish_demotion(t, ok)
        return t

    def _finish_promotion(self, t: Transfer, ok: bool) -> None:
        del self._promoting[t.seq.seq_id]
        self.pool.free(t.cpu_blocks)  # unpin: the CPU copies stay cached
        events = self.kv.events
        for node in reversed(t.nodes):  # children first, so parents keep their device copy longest
            if ok:
                node.gpu_pending = False
                events.record(True, GPU, node.block_hash, _parent(node), node.root, PROMOTED)
            else:
                self.tree.set_gpu(node, None)  # its device block holds garbage: uncache it
        if ok:
            self.swapped_in_blocks += len(t.nodes)
        if t.orphaned:
            self.kv.pool.free(reversed(t.seq.block_ids))
            t.seq.block_ids = []
            t.seq.num_committed_blocks = 0

    def _finish_demotion(self, t: Transfer, ok: bool) -> None:
        events = self.kv.events
        for node, cpu in sorted(zip(t.nodes, t.cpu_blocks), key=lambda nc: -_depth(nc[0])):
            if self.tree.get(node.block_hash) is not node:  # dropped with an evicted subtree
                self.pool.free([cpu])
                continue
            if not ok:
                self.pool.free([cpu])
                if node.gpu is None:  # evicted meanwhile: no copy left at all
                    self.tree.set_cpu(node, None)
                    self.kv.drop_subtree(node)
                else:
                    self.tree.set_cpu(node, None)
                continue
            node.cpu_pending = False
            self.pool.free([cpu])  # now a cached, evictable CPU block
            events.record(True, CPU, node.block_hash, _parent(node), node.root, DEMOTED)
            gpu = node.gpu
            if gpu is None:
                continue  # evicted while copying (copy-on-evict): the CPU copy is all there is
            if self.kv.pool.ref_cnt[gpu] == 0 and not node.has_gpu_children():
                # Nothing uses the device copy: free it for real (head of the queue).
                self.tree.set_gpu(node, None)
                self.kv.pool.free_queue.remove(gpu)
                self.kv.pool.free_queue.appendleft(gpu)
                events.record(False, GPU, node.block_hash, _parent(node), node.root, DEMOTED)
        if ok:
            self.swapped_out_blocks += len(t.nodes)

    # -- eviction -----------------------------------------------------------------------------

    def _evict(self, block_id: int) -> None:
        node = self.tree.node_of_cpu_block(block_id)
        assert not node.cpu_pending, "evicting a CPU block that is still being written"
        if node.gpu is not None:  # the device copy stays; only the spare CPU copy goes
            self.tree.set_cpu(node, None)
            self.kv.events.record(False, CPU, node.block_hash, _parent(node), node.root, EVICTED)
            return
        for n in node.subtree():  # CPU-only below a CPU-only node: none may be pinned
            assert n.cpu is None or n is node or self.pool.ref_cnt[n.cpu] == 0, "evicting a pinned block"
        self.kv.drop_subtree(node)

    # -- checks ---------------------------------------------------------------------------------

    def add_deferred_refs(self, refs: list[int]) -> None:
        for t in self._promoting.values():
            if t.orphaned:
                for b in t.seq.block_ids:
                    refs[b] += 1

    def check_invariants(self) -> None:
        refs = [0] * self.pool.num_blocks
        for t in self.inflight.values():
            for b in t.cpu_blocks:
                refs[b] += 1
        assert refs == self.pool.ref_cnt, "CPU ref counts differ from in-flight transfers"
        free = set(self.pool.free_queue)
        assert free == {b for b in range(self.pool.num_blocks) if refs[b] == 0}, "CPU free queue corrupt"
        for node in self.tree.nodes():
            if node.cpu is not None:
                assert self.tree.node_of_cpu_block(node.cpu) is node
                if node.cpu_pending:
                    assert refs[node.cpu] == 1, "a CPU copy being written must be held by its transfer"


def _parent(node: RadixNode) -> int | None:
    return node.parent.block_hash if node.parent is not None else None
