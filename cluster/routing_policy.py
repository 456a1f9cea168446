"""Replica choice for one request, as plain deterministic Python (no Ray).

The cost of sending a request to replica r, in tokens:

    cost(r) = uncached(r) + max(0, queued(r) - step_tokens)
    uncached(r) = prompt_tokens - block_size * (gpu_hit(r) + cpu_hit(r))
                  + cpu_copy_cost * block_size * cpu_hit(r)
    queued(r)   = prompt tokens waiting to be computed on r (reported by r every
                  publish interval), plus the uncached prompt tokens routed to r
                  since that report, plus ``per_request_tokens`` per in-flight
                  request for its decoding (with continuous batching a running
                  request costs a new one little more than its share of a step)
    + adapter_load_tokens when the request's LoRA adapter is not resident on r

The replica computes up to ``step_tokens`` tokens per step (its
max_num_batched_tokens), all at once: queued work that fits in one step
delays a new request hardly at all, so only the excess counts.

Prefix hits are per adapter by construction: the prompt's block hashes are
computed in the adapter's namespace, exactly as the engine caches them.

gpu_hit / cpu_hit: length of the prompt's longest cached prefix on r, in
blocks, from the device tier and then the CPU tier (a CPU-tier block must be
copied in, so it counts ``cpu_copy_cost`` of a recomputed one).

Load bound: a replica whose in-flight requests exceed
``(1 + load_epsilon) * mean + 1`` is not a candidate, so one hot prefix
spills to a second replica (which then builds its own copy) instead of
piling onto the first while others idle.

No useful hit (best hit below ``min_hit_fraction`` of the prompt): rendezvous
hashing over the first ``rendezvous_blocks`` block hashes among the
candidates, so repeats of a new prefix converge on one replica.

Every parameter and its default is in ``RouterConfig``; block_size and
step_tokens are the engine's (``RouterConfig.for_engine``).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

from radixserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig

POLICIES = ("prefix_affinity", "round_robin", "pow2", "consistent_hash")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """The policy's knobs. ``block_size`` and ``step_tokens`` are the replicas'
    engine settings, not the router's own: build it with :meth:`for_engine`."""

    policy: str = "prefix_affinity"
    block_size: int = CacheConfig.block_size  # tokens per cached block, as the engine hashes them
    cpu_copy_cost: float = 0.1       # a CPU-tier hit costs 10% of recomputing the block
    load_epsilon: float = 0.25       # in-flight bound: (1 + eps) * mean + 1
    min_hit_fraction: float = 0.1    # below this, a hit is not worth breaking rendezvous
    rendezvous_blocks: int = 4       # prefix blocks that key rendezvous hashing
    per_request_tokens: int = 16     # queued work of an in-flight request beyond its uncached prompt
    step_tokens: int = SchedulerConfig.max_num_batched_tokens  # the replicas' per-step token budget
    adapter_load_tokens: int = 256   # cost of loading a LoRA adapter into a replica's device slot
    sync_interval_s: float = 0.05    # how often the router pulls metadata deltas

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 <= self.cpu_copy_cost <= 1:
            raise ValueError(f"cpu_copy_cost must be in [0, 1], got {self.cpu_copy_cost}")
        if self.load_epsilon < 0:
            raise ValueError(f"load_epsilon must be >= 0, got {self.load_epsilon}")
        if self.sync_interval_s <= 0:
            raise ValueError(f"sync_interval_s must be > 0, got {self.sync_interval_s}")

    @classmethod
    def for_engine(cls, engine: EngineConfig, **overrides: Any) -> RouterConfig:
        """The router in front of replicas running ``engine``: it counts hits in the
        engine's blocks and queued work against the engine's step budget."""
        derived = {"block_size": engine.cache.block_size, "step_tokens": engine.scheduler.max_num_batched_tokens}
        clash = sorted(set(overrides) & set(derived))
        if clash:
            raise ValueError(f"router {clash} come from the engine config "
                             "(block_size, max_num_batched_tokens); set them there")
        return cls(**derived, **overrides)


@dataclass(frozen=True)
class ReplicaState:
    replica: str
    gpu_hit: int     # blocks
    cpu_hit: int     # blocks
    inflight: int    # requests routed and not finished
    queued_tokens: int
    adapter_cold: bool = False  # the request's LoRA adapter is not in this replica's device slots


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # "affinity" | "rendezvous" | "least_loaded" | "round_robin" | "consistent_hash"
    cost: float
    hit_blocks: int


def rendezvous(key: bytes, replicas: list[str]) -> list[str]:
    """Replicas ordered by highest-random-weight for ``key``: stable as replicas come and go."""
    score = lambda r: hashlib.blake2b(key + r.encode(), digest_size=8).digest()  # noqa: E731
    return sorted(replicas, key=score, reverse=True)


def prefix_key(block_hashes: list[int], prompt_tokens: list[int], n: int) -> bytes:
    if block_hashes:
        return block_hashes[min(n, len(block_hashes)) - 1].to_bytes(8, "little")
    return repr(prompt_tokens[:16]).encode()  # shorter than a block: key on the tokens


class RoutingPolicy:
    def __init__(self, config: RouterConfig):
        self.config = config
        self._rr = itertools.count()

    def cost(self, prompt_tokens: int, s: ReplicaState) -> float:
        bs = self.config.block_size
        cached = min(prompt_tokens, bs * (s.gpu_hit + s.cpu_hit))
        uncached = prompt_tokens - cached + self.config.cpu_copy_cost * bs * s.cpu_hit
        queued = max(0, s.queued_tokens - self.config.step_tokens)
        return uncached + queued + (self.config.adapter_load_tokens if s.adapter_cold else 0)

    def within_load_bound(self, states: list[ReplicaState]) -> list[ReplicaState]:
        mean = sum(s.inflight for s in states) / len(states)
        bound = (1 + self.config.load_epsilon) * mean + 1
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
        key = prefix_key(block_hashes, prompt_tokens, self.config.rendezvous_blocks)
        if policy == "consistent_hash":
            by = {s.replica: s for s in states}
            return [Decision(r, "consistent_hash", 0.0, by[r].gpu_hit + by[r].cpu_hit)
                    for r in rendezvous(key, list(by))]
        return self._affinity(states, key, len(prompt_tokens))

    def _affinity(self, states: list[ReplicaState], key: bytes, prompt_len: int) -> list[Decision]:
        candidates = self.within_load_bound(states)
        best_hit = max(s.gpu_hit + s.cpu_hit for s in candidates)
        useful = best_hit * self.config.block_size >= max(1, self.config.min_hit_fraction * prompt_len)
        if useful:
            ranked = sorted(candidates, key=lambda s: (self.cost(prompt_len, s), s.inflight, s.replica))
            reason = "affinity"
        else:  # nothing worth keeping: let repeats of this prefix meet on one replica
            order = {r: i for i, r in enumerate(rendezvous(key, [s.replica for s in candidates]))}
            ranked = sorted(candidates, key=lambda s: order[s.replica])
            reason = "rendezvous"
        rest = sorted((s for s in states if s not in candidates), key=lambda s: s.inflight)
        out = [Decision(s.replica, reason, self.cost(prompt_len, s), s.gpu_hit + s.cpu_hit) for s in ranked]
        return out + [Decision(s.replica, "least_loaded", self.cost(prompt_len, s), s.gpu_hit + s.cpu_hit)
                      for s in rest]
