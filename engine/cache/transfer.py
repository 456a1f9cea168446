"""The cache queue: KV block transfers between each rank's device pool and CPU pool.

The engine binds a ZMQ ROUTER on ``cache_queue_port`` (127.0.0.1 unless
configured); every rank runs a ``CacheTransferServer`` thread that connects a
DEALER, executes tasks (swap-in, swap-out) on its own pools -- on CUDA on a
side stream, so copies overlap the model's forward -- and acknowledges each
task. ``CacheTransferClient`` reports a task done only when every rank acked
it; a rank that fails a task fails it for all. The messages are in
engine/executor/protocol.py: msgpack via engine/executor/wire.py, validated,
never pickled.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Collection

import torch
import zmq

from radixserve.engine.executor import wire
from radixserve.engine.executor.net import bind_router
from radixserve.engine.executor.protocol import (
    TO_CLIENT,
    TO_SERVER,
    TransferAck,
    TransferDone,
    TransferHello,
    TransferTask,
)
from radixserve.kernels import block_copy

log = logging.getLogger(__name__)


class CacheTransferClient:
    """Engine side: send tasks to every rank, collect complete acknowledgements."""

    def __init__(self, host: str, port: int, num_ranks: int):
        self.ctx = zmq.Context()
        self.sock, self.port = bind_router(self.ctx, host, port)
        self.address = f"tcp://{host}:{self.port}"
        self.num_ranks = num_ranks
        self._acks: dict[int, list[TransferAck]] = defaultdict(list)
        self._connected: set[int] = set()

    def wait_connected(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._connected) < self.num_ranks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cache transfer threads of ranks "
                                   f"{sorted(set(range(self.num_ranks)) - self._connected)} did not connect")
            self._recv(100)

    def reset(self) -> None:
        """Workers restarted: forget acks and connections of the old group."""
        self._acks.clear()
        self._connected.clear()
        while self.sock.poll(0):
            self.sock.recv_multipart()

    def send(self, task: TransferTask) -> None:
        data = wire.encode("task", task)
        for rank in range(self.num_ranks):
            self.sock.send_multipart([f"cache-{rank}".encode(), data])

    def _recv(self, timeout_ms: int) -> bool:
        if not self.sock.poll(timeout_ms):
            return False
        _, raw = self.sock.recv_multipart()
        kind, body = wire.decode(raw, TO_CLIENT)
        if kind == "hello":
            self._connected.add(body.rank)
        else:
            self._acks[body.task_id].append(body)
        return True

    def poll(self, wait_for: Collection[int] = frozenset(), timeout_s: float = 0.0) -> list[TransferDone]:
        """Tasks now complete. Blocks until every task in ``wait_for`` is, or
        raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._recv(0):
            pass
        done = self._collect()
        pending = set(wait_for) - {d.task_id for d in done}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cache transfers {sorted(pending)} not acknowledged in {timeout_s:.0f}s")
            self._recv(int(min(left, 0.1) * 1000) + 1)
            new = self._collect()
            done += new
            pending -= {d.task_id for d in new}
        return done

    def wait_any(self, timeout_s: float) -> None:
        """Block until some message arrives (or the timeout): the engine idles
        here while swap-ins run, instead of spinning."""
        self._recv(int(timeout_s * 1000))

    def _collect(self) -> list[TransferDone]:
        done = []
        for task_id, acks in list(self._acks.items()):
            failed = [a for a in acks if not a.ok]
            if len(acks) == self.num_ranks or failed:
                if failed and len(acks) < self.num_ranks:
                    continue  # wait for the others too, so no rank still writes the blocks
                del self._acks[task_id]
                done.append(TransferDone(task_id, not failed, "; ".join(a.error for a in failed),
                                         max(a.seconds for a in acks), sum(a.num_bytes for a in acks)))
        return done

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class CacheTransferServer:
    """Worker side: one thread per rank moving blocks between its two pools."""

    def __init__(self, rank: int, address: str, device_pool: torch.Tensor, host_pool: torch.Tensor):
        self.rank = rank
        self.address = address
        self.device_pool = device_pool  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.host_pool = host_pool      # same layout, CPU (pinned on CUDA machines)
        self.block_bytes = device_pool[:, :, 0].numel() * device_pool.element_size()
        self.stream = torch.cuda.Stream(device_pool.device) if device_pool.is_cuda else None
        self._done: set[int] = set()
        self._cond = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cache-transfer-{rank}", daemon=True)
        self._thread.start()

    def wait(self, task_ids: list[int], timeout_s: float) -> None:
        """Block until these tasks ran here (the step's swap-outs must finish
        before the step replies, so no block is reused mid-copy)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not set(task_ids) <= self._done:
                if self.error is not None:
                    raise RuntimeError(f"cache transfer thread died: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"cache transfers {task_ids} did not run in {timeout_s:.0f}s")
                self._cond.wait(left)
            self._done -= set(task_ids)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)

    def _copy(self, task: TransferTask) -> None:
        dev = self.device_pool.device
        gpu = torch.tensor(task.gpu_blocks, dtype=torch.long, device=dev)
        cpu = torch.tensor(task.cpu_blocks, dtype=torch.long)
        if task.kind == "swap_out":
            block_copy.swap_blocks_ref(self.device_pool, self.host_pool, gpu, cpu)
        elif task.kind == "swap_in":
            block_copy.swap_blocks_ref(self.host_pool, self.device_pool, cpu, gpu)
        else:
            raise ValueError(f"unknown transfer kind {task.kind!r}")

    def _execute(self, task: TransferTask) -> TransferAck:
        start = time.perf_counter()
        try:
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    self._copy(task)
                self.stream.synchronize()
            else:
                self._copy(task)
        except Exception as exc:  # reported per task; the engine fails its requests
            log.exception("cache transfer %d failed", task.task_id)
            return TransferAck(task.task_id, self.rank, False, f"{type(exc).__name__}: {exc}",
                               time.perf_counter() - start, 0)
        nbytes = len(task.gpu_blocks) * self.block_bytes
        return TransferAck(task.task_id, self.rank, True, "", time.perf_counter() - start, nbytes)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"cache-{self.rank}".encode())
        sock.connect(self.address)
        try:
            sock.send(wire.encode("hello", TransferHello(self.rank)))
            while not self._stop:
                if not sock.poll(100):
                    continue
                try:
                    kind, task = wire.decode(sock.recv(), TO_SERVER)
                except wire.WireError as exc:
                    log.error("cache queue: rejected message: %s", exc)
                    continue
                if kind == "stop":
                    return
                sock.send(wire.encode("ack", self._execute(task)))
                if task.kind == "swap_out":  # only swap-outs are waited for by the step
                    with self._cond:
                        self._done.add(task.task_id)
                        self._cond.notify_all()
        except BaseException as exc:
            self.error = exc
            with self._cond:
                self._cond.notify_all()
            raise
        finally:
            sock.close(0)
            ctx.term()
