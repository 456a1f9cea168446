"""PrefixAffinityRouter: cluster/routing_policy.py's policy on Ray Serve's request-router API.

Each copy of the router (one per process holding a handle to the LLM
deployment) keeps a local copy of the RadixCacheMetadata index, refreshed by
an async delta pull every ``sync_interval_s`` -- routing a request never
waits on a remote call. It tracks in-flight requests per replica itself
(routed minus completed) for the load bound, and reports its decisions to
the metadata actor for /metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from radixserve.cluster.metadata import ACTOR_NAMESPACE, LocalIndex, actor_name, decode_delta
from radixserve.cluster.replica_wire import RoutingInfo, routing_info
from radixserve.cluster.routing_policy import ReplicaState, RouterConfig, RoutingPolicy

log = logging.getLogger(__name__)
_REPORT_EVERY = 10  # syncs between two reports of the decision counters (0.5 s)
_RESERVATION_TTL_S = 60.0
_DELIVERY_S = 0.05  # a routed request reaches its replica's queue within this
_RECENT_KEEP_S = 10.0  # forget routings older than this even without a newer report


@dataclass(frozen=True)
class Choice:
    """A replica chosen for a request that Ray has not routed yet (counted against it meanwhile)."""

    replica: str
    reason: str  # the policy's reason, the label of router_decisions_total
    tokens: int  # the prompt tokens it will compute there (uncached)
    hit: int     # prompt blocks cached there
    at: float    # time.monotonic() of the choice; expired after _RESERVATION_TTL_S


# No FIFOMixin on purpose: with it, a replica chosen for one request may be
# handed to whichever request is oldest, which would break per-prompt affinity.
# Without it Ray fulfils exactly the request the choice was made for.
class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self.cfg = RouterConfig(**kwargs)
        self.policy = RoutingPolicy(self.cfg)
        self.index = LocalIndex()
        self.router_id = uuid.uuid4().hex[:8]
        self.inflight: Counter[str] = Counter()
        self.decisions: Counter[tuple[str, str]] = Counter()  # (replica, reason) -> count
        self.hit_blocks: Counter[str] = Counter()
        self._work: dict[str, str] = {}  # internal request id -> replica, while in flight
        # (wall-clock time, replica, uncached prompt tokens) of recent routings:
        # work the replicas' own load reports may not include yet
        self._recent: deque[tuple[float, str, int]] = deque()
        self._chosen: dict[str, Choice] = {}  # internal request id -> its replica, not yet routed
        self._sync_task: asyncio.Task | None = None
        self._actor = None

    # -- metadata sync --------------------------------------------------------------------

    def _ensure_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        n = 0
        while ray.is_initialized():  # after ray.shutdown() a lookup would auto-start a new Ray
            try:
                if self._actor is None:
                    self._actor = ray.get_actor(actor_name(self._deployment_id.app_name),
                                                namespace=ACTOR_NAMESPACE)
                self.index.apply(decode_delta(await self._actor.pull.remote(self.index.version)))
                n += 1
                if n % _REPORT_EVERY == 0:
                    self._actor.report_router.remote(self.router_id, self.metrics_text())
            except ValueError:  # the actor does not exist (yet): route without affinity
                self._actor = None
            except Exception:  # keep routing on the last copy; try again next tick
                log.exception("metadata pull failed")
                self._actor = None
            await asyncio.sleep(self.cfg.sync_interval_s)

    # -- choosing ---------------------------------------------------------------------------

    def _states(self, replicas: list[RunningReplica], info: RoutingInfo) -> list[ReplicaState]:
        out = []
        for r in replicas:
            rid = r.replica_id.unique_id
            gpu, cpu = self.index.hit(rid, info.block_hashes)
            # an adapter outside the replica's device slots must be loaded first
            cold = info.lora is not None and info.lora not in self.index.resident.get(rid, ())
            out.append(ReplicaState(rid, gpu, cpu, self.inflight[rid], self._queued(rid), cold))
        return out

    def _queued(self, rid: str) -> int:
        """Prompt tokens ahead of a new request on ``rid``: its last load report,
        what was routed there after that report was taken, and a little per
        running request for its decoding."""
        while self._recent and self._recent[0][0] < time.time() - _RECENT_KEEP_S:
            self._recent.popleft()
        load, taken_at = self.index.loads.get(rid, (0, 0.0))
        since = taken_at - _DELIVERY_S  # routed earlier than this had reached the replica
        recent = sum(t for when, r, t in self._recent if r == rid and when > since)
        reserved = sum(c.tokens for c in self._chosen.values() if c.replica == rid)
        return load + recent + reserved + self.cfg.per_request_tokens * self.inflight[rid]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._ensure_sync()
        routable = (pending_request is not None and pending_request.args
                    and isinstance(pending_request.args[0], bytes))
        if self.cfg.policy == "pow2" or not routable or not candidate_replicas:
            # Ray's default, also for calls that carry no prompt (get_info, metrics, ...)
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        info = routing_info(pending_request.args[0])
        decisions = self.policy.choose(self._states(candidate_replicas, info), info.block_hashes,
                                       info.prompt_head)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        first = decisions[0]
        state = next(st for st in self._states([by_id[first.replica]], info))
        tokens = max(0, int(self.policy.cost(info.prompt_len, replace(state, queued_tokens=0))))  # its own work
        self._reserve(pending_request.metadata.internal_request_id, first.replica, first.reason, tokens,
                      first.hit_blocks)
        return [[by_id[d.replica]] for d in decisions]

    def _reserve(self, key: str, replica: str, reason: str, tokens: int, hit: int) -> None:
        """Count a request against its replica as soon as it is chosen: concurrent
        routing decisions must see each other, or a burst of one hot prefix
        would all pick the same replica before any of them is routed."""
        self._release(key)
        self._expire_reservations()
        self.inflight[replica] += 1
        self._chosen[key] = Choice(replica, reason, tokens, hit, time.monotonic())

    def _release(self, key: str) -> Choice | None:
        held = self._chosen.pop(key, None)
        if held is not None:
            self.inflight[held.replica] = max(0, self.inflight[held.replica] - 1)
        return held

    def _expire_reservations(self) -> None:
        cutoff = time.monotonic() - _RESERVATION_TTL_S  # requests cancelled before being routed
        for key in [k for k, v in self._chosen.items() if v.at < cutoff]:
            self._release(key)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = replica_id.unique_id
        key = pending_request.metadata.internal_request_id
        held = self._release(key)
        reason, tokens, hit = (held.reason, held.tokens, held.hit) if held else (self.cfg.policy, 0, 0)
        self.inflight[rid] += 1
        self._recent.append((time.time(), rid, tokens))
        self.decisions[(rid, reason)] += 1
        self.hit_blocks[rid] += hit
        self._work[key] = rid

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._work.pop(internal_request_id, replica_id.unique_id)
        self.inflight[rid] = max(0, self.inflight[rid] - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        if self._actor is not None:
            self._actor.drop.remote(replica_id.unique_id)  # fire and forget

    def metrics_text(self) -> str:
        lines = ["# HELP radixserve:router_decisions_total Requests routed, by replica and reason",
                 "# TYPE radixserve:router_decisions_total counter"]
        for (rid, reason), n in sorted(self.decisions.items()):
            lines.append(f'radixserve:router_decisions_total{{router="{self.router_id}",replica="{rid}",'
                         f'reason="{reason}"}} {n}')
        lines += ["# HELP radixserve:router_inflight Requests in flight per replica, as this router sees it",
                  "# TYPE radixserve:router_inflight gauge"]
        for rid, n in sorted(self.inflight.items()):
            lines.append(f'radixserve:router_inflight{{router="{self.router_id}",replica="{rid}"}} {n}')
        return "\n".join(lines) + "\n"
