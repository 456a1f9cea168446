"""The loop one tensor-parallel worker runs, whoever launched it.

A worker connects a ZMQ DEALER socket to the engine's engine-worker queue
(``engine_worker_queue_port``), says hello, loads its shard, reports how many
KV blocks fit, and then executes whatever valid messages arrive until told to
stop; the messages are in engine/executor/protocol.py. Every frame is signed
with the key and stamped with the epoch of its start arguments, and frames
that fail either check are dropped unread (engine/executor/auth.py). The same
``run_worker`` serves local processes (``python -m
radixserve.engine.worker.main``, arguments as JSON on stdin) and Ray actors
(cluster/), so launching is pluggable.

torch is imported only after the parent-death signal is armed: a parent
killed while a worker is still importing must not leave it running.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING

import zmq

from radixserve.engine.executor import wire
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.protocol import ENGINE_TO_WORKER, Ack, Failure, Hello, Loaded, StepReply, WorkerArgs

if TYPE_CHECKING:
    from radixserve.engine.worker.worker import Worker

log = logging.getLogger(__name__)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL us when the engine process dies, so a
    crashed engine leaves no orphan workers holding ports or memory. A parent
    that died before the signal was armed is caught by the pid check."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def run_worker(args: WorkerArgs) -> None:
    if args.die_with_parent:
        _die_with_parent(args.parent_pid)
    import torch

    from radixserve.engine.worker.worker import Worker
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rank, epoch, auth = args.spec.rank, args.epoch, FrameAuth.from_hex(args.auth_key)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # no identity: the engine learns our routing id from the signed hello
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.engine_address)
    send = lambda kind, body: sock.send_multipart(auth.sign(epoch, wire.encode(kind, body)))  # noqa: E731
    send("hello", Hello(rank, os.getpid()))
    try:
        worker = Worker(args.spec, auth, epoch)
        send("loaded", Loaded(rank, worker.num_blocks_fitting(), worker.block_bytes))
        _serve(sock, worker, rank, send, auth, epoch)
    except Exception as exc:  # report, then exit: the engine restarts the group
        send("failure", Failure(rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"))
        raise
    finally:
        sock.close(0)
        ctx.term()


def _serve(sock, worker: Worker, rank: int, send, auth: FrameAuth, epoch: int) -> None:
    while True:
        raw = auth.open(sock.recv_multipart(), epoch, f"rank {rank}")
        if raw is None:
            continue
        try:
            kind, body = wire.decode(raw, ENGINE_TO_WORKER)
        except wire.WireError as exc:  # never execute what we cannot validate
            send("failure", Failure(rank, f"rejected message: {exc}"))
            continue
        if kind == "shutdown":
            worker.shutdown()
            send("ack", Ack(rank))
            return
        if kind == "ping":
            send("ack", Ack(rank))
        elif kind == "init_cache":
            worker.init_cache(body.num_blocks, body.num_cpu_blocks, body.cache_address)
            send("ack", Ack(rank))
        elif kind == "step":
            start = time.perf_counter()
            result = worker.execute(body)
            send("step", StepReply(rank, result, time.perf_counter() - start))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="[worker %(process)d] %(message)s")
    args = wire.from_plain(WorkerArgs, json.loads(sys.stdin.buffer.read()))
    run_worker(args)


if __name__ == "__main__":
    main()
