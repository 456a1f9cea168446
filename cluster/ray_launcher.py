"""Tensor-parallel workers as Ray actors inside the replica's placement group.

The replica deployment reserves a STRICT_PACK placement group (its own
bundle plus one per rank), so the workers land on the replica's node and the
engine-worker queue stays on 127.0.0.1. Each actor runs the same
``radixserve.engine.worker.main.run_worker`` loop as a local worker process.
"""
from __future__ import annotations

import dataclasses
import json

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from radixserve.engine.executor import wire
from radixserve.engine.executor.launcher import WorkerHandle, WorkerLauncher
from radixserve.engine.executor.protocol import WorkerArgs


@ray.remote(max_restarts=0)
class TPWorkerActor:
    def run(self, args_json: str) -> None:
        from radixserve.engine.worker.main import run_worker
        run_worker(wire.from_plain(WorkerArgs, json.loads(args_json)))


class RayWorkerHandle(WorkerHandle):
    def __init__(self, actor, done_ref, rank: int):
        self.actor = actor
        self.done_ref = done_ref  # resolves when the worker loop exits (or the actor dies)
        self.rank = rank

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.done_ref], timeout=0)
        return not ready

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def describe(self) -> str:
        return f"rank {self.rank} (Ray actor {self.actor._actor_id.hex()[:12]})"


class RayWorkerLauncher(WorkerLauncher):
    def __init__(self, use_gpu: bool, cpus_per_worker: float = 0.5,
                 placement_group: PlacementGroup | None = None, first_bundle: int = 1):
        """Bundle ``first_bundle + rank`` of the placement group hosts rank
        ``rank``; bundle 0 is the replica itself."""
        self.use_gpu = use_gpu
        self.cpus = cpus_per_worker
        self.pg = placement_group or get_current_placement_group()
        self.first_bundle = first_bundle

    def start(self, args: WorkerArgs) -> WorkerHandle:
        rank = args.spec.rank
        args = dataclasses.replace(args, die_with_parent=False)  # the key travels as the call's argument
        opts = {"num_cpus": self.cpus, "num_gpus": 1 if self.use_gpu else 0}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=self.first_bundle + rank)
        actor = TPWorkerActor.options(**opts).remote()
        return RayWorkerHandle(actor, actor.run.remote(json.dumps(wire.to_plain(args))), rank)


def replica_bundles(tp: int, use_gpu: bool, cpus: float = 0.5) -> list[dict]:
    """Placement group for one replica: itself, then one bundle per TP rank (1 GPU each on GPUs)."""
    if tp == 1:
        return [{"CPU": cpus, "GPU": 1}] if use_gpu else [{"CPU": cpus}]
    worker = {"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus}
    return [{"CPU": cpus}] + [dict(worker) for _ in range(tp)]
