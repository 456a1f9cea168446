"""The cache queue (engine/cache/transfer.py) without a model: which swap
implementation a rank uses, and a real ZMQ round trip on CPU pools."""
from __future__ import annotations

import time

import pytest
import torch
import zmq

from radixserve.engine.cache.cpu_tier import SWAP_IN, SWAP_OUT
from radixserve.engine.cache.transfer import CacheTransferClient, CacheTransferServer, TransferTask, swap_fn
from radixserve.engine.executor import wire
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.protocol import TransferAck, TransferHello
from radixserve.kernels import block_copy
from radixserve.kernels._triton import HAS_TRITON

SHAPE = (2, 2, 8, 4, 2, 8)  # [layers, K/V, blocks, block_size, kv_heads, head_dim]


def test_swap_implementation_is_picked_by_device():
    assert swap_fn(torch.device("cpu")) is block_copy.swap_blocks_ref  # Triton needs CUDA
    triton_or_ref = block_copy.swap_blocks if HAS_TRITON else block_copy.swap_blocks_ref
    assert swap_fn(torch.device("cuda", 0)) is triton_or_ref


def test_swap_out_and_in_round_trip_on_cpu_pools():
    device_pool = torch.randn(SHAPE)
    host_pool = torch.zeros(SHAPE[:2] + (6,) + SHAPE[3:])
    auth = FrameAuth.generate()
    client = CacheTransferClient("127.0.0.1", 0, num_ranks=1, auth=auth, epoch=1)
    server = CacheTransferServer(0, client.address, device_pool, host_pool, auth, 1)
    try:
        assert server.swap is block_copy.swap_blocks_ref
        client.wait_connected(10)
        client.send(TransferTask(1, SWAP_OUT, [5, 2], [0, 3]))
        [done] = client.poll({1}, timeout_s=10)
        assert done.ok and done.num_bytes == 2 * server.block_bytes
        server.wait([1], timeout_s=10)  # a swap-out is what a step waits for
        assert torch.equal(host_pool[:, :, [0, 3]], device_pool[:, :, [5, 2]])
        client.send(TransferTask(2, SWAP_IN, [7, 6], [0, 3]))
        [done] = client.poll({2}, timeout_s=10)
        assert done.ok
        assert torch.equal(device_pool[:, :, [7, 6]], device_pool[:, :, [5, 2]])
    finally:
        server.stop()
        client.close()


def test_cache_queue_drops_foreign_and_stale_frames():
    """A local process on the cache port can neither pose as a rank's transfer thread nor
    complete a transfer; nor can the thread of a killed group (an older epoch)."""
    device_pool, host_pool = torch.randn(SHAPE), torch.zeros(SHAPE)
    auth = FrameAuth.generate()
    client = CacheTransferClient("127.0.0.1", 0, num_ranks=1, auth=auth, epoch=2)
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    intruder.setsockopt(zmq.IDENTITY, b"cache-0")
    intruder.connect(client.address)
    stale = CacheTransferServer(0, client.address, device_pool, host_pool, auth, 1)  # the old group's thread
    fake_ack = wire.encode("ack", TransferAck(1, 0, True, "", 0.0, 0))
    server = None
    try:
        intruder.send(wire.encode("hello", TransferHello(0)))  # the unsigned frames of main
        intruder.send_multipart(FrameAuth.generate().sign(2, wire.encode("hello", TransferHello(0))))  # a guessed key
        with pytest.raises(TimeoutError, match=r"ranks \[0\] did not connect"):
            client.wait_connected(1.0)
        assert auth.dropped == 2 and auth.stale == 1
        server = CacheTransferServer(0, client.address, device_pool, host_pool, auth, 2)
        client.wait_connected(10)
        client.send(TransferTask(1, SWAP_OUT, [5, 2], [0, 3]))
        intruder.send(fake_ack)
        intruder.send_multipart([b"x" * 32, (2).to_bytes(8, "big"), fake_ack])
        [done] = client.poll({1}, timeout_s=10)
        assert done.ok and done.num_bytes == 2 * server.block_bytes  # the real thread's ack, not a fake one
        server.wait([1], timeout_s=10)
        assert torch.equal(host_pool[:, :, [0, 3]], device_pool[:, :, [5, 2]])
        time.sleep(0.2)
        assert client.poll() == [] and auth.dropped == 4
    finally:
        for s in (stale, server):
            if s is not None:
                s.stop()
        intruder.close(0)
        ctx.term()
        client.close()
