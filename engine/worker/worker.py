"""One tensor-parallel rank: joins the process group, owns a ModelRunner."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from radixserve.engine.cache.transfer import CacheTransferServer
from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult
from radixserve.engine.executor.protocol import WorkerSpec
from radixserve.engine.model.hf_config import load_arch_config
from radixserve.engine.worker.distributed import TPGroup
from radixserve.engine.worker.model_runner import ModelRunner, resolve_device


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        cfg = spec.config
        tp_size = cfg.parallel.tensor_parallel_size
        device = resolve_device(cfg.device)
        if device.type == "cuda" and tp_size > 1:
            device = torch.device("cuda", spec.rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        if tp_size > 1:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    init_method=spec.dist_init_method, rank=spec.rank,
                                    world_size=tp_size,
                                    timeout=timedelta(seconds=cfg.parallel.worker_timeout_s))
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
        """Allocate the device pool and, with a CPU tier, the host pool and its transfer thread."""
        self.runner.allocate_kv_cache(num_blocks)
        if num_cpu_blocks:
            host = self.runner.allocate_host_pool(num_cpu_blocks)
            self.transfer = CacheTransferServer(self.spec.rank, cache_address, self.runner.kv_cache, host)
            self.runner.transfer = self.transfer

    def execute(self, so: SchedulerOutput) -> StepResult:
        return self.runner.execute(so)

    def shutdown(self) -> None:
        if self.transfer is not None:
            self.transfer.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
