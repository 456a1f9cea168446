"""Tensor parallelism over N worker processes, driven through the engine-worker queue.

The engine binds one ZMQ ROUTER socket on ``engine_worker_queue_port`` (host
127.0.0.1 unless configured); each rank connects a DEALER. Every frame is
signed with this engine's key and stamped with the group's epoch
(engine/executor/auth.py): anything else on the port is dropped unread, and a
rank is addressed by the routing id its signed hello came from. Every step is
one msgpack message to each rank and one reply from each; rank 0's reply
carries the sampled tokens. A rank that dies, fails or does not answer within
``worker_timeout_s`` fails the step with WorkerFailure; the engine then
restarts the whole group under the next epoch.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from radixserve.engine.config import EngineConfig
from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult
from radixserve.engine.executor import wire
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.base import Executor, WorkerFailure
from radixserve.engine.executor.launcher import ProcessLauncher, WorkerHandle, WorkerLauncher
from radixserve.engine.executor.net import bind_router, close_on_collect, free_tcp_port
from radixserve.engine.executor.protocol import WORKER_TO_ENGINE, InitCache, WorkerArgs, WorkerSpec

log = logging.getLogger(__name__)
_POLL_MS = 100  # how often a wait checks that every worker is still alive
_LOAD_TIMEOUT_S = 600.0  # loading a shard can take long; hangs are still bounded


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, spec_fn: Callable[[int, str], WorkerSpec],
                 launcher: WorkerLauncher | None = None):
        self.config = config
        self.tp = config.parallel.tensor_parallel_size
        self.timeout_s = config.parallel.worker_timeout_s
        self.spec_fn = spec_fn
        self.launcher = launcher or ProcessLauncher()
        self.ctx = zmq.Context()
        host = config.parallel.worker_host
        self.sock, self.port = bind_router(self.ctx, host, config.parallel.engine_worker_queue_port)
        close_on_collect(self, self.sock, self.ctx)
        self.address = f"tcp://{host}:{self.port}"
        self.handles: list[WorkerHandle] = []
        self.auth = FrameAuth.generate()  # per launch; reaches workers only in their start arguments
        self.epoch = 0
        self.peers: dict[int, bytes] = {}  # rank -> ZMQ routing id of its signed hello
        self.healthy = False
        self.last_queue_overhead_s = 0.0
        self._cache_args: tuple[int, int, str] = (0, 0, "")
        self._start_group()
        self.num_blocks = self.capacity

    # -- group lifecycle ---------------------------------------------------------------

    def _start_group(self) -> None:
        """Start every rank and wait until each has loaded its shard."""
        host = self.config.parallel.worker_host
        init = f"tcp://{host}:{free_tcp_port(host)}"
        threads = max(1, (os.cpu_count() or 1) // self.tp)  # no oversubscription across ranks
        self.epoch += 1
        self.peers = {}
        key = self.auth.key.hex()
        self.handles = [self.launcher.start(WorkerArgs(self.spec_fn(rank, init), self.address, key, self.epoch,
                                                       threads))
                        for rank in range(self.tp)]
        try:
            loaded = self._gather("loaded", _LOAD_TIMEOUT_S)
        except BaseException:
            self._kill_all()
            raise
        self.capacity = min(m.num_blocks for m in loaded.values())
        self.block_bytes = max(m.block_bytes for m in loaded.values())
        if self.capacity < 1:
            self._kill_all()
            raise WorkerFailure("no KV block fits on some rank")

    def init_cache(self, num_blocks: int, num_cpu_blocks: int, cache_address: str) -> None:
        if num_blocks > self.capacity:
            raise WorkerFailure(f"{num_blocks} blocks asked, but only {self.capacity} fit on every rank")
        try:
            self._broadcast("init_cache", InitCache(num_blocks, num_cpu_blocks, cache_address))
            self._gather("ack", _LOAD_TIMEOUT_S)
        except BaseException:
            self._kill_all()
            raise
        self.num_blocks = num_blocks
        self._cache_args = (num_blocks, num_cpu_blocks, cache_address)
        self.healthy = True

    def restart(self) -> None:
        """Replace every worker (after a failure) under a new epoch; the KV pools start
        empty. Whatever the old group still had in flight is dropped as stale."""
        self._kill_all()
        self._drain()
        self._start_group()
        self.init_cache(*self._cache_args)

    def _kill_all(self) -> None:
        self.healthy = False
        for h in self.handles:
            h.kill()

    def _drain(self) -> None:
        while self.sock.poll(0):
            self.sock.recv_multipart()

    # -- messaging -------------------------------------------------------------------------

    def _broadcast(self, kind: str, body) -> None:
        frame = self.auth.sign(self.epoch, wire.encode(kind, body))
        for rank in range(self.tp):
            peer = self.peers.get(rank)
            if peer is None:
                raise WorkerFailure(f"rank {rank} never said hello")
            try:
                self.sock.send_multipart([peer, *frame])
            except zmq.ZMQError as exc:
                raise WorkerFailure(f"rank {rank} is not connected: {exc}") from exc

    def _recv(self) -> tuple[bytes, str, Any] | None:
        """One frame of this epoch from an authenticated rank: (routing id, kind, body);
        None for a frame dropped (unsigned, foreign or stale)."""
        ident, *parts = self.sock.recv_multipart()
        raw = self.auth.open(parts, self.epoch, "engine-worker queue")
        if raw is None:
            return None
        try:
            kind, body = wire.decode(raw, WORKER_TO_ENGINE)
        except wire.WireError as exc:  # signed with our key: one of our workers is broken
            raise WorkerFailure(f"a rank sent an invalid message: {exc}") from exc
        if not 0 <= body.rank < self.tp:
            raise WorkerFailure(f"a worker claims rank {body.rank} of {self.tp}")
        if kind == "hello":
            self.peers[body.rank] = ident
        elif self.peers.get(body.rank) != ident:
            raise WorkerFailure(f"rank {body.rank} answered before its hello, or from another socket")
        return ident, kind, body

    def _gather(self, kind: str, timeout_s: float) -> dict:
        """One ``kind`` reply per rank, or WorkerFailure (death, failure, timeout)."""
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.tp:
            msg = self._recv() if self.sock.poll(_POLL_MS) else None
            if msg is not None:
                _, got, body = msg
                if got == "failure":
                    raise WorkerFailure(f"rank {body.rank} failed: {body.message}")
                if got == "hello":
                    continue
                if got != kind:
                    raise WorkerFailure(f"rank {body.rank} answered {got!r}, expected {kind!r}")
                replies[body.rank] = body
                continue
            # Nothing, or a dropped frame: a flood of foreign frames must not hide a death or a hang.
            dead = [h.describe() for h in self.handles if not h.is_alive()]
            if dead:
                raise WorkerFailure(f"worker died: {', '.join(dead)}")
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.tp)) - set(replies))
                raise WorkerFailure(f"rank(s) {missing} did not answer within {timeout_s:.0f}s")
        return replies

    # -- Executor --------------------------------------------------------------------------------

    def execute(self, so: SchedulerOutput) -> StepResult:
        if not self.healthy:
            raise WorkerFailure("workers are down")
        start = time.perf_counter()
        try:
            self._broadcast("step", so)
            replies = self._gather("step", self.timeout_s)
        except WorkerFailure:
            self.healthy = False
            raise
        compute = max(r.compute_s for r in replies.values())
        self.last_queue_overhead_s = time.perf_counter() - start - compute
        return replies[0].result

    def ping(self) -> float:
        """Round trip through every rank's queue, in seconds (health and overhead)."""
        start = time.perf_counter()
        self._broadcast("ping", None)
        self._gather("ack", self.timeout_s)
        return time.perf_counter() - start

    def is_healthy(self) -> bool:
        return self.healthy and all(h.is_alive() for h in self.handles)

    def shutdown(self) -> None:
        if self.healthy:
            try:
                self._broadcast("shutdown", None)
                self._gather("ack", 10.0)
            except WorkerFailure:
                pass
        self._kill_all()
        self.launcher.close()
        self.sock.close(0)
        self.ctx.term()
