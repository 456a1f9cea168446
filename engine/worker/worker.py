"""One tensor-parallel rank: joins the process group, owns a ModelRunner."""
from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from radixserve.engine.cache.transfer import CacheTransferServer
from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.protocol import WorkerSpec
from radixserve.engine.model.hf_config import load_arch_config
from radixserve.engine.worker.distributed import TPGroup
from radixserve.engine.worker.model_runner import ModelRunner, resolve_device


class Worker:
    def __init__(self, spec: WorkerSpec, auth: FrameAuth, epoch: int):
        """``auth`` and ``epoch`` sign this rank's cache-queue frames, as its engine-queue ones."""
        self.spec = spec
        self.auth, self.epoch = auth, epoch
        cfg = spec.config
        tp_size = cfg.parallel.tensor_parallel_size
        device = resolve_device(cfg.device)
        if device.type == "cuda" and tp_size > 1:
            device = torch.device("cuda", spec.rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        if tp_size > 1:
            assert spec.dist_init_method is not None, "tensor_parallel_size > 1 needs a rendezvous address"
            timeout = timedelta(seconds=cfg.parallel.worker_timeout_s)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    store=rendezvous_store(spec.dist_init_method, spec.rank, tp_size, timeout),
                                    rank=spec.rank, world_size=tp_size, timeout=timeout)
        tp = TPGroup(spec.rank, tp_size)
        self.transfer: CacheTransferServer | None = None
        arch = load_arch_config(spec.model_dir)
        self.runner = ModelRunner(cfg, Path(spec.model_dir), arch, tp, device, spec.max_model_len,
                                  frozenset(spec.eos_token_ids))

    def num_blocks_fitting(self) -> int:
        return self.runner.num_blocks_fitting()

    @property
    def block_bytes(self) -> int:
        return self.runner.block_bytes

    def init_cache(self, num_blocks: int, num_cpu_blocks: int = 0, cache_address: str = "") -> None:
        """Allocate the device pool and, with a CPU tier or peer KV (a cache queue address),
        the host pool (maybe empty) and its transfer thread."""
        self.runner.allocate_kv_cache(num_blocks)
        if num_cpu_blocks or cache_address:
            host = self.runner.allocate_host_pool(num_cpu_blocks)
            self.transfer = CacheTransferServer(self.spec.rank, cache_address, self.runner.kv_cache, host,
                                                self.auth, self.epoch)
            self.runner.transfer = self.transfer

    def execute(self, so: SchedulerOutput) -> StepResult:
        return self.runner.execute(so)

    def shutdown(self) -> None:
        if self.transfer is not None:
            self.transfer.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def rendezvous_store(init_method: str, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """torch.distributed's TCPStore at ``tcp://host:port``, rank 0 serving it on that host
    only: given just a port, torch's store listens on every interface."""
    url = urlsplit(init_method)
    host, port = url.hostname, url.port
    if url.scheme != "tcp" or host is None or port is None:
        raise ValueError(f"rendezvous address must be tcp://host:port, got {init_method!r}")
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(world_size * 4)
        store = dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it
    return store
