"""Peer KV: a prefix's blocks exported by the replica that holds them, imported by another.

The third source of blocks beside the device and CPU tiers. An EXPORT pins the
longest cached prefix of a chain (device or CPU tier, so nothing evicts it
meanwhile), has every rank copy those blocks out of its pools into bytes, and
unpins: a ``KVExport`` with one ``RankKV`` per rank. An IMPORT is a waiting
sequence whose request carries a ``PeerHint`` covering more blocks than its
local hit: the scheduler allocates device blocks for the missing part, the
engine fetches the export (engine/core/peer_driver.py), rank r writes rank r's
bytes into its pool over the cache queue, and the blocks are committed like
freshly computed ones. Until then they are not in the tree (no other lookup
sees them); a pull that fails, times out or comes back short lets the sequence
recompute what is missing in the very blocks it holds, so nothing leaks.

This module keeps the books only (no bytes move here; the byte codecs live in transfer.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from radixserve.engine.executor.protocol import RankKV

if TYPE_CHECKING:
    from radixserve.engine.cache.kv_manager import KVCacheManager
    from radixserve.engine.core.sequence import Sequence

EXPORT, IMPORT = "export", "import"  # cache-queue task kinds
FETCHING, WRITING = "fetching", "writing"


@dataclass(frozen=True)
class PeerHint:
    """Where a request's prefix is cached besides here (the cluster router says)."""

    holder: str      # the holder replica's id, opaque to the engine (the fetcher resolves it)
    num_blocks: int  # leading blocks of the prompt's chain the holder has cached

    def __post_init__(self) -> None:
        if self.num_blocks < 0:
            raise ValueError(f"PeerHint.num_blocks must be >= 0, got {self.num_blocks}")


@dataclass(frozen=True)
class KVExport:
    """A holder's blocks of a chain: the longest prefix it still had, every rank's bytes."""

    block_hashes: tuple[int, ...]
    ranks: tuple[RankKV, ...]  # by rank; each [layers, 2, len(block_hashes), block_size, kv_heads/tp, head_dim]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    @property
    def num_bytes(self) -> int:
        return sum(len(r.data) for r in self.ranks)


@dataclass(eq=False)
class ExportPin:
    """Blocks an export holds pinned while the ranks copy them out."""

    block_hashes: tuple[int, ...]
    gpu_blocks: list[int]  # the chain's device-resident part, in order
    cpu_blocks: list[int]  # then its CPU-tier-only part


@dataclass(eq=False)
class Pull:
    """A waiting sequence's import of blocks ``first .. first + len(block_hashes)`` of its chain."""

    pull_id: int
    seq: Sequence
    hint: PeerHint
    first: int  # blocks it already holds (the local hit)
    block_hashes: list[int]
    gpu_blocks: list[int]  # its own blocks the bytes go into
    deadline: float
    state: str = FETCHING
    orphaned: bool = False  # its sequence finished while the ranks were writing


class PeerBook:
    def __init__(self, kv: KVCacheManager, max_pulls: int):
        self.kv = kv
        self.max_pulls = max_pulls
        self.pulls: dict[int, Pull] = {}  # seq id -> its pull
        self.started: list[Pull] = []  # not yet handed to the fetcher
        self._ids = itertools.count(1)

    # -- export (the holder) -------------------------------------------------------------

    def pin_export(self, block_hashes: list[int]) -> ExportPin:
        """Pin the longest ready prefix of the chain (possibly empty)."""
        nodes = self.kv.tree.match(block_hashes)
        gpu = [n.gpu_id for n in nodes if n.gpu_ready]
        cpu = [n.cpu_id for n in nodes[len(gpu):]]  # device copies are upward-closed: the rest is CPU-only
        for b in gpu:
            self.kv.pool.touch(b)
        if cpu:
            assert self.kv.cpu is not None
            for b in cpu:
                self.kv.cpu.pool.touch(b)
        return ExportPin(tuple(n.block_hash for n in nodes), gpu, cpu)

    def unpin(self, pin: ExportPin) -> None:
        self.kv.pool.free(reversed(pin.gpu_blocks))  # deepest first: evicted before its parents
        if pin.cpu_blocks:
            assert self.kv.cpu is not None
            self.kv.cpu.pool.free(pin.cpu_blocks)

    # -- import (the puller) ---------------------------------------------------------------

    def can_pull(self) -> bool:
        return len(self.pulls) < self.max_pulls

    def start_pull(self, seq: Sequence, hint: PeerHint, first: int, count: int, deadline: float) -> Pull:
        """The sequence holds blocks for its whole prompt; ``count`` after ``first`` come from the peer."""
        assert len(seq.block_ids) >= first + count
        p = Pull(next(self._ids), seq, hint, first, seq.block_hashes[first:first + count],
                 seq.block_ids[first:first + count], deadline)
        self.pulls[seq.seq_id] = p
        self.started.append(p)
        return p

    def take_started(self) -> list[Pull]:
        started, self.started = self.started, []
        return [p for p in started if self.pulls.get(p.seq.seq_id) is p]

    def is_live(self, p: Pull) -> bool:
        return self.pulls.get(p.seq.seq_id) is p

    def inflight_hashes(self) -> set[int]:
        return {h for p in self.pulls.values() for h in p.block_hashes}

    def defer_free(self, seq: Sequence) -> bool:
        """A sequence finishing mid-pull: while ranks write its blocks they stay held
        (released when the import completes); while only fetching, the pull is dropped."""
        p = self.pulls.get(seq.seq_id)
        if p is None:
            return False
        if p.state == WRITING:
            p.orphaned = True
            return True
        del self.pulls[seq.seq_id]
        return False

    def finish(self, p: Pull) -> bool:
        """The pull ended (its blocks are in, or it failed). True if its sequence is gone."""
        assert self.is_live(p)
        del self.pulls[p.seq.seq_id]
        if p.orphaned:
            self.kv.release(p.seq)
        return p.orphaned

    def add_deferred_refs(self, refs: list[int]) -> None:
        for p in self.pulls.values():
            if p.orphaned:
                for b in p.seq.block_ids:
                    refs[b] += 1

    def clear(self) -> None:
        self.pulls.clear()
        self.started.clear()
