"""The cache queue: KV block transfers between each rank's device pool and CPU pool.

The engine binds a ZMQ ROUTER on ``cache_queue_port`` (127.0.0.1 unless
configured); every rank runs a ``CacheTransferServer`` thread that connects a
DEALER, executes tasks (swap-in, swap-out) on its own pools -- on CUDA on a
side stream, so copies overlap the model's forward -- and acknowledges each
task. ``CacheTransferClient`` reports a task done only when every rank acked
it; a rank that fails a task fails it for all. Frames are signed and
epoch-stamped as on the engine-worker queue (engine/executor/auth.py, same key
and epoch): foreign or stale frames are dropped unread, and a rank's thread is
addressed by the routing id its signed hello came from. Messages are msgpack via
engine/executor/wire.py (types in engine/executor/protocol.py), validated, never pickled. The bytes move with the
staged Triton swap kernels of kernels/block_copy.py on CUDA and with their
torch reference on CPU (``swap_fn``).
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Collection

import torch
import zmq

from radixserve.engine.cache.cpu_tier import SWAP_IN, SWAP_OUT
from radixserve.engine.cache.peer import EXPORT, IMPORT
from radixserve.engine.executor import wire
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.net import bind_router, close_on_collect
from radixserve.engine.executor.protocol import (
    TO_CLIENT,
    TO_SERVER,
    RankKV,
    TransferAck,
    TransferDone,
    TransferHello,
    TransferTask,
)
from radixserve.kernels import block_copy
from radixserve.kernels._triton import HAS_TRITON

log = logging.getLogger(__name__)
_MAX_DRAIN = 10_000  # frames one poll() takes without waiting

# swap(src_pool, dst_pool, src_block_ids, dst_block_ids): dst_pool[:, :, dst[i]] = src_pool[:, :, src[i]]
SwapFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def swap_fn(device: torch.device) -> SwapFn:
    """How blocks move between a device pool on ``device`` and its host pool:
    on CUDA the Triton kernels (one gather/scatter launch and one staged PCIe
    copy per task), elsewhere the torch reference (a Triton kernel needs CUDA)."""
    if device.type == "cuda" and HAS_TRITON:
        return block_copy.swap_blocks
    return block_copy.swap_blocks_ref


# A peer export/import crosses the cache queue as raw bytes with dtype and shape (msgpack, never pickle).
def kv_from_tensor(rank: int, t: torch.Tensor) -> RankKV:
    t = t.contiguous()
    return RankKV(rank, t.view(torch.uint8).numpy().tobytes(), str(t.dtype).removeprefix("torch."), list(t.shape))


def tensor_from_kv(kv: RankKV) -> torch.Tensor:
    dtype = getattr(torch, kv.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {kv.dtype!r}")
    with warnings.catch_warnings():  # read only (copied into a pool): no writable copy of tens of MB
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = torch.frombuffer(kv.data, dtype=torch.uint8)
    return raw.view(dtype).reshape(kv.shape)


class CacheTransferClient:
    """Engine side: send tasks to every rank, collect complete acknowledgements."""

    def __init__(self, host: str, port: int, num_ranks: int, auth: FrameAuth, epoch: int):
        self.ctx = zmq.Context()
        self.sock, self.port = bind_router(self.ctx, host, port)
        close_on_collect(self, self.sock, self.ctx)
        self.address = f"tcp://{host}:{self.port}"
        self.num_ranks = num_ranks
        self.auth, self.epoch = auth, epoch
        self._acks: dict[int, dict[int, TransferAck]] = defaultdict(dict)  # task -> rank -> ack
        self._peers: dict[int, bytes] = {}  # rank -> routing id of its signed hello
        self._sent: set[int] = set()  # tasks sent and not yet done

    def wait_connected(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._peers) < self.num_ranks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cache transfer threads of ranks "
                                   f"{sorted(set(range(self.num_ranks)) - set(self._peers))} did not connect")
            self._recv(100)

    def reset(self, epoch: int) -> None:
        """Workers restarted as generation ``epoch``: forget the old group's acks and
        threads; its frames still queued or in flight are dropped as stale."""
        self.epoch = epoch
        self._acks.clear()
        self._peers.clear()
        self._sent.clear()

    def send(self, task: TransferTask) -> None:
        frame = self.auth.sign(self.epoch, wire.encode("task", task))
        self._sent.add(task.task_id)
        for rank in range(self.num_ranks):
            self.sock.send_multipart([self._peers[rank], *frame])

    def send_each(self, tasks: list[TransferTask]) -> None:
        """One task per rank (``tasks[r]`` to rank r, same task id): a peer import's bytes."""
        assert len(tasks) == self.num_ranks and len({t.task_id for t in tasks}) == 1
        self._sent.add(tasks[0].task_id)
        for rank, task in enumerate(tasks):
            self.sock.send_multipart([self._peers[rank], *self.auth.sign(self.epoch, wire.encode("task", task))])

    def _recv(self, timeout_ms: int) -> bool:
        """Take one frame if one comes within ``timeout_ms``; False if none came."""
        if not self.sock.poll(timeout_ms):
            return False
        ident, *parts = self.sock.recv_multipart()
        raw = self.auth.open(parts, self.epoch, "cache queue")
        if raw is None:
            return True
        kind, body = wire.decode(raw, TO_CLIENT)  # signed with our key: a WireError is our bug
        if kind == "hello":
            if 0 <= body.rank < self.num_ranks:
                self._peers[body.rank] = ident
        elif self._peers.get(body.rank) == ident and body.task_id in self._sent:
            self._acks[body.task_id][body.rank] = body
        else:
            log.warning("cache queue: dropped an ack of rank %d for task %d it was not sent",
                        body.rank, body.task_id)
        return True

    def poll(self, wait_for: Collection[int] = frozenset(), timeout_s: float = 0.0) -> list[TransferDone]:
        """Tasks now complete. Blocks until every task in ``wait_for`` is, or
        raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for _ in range(_MAX_DRAIN):  # bounded: a flood of foreign frames cannot hold the engine here
            if not self._recv(0):
                break
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
        for task_id, by_rank in list(self._acks.items()):
            acks = list(by_rank.values())
            failed = [a for a in acks if not a.ok]
            if len(acks) == self.num_ranks or failed:
                if failed and len(acks) < self.num_ranks:
                    continue  # wait for the others too, so no rank still writes the blocks
                del self._acks[task_id]
                self._sent.discard(task_id)
                kv = [a.kv for a in sorted(acks, key=lambda a: a.rank) if a.kv is not None]
                done.append(TransferDone(task_id, not failed, "; ".join(a.error for a in failed),
                                         max(a.seconds for a in acks), sum(a.num_bytes for a in acks), kv))
        return done

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class CacheTransferServer:
    """Worker side: one thread per rank moving blocks between its two pools."""

    def __init__(self, rank: int, address: str, device_pool: torch.Tensor, host_pool: torch.Tensor,
                 auth: FrameAuth, epoch: int):
        self.rank = rank
        self.address = address
        self.auth, self.epoch = auth, epoch
        self.device_pool = device_pool  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.host_pool = host_pool      # same layout, CPU (pinned on CUDA machines)
        self.block_bytes = device_pool[:, :, 0].numel() * device_pool.element_size()
        self.stream = torch.cuda.Stream(device_pool.device) if device_pool.is_cuda else None
        self.swap = swap_fn(device_pool.device)
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

    def _copy(self, task: TransferTask) -> RankKV | None:
        dev = self.device_pool.device
        gpu = torch.tensor(task.gpu_blocks, dtype=torch.long, device=dev)
        cpu = torch.tensor(task.cpu_blocks, dtype=torch.long)
        if task.kind == SWAP_OUT:
            self.swap(self.device_pool, self.host_pool, gpu, cpu)
        elif task.kind == SWAP_IN:
            self.swap(self.host_pool, self.device_pool, cpu, gpu)
        elif task.kind == EXPORT:
            return self._export(gpu, cpu)
        elif task.kind == IMPORT:
            self._import(task, gpu)
        else:
            raise ValueError(f"unknown transfer kind {task.kind!r}")
        return None

    def _export(self, gpu: torch.Tensor, cpu: torch.Tensor) -> RankKV:
        """Copy pinned blocks out (device ones, then CPU-tier ones: a chain's order);
        reads only, so requests running on the device pool are not disturbed."""
        dev, host = self.device_pool[:, :, gpu].cpu(), self.host_pool[:, :, cpu]
        # [layers, 2, n, block_size, kv_heads, head_dim]; one tier alone needs no second copy
        out = host if not len(gpu) else dev if not len(cpu) else torch.cat([dev, host], dim=2)
        return kv_from_tensor(self.rank, out)

    def _import(self, task: TransferTask, gpu: torch.Tensor) -> None:
        if task.kv is None:
            raise ValueError("an import task without bytes")
        kv = tensor_from_kv(task.kv)  # [layers, 2, m, block_size, kv_heads, head_dim], m >= n
        want = self.device_pool[:, :, :0].shape
        if kv.dtype != self.device_pool.dtype or kv.shape[:2] != want[:2] or kv.shape[3:] != want[3:] \
                or kv.shape[2] < len(task.gpu_blocks):
            raise ValueError(f"peer KV of shape {list(kv.shape)} {kv.dtype} does not fit this pool "
                             f"({list(want)} {self.device_pool.dtype}, {len(task.gpu_blocks)} blocks)")
        self.device_pool[:, :, gpu] = kv[:, :, :len(task.gpu_blocks)].to(self.device_pool.device)

    def _execute(self, task: TransferTask) -> TransferAck:
        start = time.perf_counter()
        try:
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    kv = self._copy(task)
                self.stream.synchronize()
            else:
                kv = self._copy(task)
        except Exception as exc:  # reported per task; the engine fails its requests
            log.exception("cache transfer %d failed", task.task_id)
            return TransferAck(task.task_id, self.rank, False, f"{type(exc).__name__}: {exc}",
                               time.perf_counter() - start, 0)
        nbytes = (len(task.gpu_blocks) + (len(task.cpu_blocks) if task.kind == EXPORT else 0)) * self.block_bytes
        return TransferAck(task.task_id, self.rank, True, "", time.perf_counter() - start, nbytes, kv)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)  # no identity: the engine learns our routing id from the signed hello
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        send = lambda kind, body: sock.send_multipart(self.auth.sign(self.epoch, wire.encode(kind, body)))  # noqa: E731
        try:
            send("hello", TransferHello(self.rank))
            while not self._stop:
                if not sock.poll(100):
                    continue
                raw = self.auth.open(sock.recv_multipart(), self.epoch, f"cache queue, rank {self.rank}")
                if raw is None:
                    continue
                try:
                    kind, task = wire.decode(raw, TO_SERVER)
                except wire.WireError as exc:
                    log.error("cache queue: rejected message: %s", exc)
                    continue
                if kind == "stop":
                    return
                send("ack", self._execute(task))
                if task.kind == SWAP_OUT:  # only swap-outs are waited for by the step
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
