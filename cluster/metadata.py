"""RadixCacheMetadata: the cluster's synchronized view of which replica caches which block.

One named Ray actor. Replicas register with a fingerprint of what their block
hashes depend on, then push their engine's block events in batches; the actor
applies each replica's batches in sequence order and answers ``need_snapshot``
on a gap (or after the replica restarted), after which the replica sends a
full snapshot. Routers pull *deltas*: every change gets a global version, and
``pull(since)`` returns the changes after ``since`` (or the full state when
the caller is too far behind). A replica that stops pushing is dropped.

``CacheDirectory`` holds all of that logic without Ray, so it is unit-tested
directly; the actor is a thin shell around it.
"""
from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field

from radixserve.cluster.routing_policy import LoadReport
from radixserve.engine.cache.events import GPU, BlockIndex, EventBatch, Snapshot

ACTOR_NAME = "RadixCacheMetadata"
ACTOR_NAMESPACE = "radixserve"


def actor_name(app_name: str) -> str:
    """One metadata actor per Serve application: apps may serve different
    models (different hash fingerprints) and must not see each other's blocks."""
    return f"{ACTOR_NAME}:{app_name}"


@dataclass(frozen=True)
class Change:
    """One entry of the delta log: replica's tiers for a block (empty = gone);
    ``block_hash=None`` means the whole replica was dropped."""

    version: int
    replica: str
    block_hash: int | None
    tiers: tuple[str, ...]


@dataclass(frozen=True)
class Delta:
    version: int
    changes: list[Change] = field(default_factory=list)
    full: dict[str, dict[int, tuple[str, ...]]] | None = None  # set when the caller must reset
    resident: dict[str, list[str]] = field(default_factory=dict)  # replica -> adapters in device slots
    loads: dict[str, LoadReport] = field(default_factory=dict)  # replica -> its last load report


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter the cluster serves (the registry replicas converge to)."""

    name: str
    path: str
    namespace: str  # lora:{name}:{content hash}: what prompts on it are hashed under


@dataclass
class _Replica:
    fingerprint: str
    index: BlockIndex = field(default_factory=BlockIndex)
    synced: bool = False  # has a baseline (first batch from seq 0, or a snapshot)
    last_seen: float = field(default_factory=time.monotonic)
    metrics_text: str = ""


class FingerprintMismatch(ValueError):
    """A replica hashes blocks differently from the rest of the cluster."""


class CacheDirectory:
    def __init__(self, max_log: int = 200_000, stale_after_s: float = 30.0):
        self.replicas: dict[str, _Replica] = {}
        self.fingerprint: str | None = None
        self.version = 0
        self.log: deque[Change] = deque()
        self.max_log = max_log
        self.stale_after_s = stale_after_s
        self.router_metrics: dict[str, str] = {}
        self.adapters: dict[str, Adapter] = {}
        self.adapters_version = 0
        self.replica_adapters: dict[str, dict[str, str]] = {}  # replica -> name -> namespace | "error: ..."
        self.resident: dict[str, list[str]] = {}
        self.loads: dict[str, LoadReport] = {}

    # -- replicas --------------------------------------------------------------------

    def register(self, replica: str, fingerprint: str) -> None:
        if self.fingerprint is None or not self.replicas:
            self.fingerprint = fingerprint
        elif fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"replica {replica} hashes blocks as {fingerprint!r} but the cluster uses "
                f"{self.fingerprint!r} (model, block size or hash scheme differ); refusing it")
        if replica in self.replicas:
            self.drop(replica)  # a restart: forget what the old incarnation held
        self.replicas[replica] = _Replica(fingerprint)

    def drop(self, replica: str) -> None:
        self.replica_adapters.pop(replica, None)
        self.resident.pop(replica, None)
        self.loads.pop(replica, None)
        if self.replicas.pop(replica, None) is not None:
            self._append(replica, None, ())

    def drop_stale(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        stale = [r for r, st in self.replicas.items() if now - st.last_seen > self.stale_after_s]
        for r in stale:
            self.drop(r)
        return stale

    # -- events in --------------------------------------------------------------------

    def push(self, replica: str, batch: EventBatch, metrics_text: str = "",
             load: tuple = (0, 0.0)) -> bool:
        """Apply a batch; False means "send a snapshot" (gap, or unknown replica).
        ``load``: (queued prompt tokens, wall-clock time[, free blocks, pool blocks[, pull
        fixed tokens, pull tokens per block]])."""
        st = self.replicas.get(replica)
        if st is None:
            return False
        st.last_seen = time.monotonic()
        q, at, *pool = load
        free, total = (int(pool[0]), int(pool[1])) if len(pool) >= 2 else (-1, -1)
        fixed, per_block = (float(pool[2]), float(pool[3])) if len(pool) >= 4 else (-1.0, -1.0)
        self.loads[replica] = LoadReport(int(q), float(at), free, total, fixed, per_block)
        if metrics_text:
            st.metrics_text = metrics_text
        if not batch.events:
            return st.synced
        if not st.synced:
            if batch.first_seq != 0:
                return False
            st.synced = True
        before = {e.block_hash: frozenset(st.index.tiers.get(e.block_hash, ())) for e in batch.events}
        if not st.index.apply(batch):
            return False
        for h, old in before.items():
            new = frozenset(st.index.tiers.get(h, ()))
            if new != old:
                self._append(replica, h, tuple(sorted(new)))
        return True

    def push_snapshot(self, replica: str, snap: Snapshot) -> None:
        st = self.replicas.get(replica)
        if st is None:
            return
        old = st.index.tiers
        st.index = BlockIndex()
        st.index.load(snap)
        st.synced = True
        st.last_seen = time.monotonic()
        for h in set(old) | set(st.index.tiers):
            new = st.index.tiers.get(h, set())
            if set(old.get(h, ())) != new:
                self._append(replica, h, tuple(sorted(new)))

    # -- deltas out -------------------------------------------------------------------------

    def _append(self, replica: str, block_hash: int | None, tiers: tuple[str, ...]) -> None:
        self.version += 1
        self.log.append(Change(self.version, replica, block_hash, tiers))
        while len(self.log) > self.max_log:
            self.log.popleft()

    def pull(self, since: int) -> Delta:
        oldest = self.log[0].version if self.log else self.version + 1
        extra = {"resident": dict(self.resident), "loads": dict(self.loads)}
        if since >= self.version:
            return Delta(self.version, **extra)
        if since + 1 < oldest:  # the caller missed changes we no longer keep: full state
            full = {r: {h: tuple(sorted(t)) for h, t in st.index.tiers.items()}
                    for r, st in self.replicas.items()}
            return Delta(self.version, full=full, **extra)
        return Delta(self.version, [c for c in self.log if c.version > since], **extra)

    def replica_ids(self) -> list[str]:
        return sorted(self.replicas)

    # -- LoRA adapter registry ----------------------------------------------------------------

    def set_adapter(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter
        self.adapters_version += 1

    def remove_adapter(self, name: str) -> bool:
        if self.adapters.pop(name, None) is None:
            return False
        self.adapters_version += 1
        return True

    def adapter_sync(self, replica: str, known_version: int) -> tuple[int, list[Adapter]] | None:
        """What a replica should have loaded, when it changed since ``known_version``."""
        if known_version == self.adapters_version:
            return None
        return self.adapters_version, list(self.adapters.values())

    def report_adapters(self, replica: str, loaded: dict[str, str], resident: list[str]) -> None:
        if replica in self.replicas:
            self.replica_adapters[replica] = dict(loaded)
            self.resident[replica] = list(resident)

    def adapter_status(self, name: str) -> dict[str, str | None]:
        """Per live replica: the adapter's namespace there, an error, or None (not yet)."""
        return {r: self.replica_adapters.get(r, {}).get(name) for r in self.replicas}

    def metrics_texts(self) -> dict[str, str]:
        return {r: st.metrics_text for r, st in self.replicas.items()}


class LocalIndex:
    """A router's copy of the directory, kept current by applying deltas."""

    def __init__(self) -> None:
        self.version = 0
        self.blocks: dict[str, dict[int, tuple[str, ...]]] = {}
        self.resident: dict[str, list[str]] = {}
        self.loads: dict[str, LoadReport] = {}
        self.gpu_blocks: dict[str, int] = {}  # replica -> blocks it caches on the device tier

    def apply(self, delta: Delta) -> None:
        if delta.full is not None:
            self.blocks = {r: dict(b) for r, b in delta.full.items()}
            self.gpu_blocks = {r: sum(GPU in t for t in b.values()) for r, b in self.blocks.items()}
        for c in delta.changes:
            held = self.blocks.get(c.replica, {})
            if c.block_hash is None:
                self.blocks.pop(c.replica, None)
                self.gpu_blocks.pop(c.replica, None)
                continue
            was = GPU in held.get(c.block_hash, ())
            if c.tiers:
                self.blocks.setdefault(c.replica, held)[c.block_hash] = c.tiers
            else:
                held.pop(c.block_hash, None)
            self.gpu_blocks[c.replica] = self.gpu_blocks.get(c.replica, 0) + (GPU in c.tiers) - was
        self.version = delta.version
        self.resident = delta.resident
        self.loads = delta.loads

    def hit(self, replica: str, block_hashes: list[int]) -> tuple[int, int]:
        """(device blocks, CPU-only blocks) of the longest cached prefix on a replica."""
        held = self.blocks.get(replica)
        if not held:
            return 0, 0
        gpu = cpu = 0
        for h in block_hashes:
            tiers = held.get(h)
            if not tiers:
                break
            if GPU in tiers and not cpu:
                gpu += 1
            else:
                cpu += 1
        return gpu, cpu


@functools.lru_cache(maxsize=1)
def make_actor_class():
    """The Ray actor wrapping CacheDirectory (built lazily: ray is imported here only)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class RadixCacheMetadata:
        def __init__(self, stale_after_s: float = 30.0):
            self.dir = CacheDirectory(stale_after_s=stale_after_s)

        def register(self, replica: str, fingerprint: str) -> None:
            self.dir.register(replica, fingerprint)

        def ensure_registered(self, replica: str, fingerprint: str) -> None:
            """Register a replica this actor does not know (it restarted, or missed the first call)."""
            if replica not in self.dir.replicas:
                self.dir.register(replica, fingerprint)

        def push(self, replica: str, batch: bytes, metrics_text: str = "",
                 load: tuple = (0, 0.0)) -> bool:
            return self.dir.push(replica, decode_batch(batch), metrics_text, load)

        def push_snapshot(self, replica: str, snap: bytes) -> None:
            self.dir.push_snapshot(replica, decode_snapshot(snap))

        def drop(self, replica: str) -> None:
            self.dir.drop(replica)

        def pull(self, since: int) -> bytes:
            self.dir.drop_stale()
            return encode_delta(self.dir.pull(since))

        def report_router(self, router_id: str, metrics_text: str) -> None:
            self.dir.router_metrics[router_id] = metrics_text

        def metrics(self) -> tuple[dict[str, str], dict[str, str]]:
            return self.dir.metrics_texts(), dict(self.dir.router_metrics)

        def replica_ids(self) -> list[str]:
            return self.dir.replica_ids()

        def set_adapter(self, name: str, path: str, namespace: str) -> None:
            self.dir.set_adapter(Adapter(name, path, namespace))

        def remove_adapter(self, name: str) -> bool:
            return self.dir.remove_adapter(name)

        def adapter_sync(self, replica: str, known_version: int) -> tuple[int, list[tuple[str, str]]] | None:
            got = self.dir.adapter_sync(replica, known_version)
            return None if got is None else (got[0], [(a.name, a.path) for a in got[1]])

        def report_adapters(self, replica: str, loaded: dict[str, str], resident: list[str]) -> None:
            self.dir.report_adapters(replica, loaded, resident)

        def adapters(self) -> dict[str, str]:
            return {a.name: a.namespace for a in self.dir.adapters.values()}

        def adapter_status(self, name: str) -> dict[str, str | None]:
            return self.dir.adapter_status(name)

    return RadixCacheMetadata


def get_metadata_actor(app_name: str, stale_after_s: float = 30.0):
    """The application's named metadata actor, created on first use by whoever gets there first.

    Its creator is usually a replica running in its own placement group, which Ray would
    let the actor inherit: then removing that replica (a redeploy, a rolling update)
    leaves the actor restarting on a bundle that no longer exists. Scheduling it outside
    any placement group keeps it independent of every replica.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    cls = make_actor_class()
    return cls.options(name=actor_name(app_name), namespace=ACTOR_NAMESPACE, get_if_exists=True,
                       lifetime="detached",
                       scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
                       ).remote(stale_after_s)


# -- msgpack payloads (everything between actors travels as msgpack bytes) -------------------

def encode_batch(batch: EventBatch) -> bytes:
    from radixserve.engine.executor import wire
    return wire.encode("events", batch)


def decode_batch(data: bytes) -> EventBatch:
    from radixserve.engine.executor import wire
    return wire.decode(data, {"events": EventBatch})[1]


def encode_snapshot(snap: Snapshot) -> bytes:
    from radixserve.engine.executor import wire
    return wire.encode("snapshot", snap)


def decode_snapshot(data: bytes) -> Snapshot:
    from radixserve.engine.executor import wire
    return wire.decode(data, {"snapshot": Snapshot})[1]


def encode_delta(delta: Delta) -> bytes:
    from radixserve.engine.executor import wire
    return wire.encode("delta", delta)


def decode_delta(data: bytes) -> Delta:
    from radixserve.engine.executor import wire
    return wire.decode(data, {"delta": Delta})[1]
