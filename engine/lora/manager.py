"""The engine's LoRA registry and its device slots (pure bookkeeping, no tensors).

Adapters
    ``load`` reads and validates a PEFT directory (engine/lora/adapter.py) and
    registers it under its name. Each loaded *version* is a ``LoRAAdapter``
    with its own prefix-cache namespace ``lora:{name}:{content_hash[:16]}``:
    cached KV is reused within one adapter version and never across adapters,
    nor across a reload whose weights changed (new hash, new namespace).

    Loading a name again replaces it (a no-op when path and weights are
    unchanged); a request naming a loaded adapter whose files changed on disk
    reloads it first (two stats per request). If the files are gone, the
    loaded version keeps serving from the workers' slots and host cache (a
    worker that would have to re-read it fails that adapter's requests with
    the reason).

    ``unload`` removes the name at once: new requests for it are refused,
    requests already queued or running finish on the version they started
    with, and that version's slot and cached blocks are released when its last
    request finishes (at once when idle). A replaced version drains the same
    way. So unload and reload never fail because an adapter is busy, and never
    change the weights under a running request.

Slots
    ``max_loras`` device slots. A waiting sequence is admitted only once its
    adapter has a slot: a resident one, an empty one, or the least recently
    used slot whose adapter has no *running* sequence (pinned slots are never
    evicted). Each (re)assignment queues a ``LoRALoad`` for the workers, sent
    with the step that first uses it.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from radixserve.engine.cache.hashing import root_hash
from radixserve.engine.config import LoRAConfig
from radixserve.engine.core.metrics import EngineMetrics
from radixserve.engine.core.scheduler_output import LoRALoad
from radixserve.engine.lora.adapter import ParsedAdapter, files_signature, read_adapter
from radixserve.engine.lora.request import LoRARequest
from radixserve.engine.model.hf_config import ArchConfig


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@dataclass(eq=False)
class LoRAAdapter:
    """One loaded version of an adapter."""

    name: str
    path: str
    uid: int                 # engine-unique per loaded version
    rank: int
    target_modules: tuple[str, ...]
    content_hash: str
    files_signature: tuple[int, ...]
    lora_int_id: int | None = None
    num_requests: int = 0    # unfinished requests on this version
    retired: bool = False    # unloaded or replaced: accepts no new requests
    slot: int | None = None  # device slot holding it, if any
    namespace: str = field(init=False)
    root_hash: int = field(init=False)

    def __post_init__(self) -> None:
        self.namespace = adapter_namespace(self.name, self.content_hash)
        self.root_hash = root_hash((self.namespace,))


def adapter_namespace(name: str, content_hash: str) -> str:
    """The prefix-cache namespace of one adapter version: name + weights, so a
    reload with other weights under the same name never hits stale blocks.
    The cluster's router hashes prompts with it too."""
    return f"lora:{name}:{content_hash[:16]}"


@dataclass(frozen=True)
class LoRAInfo:
    """What ``list_loras`` reports about a loaded adapter."""

    name: str
    path: str
    content_hash: str
    namespace: str
    rank: int
    target_modules: tuple[str, ...]
    slot: int | None
    num_requests: int
    lora_int_id: int | None


@dataclass
class LoRAStats:
    dropped_blocks: int = 0  # cached blocks dropped with retired adapter versions


class LoRAManager:
    def __init__(self, config: LoRAConfig, arch: ArchConfig, drop_namespace: Callable[[int], int],
                 metrics: EngineMetrics | None = None):
        """``drop_namespace(ns)`` evicts the unreferenced cached blocks of every
        cache namespace that starts with the adapter's ``ns`` (tenants and cache
        salts extend it); ``metrics`` counts slot loads and evictions."""
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.arch = arch
        self._drop_namespace = drop_namespace
        self.adapters: dict[str, LoRAAdapter] = {}      # name -> current version
        self._draining: dict[int, LoRAAdapter] = {}     # uid -> retired version with requests left
        self.slots: list[LoRAAdapter | None] = [None] * config.max_loras
        self._recency: OrderedDict[int, None] = OrderedDict((s, None) for s in range(config.max_loras))
        self._pending: list[LoRALoad] = []
        self._uids = itertools.count(1)
        self.stats = LoRAStats()

    # -- registry --------------------------------------------------------------------------

    def read(self, request: LoRARequest) -> ParsedAdapter:
        """Parse + validate + hash (slow: reads the weights). Safe off the engine thread."""
        if not request.lora_path:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: no path given to load it from")
        return read_adapter(request.lora_path, self.arch, self.config.max_lora_rank)

    def register(self, request: LoRARequest, parsed: ParsedAdapter) -> LoRAAdapter:
        """Make ``parsed`` the current version of ``request.lora_name``."""
        cur = self.adapters.get(request.lora_name)
        path = str(parsed.path)
        if cur is not None and cur.content_hash == parsed.content_hash and cur.path == path:
            cur.files_signature = parsed.files_signature
            return cur
        new = LoRAAdapter(request.lora_name, path, next(self._uids), parsed.rank, parsed.target_modules,
                          parsed.content_hash, parsed.files_signature, request.lora_int_id)
        if cur is not None:
            self._retire(cur)
        self.adapters[new.name] = new
        return new

    def load(self, request: LoRARequest) -> LoRAAdapter:
        return self.register(request, self.read(request))

    def resolve(self, request: LoRARequest) -> LoRAAdapter:
        """The version a new request runs on: loads an unknown name from its path,
        reloads a loaded one whose files changed on disk. Raises ValueError."""
        to_read = self.pending_read(request)
        if to_read is not None:
            return self.load(to_read)
        cur = self.adapters.get(request.lora_name)
        if cur is None:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"LoRA adapter {request.lora_name!r} is not loaded (loaded: {loaded}); "
                             f"pass its path to load it")
        if request.lora_path and not _same_path(request.lora_path, cur.path):
            raise ValueError(f"LoRA adapter {request.lora_name!r} is loaded from {cur.path}, not "
                             f"{request.lora_path}; unload it first or use another name")
        return cur

    def pending_read(self, request: LoRARequest) -> LoRARequest | None:
        """What resolve() would have to read from disk first: an unknown name with
        a path, or a loaded one (same path) whose files changed. None: nothing."""
        cur = self.adapters.get(request.lora_name)
        if cur is None:
            return request if request.lora_path else None
        if request.lora_path and not _same_path(request.lora_path, cur.path):
            return None
        now = files_signature(cur.path)
        if now and now != cur.files_signature:  # files gone (now == ()): keep serving what is loaded
            return LoRARequest(cur.name, cur.path, request.lora_int_id or cur.lora_int_id)
        return None

    def unload(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"LoRA adapter {name!r} is not loaded (loaded: {loaded})")
        self._retire(adapter)

    def infos(self) -> list[LoRAInfo]:
        return [LoRAInfo(a.name, a.path, a.content_hash, a.namespace, a.rank, a.target_modules, a.slot,
                         a.num_requests, a.lora_int_id) for a in self.adapters.values()]

    def _retire(self, adapter: LoRAAdapter) -> None:
        adapter.retired = True
        if adapter.num_requests:
            self._draining[adapter.uid] = adapter
        else:
            self._release_resources(adapter)

    def _release_resources(self, adapter: LoRAAdapter) -> None:
        """A retired version's last request is gone: free its slot and cached blocks."""
        self._draining.pop(adapter.uid, None)
        if adapter.slot is not None:
            self._vacate(adapter.slot)
        live = [*self.adapters.values(), *self._draining.values()]
        if not any(a.root_hash == adapter.root_hash for a in live):  # same name + weights reloaded: keep
            self.stats.dropped_blocks += self._drop_namespace(adapter.namespace)

    # -- requests --------------------------------------------------------------------------

    def acquire(self, adapter: LoRAAdapter) -> None:
        adapter.num_requests += 1

    def release(self, adapter: LoRAAdapter) -> None:
        adapter.num_requests -= 1
        assert adapter.num_requests >= 0, f"LoRA adapter {adapter.name!r} released more often than acquired"
        if adapter.num_requests == 0 and adapter.retired:
            self._release_resources(adapter)

    # -- slots -------------------------------------------------------------------------------

    def _free_slot(self, pinned: set[int]) -> int | None:
        """An empty slot, else the least recently used one whose adapter is not pinned."""
        slot = next((s for s in self._recency if self.slots[s] is None), None)
        if slot is None:
            slot = next((s for s in self._recency if self.slots[s].uid not in pinned), None)
        return slot

    def can_reserve(self, adapter: LoRAAdapter, pinned: set[int]) -> bool:
        return adapter.slot is not None or self._free_slot(pinned) is not None

    def reserve_slot(self, adapter: LoRAAdapter, pinned: set[int]) -> int | None:
        """A slot for ``adapter`` (uids in ``pinned`` have running sequences and
        keep theirs); queues a load when it changes hands. None: all pinned."""
        if adapter.slot is not None:
            self._recency.move_to_end(adapter.slot)
            return adapter.slot
        slot = self._free_slot(pinned)
        if slot is None:
            return None
        if self.slots[slot] is not None:
            self.slots[slot].slot = None
            self.metrics.inc("lora_slot_evictions")
        self.slots[slot] = adapter
        adapter.slot = slot
        self._recency.move_to_end(slot)
        self._pending.append(LoRALoad(slot, adapter.name, adapter.path, adapter.content_hash))
        self.metrics.inc("lora_slot_loads")
        return slot

    def touch(self, adapter: LoRAAdapter) -> None:
        if adapter.slot is not None:
            self._recency.move_to_end(adapter.slot)

    def take_loads(self) -> list[LoRALoad]:
        loads, self._pending = self._pending, []
        return loads

    def _vacate(self, slot: int) -> None:
        adapter = self.slots[slot]
        if adapter is not None:
            adapter.slot = None
        self.slots[slot] = None
        self._recency.move_to_end(slot, last=False)  # an empty slot is taken first
        self._pending = [ld for ld in self._pending if ld.slot != slot]

    def invalidate_slot(self, slot: int) -> LoRAAdapter | None:
        """The workers' copy of ``slot`` is unknown (a failed step): forget it."""
        adapter = self.slots[slot]
        self._vacate(slot)
        return adapter

    def fail_slot(self, slot: int) -> LoRAAdapter | None:
        """The workers could not load ``slot``: the adapter is broken; stop
        accepting it (its requests are failed by the engine)."""
        adapter = self.invalidate_slot(slot)
        if adapter is not None and self.adapters.get(adapter.name) is adapter:
            del self.adapters[adapter.name]
            self._retire(adapter)
        return adapter

    def reset_slots(self) -> None:
        """The workers restarted with empty slots."""
        for s in range(len(self.slots)):
            self._vacate(s)
        self._pending.clear()

    @property
    def num_resident(self) -> int:
        return sum(a is not None for a in self.slots)
