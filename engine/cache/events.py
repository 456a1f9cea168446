"""Block events: every change of which tiers hold a cached block, in order.

The KV manager records one event per (block, tier) change with a per-engine
sequence number. The cluster's metadata actor applies batches in sequence
order; a gap means it missed events and must ask for a snapshot. Replaying a
complete stream into an empty ``BlockIndex`` reproduces the tree exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixserve.engine.cache.radix import RadixNode

GPU, CPU = "gpu", "cpu"  # the tiers a block can be cached in
# Why a copy appeared or vanished (informational; replay only needs add/remove).
STORED, PROMOTED, DEMOTED, EVICTED, CLEARED = "stored", "promoted", "demoted", "evicted", "cleared"


@dataclass(frozen=True)
class BlockEvent:
    seq: int
    add: bool            # True: the tier now holds the block; False: it no longer does
    tier: str            # "gpu" | "cpu"
    block_hash: int
    parent_hash: int | None
    root: int            # namespace root hash of the chain
    cause: str


@dataclass(frozen=True)
class EventBatch:
    engine_id: str
    events: list[BlockEvent]

    @property
    def first_seq(self) -> int:
        return self.events[0].seq if self.events else -1

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else -1


@dataclass(frozen=True)
class SnapshotEntry:
    block_hash: int
    parent_hash: int | None
    root: int
    tiers: list[str]


@dataclass(frozen=True)
class Snapshot:
    engine_id: str
    seq: int  # the last event reflected in the snapshot
    blocks: list[SnapshotEntry]


class EventLog:
    """Numbered event buffer of one engine; ``drain`` hands out what is new."""

    def __init__(self, engine_id: str, max_pending: int = 1_000_000):
        self.engine_id = engine_id
        self.next_seq = 0
        self.max_pending = max_pending
        self._pending: list[BlockEvent] = []

    def record(self, add: bool, tier: str, block_hash: int, parent_hash: int | None, root: int,
               cause: str) -> None:
        self._pending.append(BlockEvent(self.next_seq, add, tier, block_hash, parent_hash, root, cause))
        self.next_seq += 1
        if len(self._pending) > self.max_pending:  # no consumer: keep memory bounded
            self._pending.clear()  # the gap in sequence numbers makes a consumer ask for a snapshot

    def record_node(self, add: bool, tier: str, node: RadixNode, cause: str) -> None:
        """One tier of a tree node gained (add) or lost its copy."""
        self.record(add, tier, node.block_hash, node.parent_hash, node.root, cause)

    def drain(self) -> EventBatch:
        batch, self._pending = self._pending, []
        return EventBatch(self.engine_id, batch)


@dataclass
class BlockIndex:
    """What a subscriber rebuilds from events: block hash -> tiers holding it."""

    tiers: dict[int, set[str]] = field(default_factory=dict)
    parents: dict[int, int | None] = field(default_factory=dict)
    last_seq: int = -1

    def apply(self, batch: EventBatch) -> bool:
        """Apply in order; False (nothing applied) if the batch leaves a gap."""
        if batch.events and batch.first_seq != self.last_seq + 1:
            return False
        for ev in batch.events:
            held = self.tiers.setdefault(ev.block_hash, set())
            if ev.add:
                held.add(ev.tier)
                self.parents[ev.block_hash] = ev.parent_hash
            else:
                held.discard(ev.tier)
            if not held:
                del self.tiers[ev.block_hash]
                self.parents.pop(ev.block_hash, None)
            self.last_seq = ev.seq
        return True

    def load(self, snap: Snapshot) -> None:
        self.tiers = {e.block_hash: set(e.tiers) for e in snap.blocks}
        self.parents = {e.block_hash: e.parent_hash for e in snap.blocks}
        self.last_seq = snap.seq
