"""Replica choice for one request, as plain Python (no Ray): the whole cost model.

The cost of sending a request to replica r, in prompt tokens (the unit of
prefill work, so every term compares with every other):

    cost(r) = own(r) + load(r) + pressure(r) + adapter(r)

    own(r)      = prompt_tokens - bs * common
                  - hit_weight * bs * (gpu_hit(r) + (1 - cpu_copy_cost) * cpu_hit(r)
                                       + remote_hit(r) - pull(r) / bs - common)
                  the request's own prefill there. ``remote_hit(r)``: with peer KV, the
                  blocks past r's own hit that another (fresh) replica holds, which r
                  pulls instead of computing; ``pull(r)`` what that costs r in its own
                  prefill tokens, as r measured it (a fixed cost per pull plus one per
                  block, capped at recomputing: r recomputes when a pull would be
                  slower), or remote_copy_cost of a recompute until r has measured. So
                  a loaded holder's prefix spills with a pull where pulls pay, and an
                  idle holder still wins its repeats. ``common`` leading blocks do not
                  decide placement: the prefix every candidate holds, and blocks so
                  popular (a system prompt in >= common_share of recent requests) that
                  every replica keeps them anyway. Without that, the first replica to
                  hold a system prompt is cheaper for every new conversation and takes
                  them all.
    load(r)     = queue_weight * queued(r) + per_request_tokens * inflight(r)
                  counted smoothly, from the first token: queued(r) is the prompt
                  work waiting on r (its last report + what this router sent since
                  + what it chose and Ray has not delivered yet), inflight(r) the
                  requests routed there and not finished (their decoding).
    pressure(r) = evict_cost * bs * max(0, new_blocks(r) - empty_blocks(r))
                  a full pool pays for the cached blocks it must push out (someone
                  may want them); a pool with empty blocks takes a cold prefix free.
    adapter(r)  = adapter_load_tokens when the request's LoRA adapter is not
                  resident on r.

Choice: the cheapest candidate; candidates within ``tie_tokens`` of it are near
ties, ordered by rendezvous hashing on the prompt's first block that no
candidate holds (never by name), those that took more than their share of
recent requests (``balance_epsilon``: bounded-load hashing) last. So a new
prefix lands on a replica picked by its own hash among equally loaded ones
(new prefixes spread) and its repeats land on the same one (they converge;
after the first, their hit also pulls them there). Blocks this router sent to
r count as cached on r for ``predict_ttl_s`` until r's own report says so, so
repeats converge before the metadata catches up. With peer KV, near ties put
the replica holding the longer prefix itself first (a pull is cheap, a local hit
cheaper), and the router tells the chosen replica which other one holds more of
the prompt (``peer_hint``) so it pulls rather than recomputes.

Exclusions: a replica whose load report is older than ``stale_after_s`` (it
stopped reporting to the metadata actor, or is stuck) is not chosen while a
fresh one exists; a replica whose in-flight requests exceed
``(1 + load_epsilon) * mean + load_slack`` goes last (a hard backstop behind the smooth
load term).

``Accounting`` is the router's bookkeeping (in-flight, reservations, recent
routings, predicted blocks, decision counters): the Ray Serve adapter
(request_router.py) and the simulator (benchmarks/router_sim.py) both drive it.
Every parameter and its default is in ``RouterConfig``, tuned with the
simulator (the workloads and commands in benchmarks/README.md); block_size and
step_tokens are the engine's (``RouterConfig.for_engine``; step_tokens is no
cost term: queued work counts from its first token, not past one step).
"""
from __future__ import annotations

import hashlib
import itertools
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from radixserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig

POLICIES = ("prefix_affinity", "round_robin", "pow2", "consistent_hash")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """The policy's knobs, each one term of the cost above. ``block_size`` and
    ``step_tokens`` are the replicas' engine settings, not the router's own:
    build it with :meth:`for_engine`. Defaults tuned with benchmarks/router_sim.py."""

    policy: str = "prefix_affinity"
    block_size: int = CacheConfig.block_size  # tokens per cached block, as the engine hashes them
    step_tokens: int = SchedulerConfig.max_num_batched_tokens  # the replicas' per-step token budget
    hit_weight: float = 1.0          # cost saved per cached (non-common) prompt token
    cpu_copy_cost: float = 0.1       # a CPU-tier hit costs 10% of recomputing the block
    peer_kv: bool = False            # replicas pull prefixes from each other (the engine's cache.peer_kv)
    # a block pulled from a peer, against recomputing it, until the replica reports its own measure:
    # bench_peer_kv_cluster measured 0.64 s pulled vs 3.27 s recomputed (2048 tokens, small-llama, CPU)
    remote_copy_cost: float = 0.2
    pull_min_blocks: int = 2         # a peer hint is sent only for at least this many more blocks
    # cost per prompt token queued ahead on the replica; below 1 because the replica counts a
    # waiting prompt in full, its cached prefix included (the hit is known only at admission).
    # 0.35 over 0.5: mean hit/oracle 0.974 vs 0.961 over the tuning set, p99 and hot_burst unchanged
    queue_weight: float = 0.35
    per_request_tokens: int = 64     # decode work of one in-flight request, in prompt tokens
    evict_cost: float = 0.5          # per block pushed out of a full pool, x block_size tokens
    common_share: float = 0.5        # a leading block in this share of recent requests is common
    popularity_window: int = 256     # recent requests the common-block share is taken over
    tie_tokens: float = 16.0         # costs within this of the cheapest are near ties
    balance_epsilon: float = 0.1     # near ties skip replicas above (1 + eps) * mean recent requests + 1
    history_halflife_s: float = 60.0  # "recent requests": routed requests decayed with this half-life
    load_epsilon: float = 0.25       # in-flight backstop: above (1 + eps) * mean + load_slack goes last
    load_slack: int = 4              # (at 1 a hot prefix spilled at 2 in flight, losing its hits)
    rendezvous_blocks: int = 4       # prefix blocks that key consistent_hash
    adapter_load_tokens: int = 256   # cost of loading a LoRA adapter into a replica's device slot
    predict_ttl_s: float = 2.0       # blocks routed to a replica count as cached there this long
    stale_after_s: float = 10.0      # a replica whose load report is older is not chosen
    reservation_ttl_s: float = 60.0  # a choice Ray never routed (cancelled) is forgotten after this
    delivery_s: float = 0.05         # a routed request reaches its replica's queue within this
    sync_interval_s: float = 0.05    # how often the router pulls metadata deltas

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("cpu_copy_cost", "remote_copy_cost"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.common_share <= 1:
            raise ValueError(f"common_share must be in (0, 1], got {self.common_share}")
        for name in ("hit_weight", "queue_weight", "per_request_tokens", "evict_cost", "tie_tokens",
                     "load_epsilon", "load_slack", "adapter_load_tokens", "predict_ttl_s", "delivery_s",
                     "balance_epsilon"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("block_size", "step_tokens", "popularity_window", "rendezvous_blocks", "pull_min_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stale_after_s", "reservation_ttl_s", "sync_interval_s", "history_halflife_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def for_engine(cls, engine: EngineConfig, **overrides: Any) -> RouterConfig:
        """The router in front of replicas running ``engine``: it counts hits in the
        engine's blocks and queued work against the engine's step budget."""
        derived = {"block_size": engine.cache.block_size, "step_tokens": engine.scheduler.max_num_batched_tokens,
                   "peer_kv": engine.cache.peer_kv and engine.cache.enable_prefix_caching}
        clash = sorted(set(overrides) & set(derived))
        if clash:
            raise ValueError(f"router {clash} come from the engine config "
                             "(block_size, max_num_batched_tokens, peer_kv); set them there")
        return cls(**derived, **overrides)


@dataclass(frozen=True)
class ReplicaState:
    replica: str
    gpu_hit: int     # blocks: longest cached prefix on the device tier
    cpu_hit: int     # blocks: then on the CPU tier
    inflight: int    # requests routed and not finished
    queued_tokens: int  # prompt tokens waiting there (see Accounting.queued)
    adapter_cold: bool = False  # the request's LoRA adapter is not in this replica's device slots
    empty_blocks: int | None = None  # device blocks holding nothing (None: unknown, no pressure term)
    report_age_s: float | None = None  # age of its last load report (None: never reported)
    history: float = 0.0  # requests routed there lately (Accounting.history)
    reported_hit: int | None = None  # blocks its own report says it holds (None: gpu_hit + cpu_hit)
    pull_cost: tuple[float, float] = (-1.0, -1.0)  # its LoadReport's (pull_fixed_tokens, pull_block_tokens)

    @property
    def held(self) -> int:
        """Prefix blocks it can export to a peer now: reported ones, not predicted."""
        return self.gpu_hit + self.cpu_hit if self.reported_hit is None else self.reported_hit


@dataclass(frozen=True)
class LoadReport:
    """What a replica last said about its load (metadata actor -> router)."""

    queued_tokens: int   # prompt tokens admitted or waiting, not computed yet
    at: float            # wall-clock time the report was taken
    free_blocks: int = -1  # device blocks an allocation can take (-1: not reported)
    num_blocks: int = -1   # device pool size (-1: not reported)
    # what a peer pull costs this replica, measured by it (PullEstimate), in its own prefill
    # tokens: fixed per pull, then per block (-1: not measured yet)
    pull_fixed_tokens: float = -1.0
    pull_block_tokens: float = -1.0


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # "affinity" | "rendezvous" | "least_loaded" | "stale" | "round_robin" | "consistent_hash"
    cost: float
    hit_blocks: int


def rendezvous(key: bytes, replicas: list[str]) -> list[str]:
    """Replicas ordered by highest-random-weight for ``key``: stable as replicas come and go."""
    score = lambda r: hashlib.blake2b(key + r.encode(), digest_size=8).digest()  # noqa: E731
    return sorted(replicas, key=score, reverse=True)


def prefix_key(block_hashes: list[int], tail_tokens: list[int], n: int) -> bytes:
    """Key of the prompt's first ``n`` blocks (the n-th chained hash covers them all), or,
    with no block, of the tokens past its last full block."""
    if block_hashes:
        return (block_hashes[min(n, len(block_hashes)) - 1] & (2**64 - 1)).to_bytes(8, "little")
    return repr(tail_tokens[:16]).encode()


class Popularity:
    """Share of the last ``window`` requests that start with each leading block."""

    MAX_DEPTH = 64  # leading blocks tracked per request: a system prompt is a few blocks

    def __init__(self, window: int):
        self.window: deque[tuple[int, ...]] = deque(maxlen=window)
        self.counts: Counter[int] = Counter()

    def add(self, block_hashes: list[int]) -> None:
        if len(self.window) == self.window.maxlen:
            self.counts.subtract(self.window[0])
        head = tuple(block_hashes[:self.MAX_DEPTH])
        self.window.append(head)
        self.counts.update(head)

    MIN_SEEN = 8  # requests seen before anything is called common

    def common_depth(self, block_hashes: list[int], share: float) -> int:
        """Leading blocks each carried by at least ``share`` of the window."""
        if len(self.window) < self.MIN_SEEN:
            return 0
        need = share * len(self.window)
        depth = 0
        for h in block_hashes[:self.MAX_DEPTH]:
            if self.counts[h] < need:
                break
            depth += 1
        return depth


@dataclass(frozen=True)
class Choice:
    """A replica chosen for a request that has not been routed yet (counted against it meanwhile)."""

    replica: str
    reason: str  # the policy's reason, the label of router_decisions_total
    tokens: int  # the prompt tokens it will compute there (uncached)
    hit: int     # prompt blocks cached there
    at: float    # when chosen (the caller's clock); expired after reservation_ttl_s
    block_hashes: tuple[int, ...] = ()  # the prompt's blocks: cached there once it runs


class Accounting:
    """What a router knows beyond the replicas' reports: its own routings.

    ``now`` is always the caller's wall clock (time.time() live, simulated time
    in the simulator); load reports carry the replica's wall clock of the count."""

    MAX_PREDICTED = 200_000  # predicted blocks kept (oldest forgotten first)

    def __init__(self, config: RouterConfig):
        self.config = config
        self.inflight: Counter[str] = Counter()
        self.decisions: Counter[tuple[str, str]] = Counter()  # (replica, reason) -> count
        self.hit_blocks: Counter[str] = Counter()
        self._work: dict[str, str] = {}  # request key -> replica, while in flight
        self._chosen: dict[str, Choice] = {}  # request key -> its replica, not yet routed
        # request key -> (time, replica, uncached prompt tokens) of recent routings not finished
        # yet: work the replicas' own load reports may not include (oldest first)
        self._recent: OrderedDict[str, tuple[float, str, int]] = OrderedDict()
        # (replica, block) -> when sent there; per replica, since a shared leading block (a system
        # prompt) goes to every replica and must not hide the chains behind it on all but the last
        self._predicted: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._history: dict[str, tuple[float, float]] = {}  # replica -> (decayed routed requests, at)

    def reserve(self, key: str, replica: str, reason: str, tokens: int, hit: int, now: float,
                block_hashes: list[int] | None = None) -> None:
        """Count a request against its replica as soon as it is chosen: concurrent
        decisions must see each other, or a burst would all pick one replica."""
        self.release(key)
        self.expire(now)
        self.inflight[replica] += 1
        self._chosen[key] = Choice(replica, reason, tokens, hit, now, tuple(block_hashes or ()))

    def release(self, key: str) -> Choice | None:
        held = self._chosen.pop(key, None)
        if held is not None:
            self.inflight[held.replica] = max(0, self.inflight[held.replica] - 1)
        return held

    def expire(self, now: float) -> None:
        cutoff = now - self.config.reservation_ttl_s  # requests cancelled before being routed
        for key in [k for k, v in self._chosen.items() if v.at < cutoff]:
            self.release(key)

    def routed(self, key: str, replica: str, now: float, block_hashes: list[int] | None = None) -> None:
        """The request ``key`` went to ``replica`` (the chosen one or another)."""
        held = self.release(key)
        reason, tokens, hit = (held.reason, held.tokens, held.hit) if held else ("pow2", 0, 0)  # Ray chose
        if held is not None and held.replica != replica:
            tokens = 0  # not the replica its cost was counted for: let its report tell
        if block_hashes is None and held is not None:
            block_hashes = list(held.block_hashes)
        self.inflight[replica] += 1
        self._recent.pop(key, None)
        self._recent[key] = (now, replica, tokens)
        self._history[replica] = (self.history(replica, now) + 1, now)
        self.decisions[(replica, reason)] += 1
        self.hit_blocks[replica] += hit
        self._work[key] = replica
        if block_hashes:
            self.predict(replica, block_hashes, now)

    def completed(self, key: str, replica: str | None = None) -> None:
        # a finished request queues nothing, whether or not the replica's last report knew it:
        # without this a replica whose report is late looks loaded by all it served since
        self._recent.pop(key, None)
        rid = self._work.pop(key, replica)
        if rid is not None:
            self.inflight[rid] = max(0, self.inflight[rid] - 1)

    def forget(self, replica: str) -> None:
        """A replica is gone: its in-flight count with it (its predictions expire)."""
        self.inflight.pop(replica, None)
        for key in [k for k, r in self._work.items() if r == replica]:
            del self._work[key]

    def queued(self, replica: str, load: LoadReport | None, now: float) -> int:
        """Prompt tokens ahead of a new request on ``replica``: its last report,
        what was routed there after that report was taken and has not finished,
        and what was chosen for it and not routed yet."""
        keep = max(10.0, self.config.stale_after_s)
        while self._recent and next(iter(self._recent.values()))[0] < now - keep:
            self._recent.popitem(last=False)
        base, taken_at = (load.queued_tokens, load.at) if load is not None else (0, float("-inf"))
        since = taken_at - self.config.delivery_s  # routed earlier than this had reached the replica
        recent = sum(t for when, r, t in self._recent.values() if r == replica and when > since)
        reserved = sum(c.tokens for c in self._chosen.values() if c.replica == replica)
        return base + recent + reserved

    def history(self, replica: str, now: float) -> float:
        """Requests routed to ``replica``, each decayed by its age (half-life history_halflife_s)."""
        value, at = self._history.get(replica, (0.0, now))
        return value * 0.5 ** (max(0.0, now - at) / self.config.history_halflife_s)

    def predict(self, replica: str, block_hashes: list[int], now: float) -> None:
        for h in block_hashes:
            self._predicted[(replica, h)] = now
            self._predicted.move_to_end((replica, h))
        while len(self._predicted) > self.MAX_PREDICTED:
            self._predicted.popitem(last=False)

    def predicted_hit(self, replica: str, block_hashes: list[int], now: float) -> int:
        """Leading blocks this router recently sent to ``replica`` (reported or not)."""
        n = 0
        for h in block_hashes:
            at = self._predicted.get((replica, h))
            if at is None or now - at > self.config.predict_ttl_s:
                break
            n += 1
        return n


class RoutingPolicy:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.accounting = Accounting(config)
        self.popularity = Popularity(config.popularity_window)
        self._rr = itertools.count()

    # -- state -----------------------------------------------------------------------------

    def state(self, replica: str, hit: tuple[int, int], block_hashes: list[int], load: LoadReport | None,
              now: float, *, adapter_cold: bool = False, cached_gpu_blocks: int = 0) -> ReplicaState:
        """A replica's state for one request, from its reported hit (device, CPU
        blocks) and load, and this router's own accounting."""
        gpu, cpu = hit
        reported = gpu + cpu
        predicted = self.accounting.predicted_hit(replica, block_hashes, now)
        if predicted > gpu + cpu:  # sent there moments ago: cached by the time it runs
            gpu, cpu = predicted, 0
        empty = None
        if load is not None and load.free_blocks >= 0:
            # free blocks minus cached ones: a lower bound (cached blocks in use are not free)
            empty = max(0, load.free_blocks - cached_gpu_blocks)
        age = None if load is None else now - load.at
        return ReplicaState(replica, gpu, cpu, self.accounting.inflight[replica],
                            self.accounting.queued(replica, load, now), adapter_cold, empty, age,
                            self.accounting.history(replica, now), reported,
                            (load.pull_fixed_tokens, load.pull_block_tokens) if load is not None else (-1.0, -1.0))

    # -- cost ------------------------------------------------------------------------------

    def own_tokens(self, prompt_tokens: int, s: ReplicaState, common: int = 0, remote: int = 0) -> float:
        """The request's own prefill on ``s``, with ``common`` blocks not deciding and
        ``remote`` blocks past its hit pulled from a peer."""
        c = self.config
        blocks = prompt_tokens / c.block_size
        hit = min(s.gpu_hit + (1 - c.cpu_copy_cost) * s.cpu_hit + remote - self.pull_tokens(s, remote) / c.block_size,
                  blocks)
        useful = max(0.0, hit - common)  # the common blocks count as cached everywhere
        return max(0.0, prompt_tokens - c.block_size * min(common, blocks) - c.hit_weight * c.block_size * useful)

    def pull_tokens(self, s: ReplicaState, remote: int) -> float:
        """What pulling ``remote`` blocks costs on ``s``, in prompt tokens: its own measured
        fixed + per-block cost where it reported one (never above recomputing them: it
        recomputes instead), else remote_copy_cost of a recompute."""
        if remote <= 0:
            return 0.0
        recompute = remote * self.config.block_size
        fixed, per_block = s.pull_cost
        if fixed < 0 or per_block < 0:
            return self.config.remote_copy_cost * recompute
        return min(recompute, fixed + per_block * remote)

    def uncached_tokens(self, prompt_tokens: int, s: ReplicaState) -> int:
        """Prompt tokens ``s`` will compute (its queued work once routed there)."""
        cached = min(prompt_tokens, self.config.block_size * (s.gpu_hit + s.cpu_hit))
        return prompt_tokens - cached

    def load_tokens(self, s: ReplicaState) -> float:
        return self.config.queue_weight * s.queued_tokens + self.config.per_request_tokens * s.inflight

    def pressure_tokens(self, prompt_tokens: int, s: ReplicaState) -> float:
        if s.empty_blocks is None:
            return 0.0
        bs = self.config.block_size
        new_blocks = -(-self.uncached_tokens(prompt_tokens, s) // bs)
        return self.config.evict_cost * bs * max(0, new_blocks - s.empty_blocks)

    def cost(self, prompt_tokens: int, s: ReplicaState, common: int = 0, remote: int = 0) -> float:
        return (self.own_tokens(prompt_tokens, s, common, remote) + self.load_tokens(s)
                + self.pressure_tokens(prompt_tokens, s)
                + (self.config.adapter_load_tokens if s.adapter_cold else 0))

    # -- choosing --------------------------------------------------------------------------

    def fresh(self, states: list[ReplicaState]) -> tuple[list[ReplicaState], list[ReplicaState]]:
        """(reporting, stale): a replica that stopped reporting is no candidate while
        another reports; when none does (the metadata actor is down) all are used."""
        ok = [s for s in states if s.report_age_s is not None and s.report_age_s <= self.config.stale_after_s]
        if not ok:
            return states, []
        return ok, [s for s in states if s not in ok]

    def over_share(self, states: list[ReplicaState]) -> set[str]:
        """Replicas that took more than their share of recent requests (beyond balance_epsilon)."""
        mean = sum(x.history for x in states) / len(states)
        return {x.replica for x in states if x.history > (1 + self.config.balance_epsilon) * mean + 1}

    def within_load_bound(self, states: list[ReplicaState]) -> list[ReplicaState]:
        mean = sum(s.inflight for s in states) / len(states)
        bound = (1 + self.config.load_epsilon) * mean + self.config.load_slack
        ok = [s for s in states if s.inflight <= bound]
        return ok or states

    def choose(self, states: list[ReplicaState], block_hashes: list[int],
               prompt_tokens: list[int]) -> list[Decision]:
        """Replicas best first (the caller tries them in order)."""
        if not states:
            return []
        policy = self.config.policy
        if policy == "round_robin":
            start = next(self._rr) % len(states)
            order = states[start:] + states[:start]
            return [Decision(s.replica, "round_robin", 0.0, 0) for s in order]
        if policy == "consistent_hash":
            key = prefix_key(block_hashes, prompt_tokens, self.config.rendezvous_blocks)
            by = {s.replica: s for s in states}
            return [Decision(r, "consistent_hash", 0.0, by[r].gpu_hit + by[r].cpu_hit)
                    for r in rendezvous(key, list(by))]
        return self._affinity(states, block_hashes, prompt_tokens)

    def common_blocks(self, states: list[ReplicaState], block_hashes: list[int]) -> int:
        """Leading blocks that must not decide placement: held by every candidate, or popular."""
        held_by_all = min(s.gpu_hit + s.cpu_hit for s in states)
        return max(held_by_all, self.popularity.common_depth(block_hashes, self.config.common_share))

    def _affinity(self, states: list[ReplicaState], block_hashes: list[int],
                  prompt_tokens: list[int]) -> list[Decision]:
        n = len(prompt_tokens)
        fresh, stale = self.fresh(states)
        candidates = self.within_load_bound(fresh)
        common = self.common_blocks(candidates, block_hashes)
        self.popularity.add(block_hashes)
        remote = self.remote_blocks(fresh, states)
        costs = {s.replica: self.cost(n, s, common, remote[s.replica]) for s in states}
        best = min(costs[s.replica] for s in candidates)
        near = [s for s in candidates if costs[s.replica] <= best + self.config.tie_tokens]
        # near ties go by the prompt's first block no candidate holds (never by name): a new
        # prefix lands where its hash says, equal prompts and their repeats meet on one replica
        fresh_from = max(common, max(s.gpu_hit + s.cpu_hit for s in candidates))
        key = prefix_key(block_hashes[fresh_from:], prompt_tokens[len(block_hashes) * self.config.block_size:], 1)
        order = {r: i for i, r in enumerate(rendezvous(key, [s.replica for s in near]))}
        near.sort(key=lambda s: order[s.replica])
        if len(near) > 1:  # bounded-load rendezvous: skip the near ties that took more than their share
            over = self.over_share(candidates)
            near.sort(key=lambda s: s.replica in over)
        if self.config.peer_kv:  # a pull prices holder and others close: of near ties, a longer own hit first
            near.sort(key=lambda s: -max(0, s.gpu_hit + s.cpu_hit - common))  # (common ones never decide)
        top_hit = near[0].gpu_hit + near[0].cpu_hit
        reason = "affinity" if top_hit > common else "rendezvous"
        far = sorted((s for s in candidates if s not in near), key=lambda s: costs[s.replica])
        over = sorted((s for s in fresh if s not in candidates), key=lambda s: s.inflight)

        def decide(ss: list[ReplicaState], why: str) -> list[Decision]:
            return [Decision(s.replica, why, costs[s.replica], s.gpu_hit + s.cpu_hit) for s in ss]
        return (decide(near, reason) + decide(far, "affinity") + decide(over, "least_loaded")
                + decide(stale, "stale"))

    # -- peer KV ---------------------------------------------------------------------------

    def remote_blocks(self, holders: list[ReplicaState], states: list[ReplicaState]) -> dict[str, int]:
        """Per replica, the blocks past its own hit it could pull from the best other
        holder (fresh replicas only: a silent one may be gone). 0 without peer KV."""
        if not self.config.peer_kv or len(holders) < 2:
            return {s.replica: 0 for s in states}
        hits = sorted(((h.held, h.replica) for h in holders), reverse=True)
        out = {}
        for s in states:
            best = next((n for n, r in hits if r != s.replica), 0)
            out[s.replica] = max(0, best - s.gpu_hit - s.cpu_hit)
        return out

    def peer_hint(self, states: list[ReplicaState], chosen: str) -> tuple[str, int] | None:
        """(holder, blocks) for the chosen replica to pull, when another fresh replica
        holds at least pull_min_blocks more of the prompt; else None."""
        if not self.config.peer_kv:
            return None
        fresh, _ = self.fresh(states)
        mine = next((s.gpu_hit + s.cpu_hit for s in states if s.replica == chosen), 0)
        best = max((s for s in fresh if s.replica != chosen), key=lambda s: s.held, default=None)
        if best is None or best.held - mine < self.config.pull_min_blocks:
            return None
        return best.replica, best.held

    def route(self, key: str, states: list[ReplicaState], block_hashes: list[int], prompt_tokens: list[int],
              now: float) -> list[Decision]:
        """``choose``, then reserve the first choice in the accounting (the caller
        reports ``accounting.routed`` / ``completed`` as the request moves on)."""
        decisions = self.choose(states, block_hashes, prompt_tokens)
        if decisions:
            first = decisions[0]
            st = next(s for s in states if s.replica == first.replica)
            self.accounting.reserve(key, first.replica, first.reason,
                                    self.uncached_tokens(len(prompt_tokens), st), first.hit_blocks, now,
                                    block_hashes)
        return decisions
