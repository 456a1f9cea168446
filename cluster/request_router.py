"""PrefixAffinityRouter: cluster/routing_policy.py's policy on Ray Serve's request-router API.

Each copy of the router (one per process holding a handle to the LLM
deployment) keeps a local copy of the RadixCacheMetadata index, refreshed by
an async delta pull every ``sync_interval_s`` -- routing a request never
waits on a remote call. All accounting (in-flight requests,
reservations, recent routings) and the cost model live in routing_policy.py;
this class only feeds it Ray's callbacks and reports its decisions to the
metadata actor for /metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
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
from radixserve.cluster.replica_wire import RoutingInfo, encode_hint, routing_info
from radixserve.cluster.routing_policy import ReplicaState, RouterConfig, RoutingPolicy

log = logging.getLogger(__name__)
_REPORT_EVERY = 10  # syncs between two reports of the decision counters (0.5 s)


# No FIFOMixin on purpose: with it, a replica chosen for one request may be
# handed to whichever request is oldest, which would break per-prompt affinity.
# Without it Ray fulfils exactly the request the choice was made for.
class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Thin: Ray's callbacks feed ``RoutingPolicy.accounting``, the policy decides."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.cfg = RouterConfig(**kwargs)
        self.policy = RoutingPolicy(self.cfg)
        self.acct = self.policy.accounting
        self.index = LocalIndex()
        self.router_id = uuid.uuid4().hex[:8]
        self._sync_task: asyncio.Task | None = None
        self.report_age: dict[str, float] = {}  # replica -> mean age of its load report at decisions
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

    def _states(self, replicas: list[RunningReplica], info: RoutingInfo, now: float) -> list[ReplicaState]:
        out = []
        for r in replicas:
            rid = r.replica_id.unique_id
            # an adapter outside the replica's device slots must be loaded first
            cold = info.lora is not None and info.lora not in self.index.resident.get(rid, ())
            out.append(self.policy.state(rid, self.index.hit(rid, info.block_hashes), info.block_hashes,
                                         self.index.loads.get(rid), now, adapter_cold=cold,
                                         cached_gpu_blocks=self.index.gpu_blocks.get(rid, 0)))
        return out

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.call_method == "export_kv":
            # peer KV: a replica asks the holder by name (LLMServer.export_kv's first argument)
            target = [r for r in candidate_replicas if r.replica_id.unique_id == pending_request.args[0]]
            # gone: any replica refuses an export meant for another at once, so the puller
            # recomputes now rather than at its timeout
            return [target or candidate_replicas[:1]] if candidate_replicas else []
        self._ensure_sync()
        routable = (pending_request is not None and pending_request.args
                    and isinstance(pending_request.args[0], bytes))
        if self.cfg.policy == "pow2" or not routable or not candidate_replicas:
            # Ray's default, also for calls that carry no prompt (get_info, metrics, ...)
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        info = routing_info(pending_request.args[0])
        now = time.time()  # wall clock: load reports carry the replicas' wall-clock time
        states = self._states(candidate_replicas, info, now)
        self._note_report_age(states)
        decisions = self.policy.route(pending_request.metadata.internal_request_id, states, info.block_hashes,
                                      info.prompt_token_ids, now)
        hint = self.policy.peer_hint(states, decisions[0].replica) if decisions else None
        if hint is not None:  # the chosen replica pulls this prefix from its holder (LLMServer.generate)
            pending_request.kwargs["peer_hint"] = encode_hint(*hint)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[d.replica]] for d in decisions]

    def _note_report_age(self, states: list[ReplicaState]) -> None:
        """How stale the view deciding is (exponential mean over decisions): the cost
        model is only as good as it, so /metrics shows it."""
        for st in states:
            if st.report_age_s is not None:
                prev = self.report_age.get(st.replica, st.report_age_s)
                self.report_age[st.replica] = 0.9 * prev + 0.1 * st.report_age_s

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.acct.routed(pending_request.metadata.internal_request_id, replica_id.unique_id, time.time())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.acct.completed(internal_request_id, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.acct.forget(replica_id.unique_id)
        if self._actor is not None:
            self._actor.drop.remote(replica_id.unique_id)  # fire and forget

    def metrics_text(self) -> str:
        lines = ["# HELP radixserve:router_decisions_total Requests routed, by replica and reason",
                 "# TYPE radixserve:router_decisions_total counter"]
        for (rid, reason), n in sorted(self.acct.decisions.items()):
            lines.append(f'radixserve:router_decisions_total{{router="{self.router_id}",replica="{rid}",'
                         f'reason="{reason}"}} {n}')
        lines += ["# HELP radixserve:router_inflight Requests in flight per replica, as this router sees it",
                  "# TYPE radixserve:router_inflight gauge"]
        for rid, n in sorted(self.acct.inflight.items()):
            lines.append(f'radixserve:router_inflight{{router="{self.router_id}",replica="{rid}"}} {n}')
        lines += ["# HELP radixserve:router_report_age_seconds Age of a replica's load report when this "
                  "router decides (exponential mean)",
                  "# TYPE radixserve:router_report_age_seconds gauge"]
        for rid, age in sorted(self.report_age.items()):
            lines.append(f'radixserve:router_report_age_seconds{{router="{self.router_id}",replica="{rid}"}} '
                         f'{age:.4f}')
        return "\n".join(lines) + "\n"
