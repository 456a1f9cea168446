"""How the engine reaches its workers. TP=1 runs the worker in-process."""
from __future__ import annotations

from abc import ABC, abstractmethod

from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.protocol import WorkerSpec
from radixserve.engine.worker.worker import Worker


class WorkerFailure(RuntimeError):
    """A worker died, failed or hung: its KV pool is gone and the group must restart."""


class Executor(ABC):
    """Runs steps on the workers. After construction ``num_blocks`` is how many
    device blocks fit on every rank and ``block_bytes`` the size of one;
    ``init_cache`` then allocates the pools."""

    num_blocks: int
    block_bytes: int
    auth: FrameAuth  # signs both queues' frames; the cache queue's client uses it too
    epoch: int       # the workers' generation, bumped by every restart

    @abstractmethod
    def init_cache(self, num_blocks: int, num_cpu_blocks: int, cache_address: str) -> None: ...

    @abstractmethod
    def execute(self, so: SchedulerOutput) -> StepResult: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    def is_healthy(self) -> bool:
        return True

    def restart(self) -> None:
        """Bring the workers back with empty KV pools (after a WorkerFailure)."""
        raise WorkerFailure("this executor cannot restart its workers")


class UniprocExecutor(Executor):
    """A single rank living in the engine's own process: no queue, no copies."""

    def __init__(self, spec: WorkerSpec):
        self.auth, self.epoch = FrameAuth.generate(), 1
        self.worker = Worker(spec, self.auth, self.epoch)
        self.num_blocks = self.worker.num_blocks_fitting()
        self.block_bytes = self.worker.block_bytes

    def init_cache(self, num_blocks: int, num_cpu_blocks: int, cache_address: str) -> None:
        self.num_blocks = num_blocks
        self.worker.init_cache(num_blocks, num_cpu_blocks, cache_address)

    def execute(self, so: SchedulerOutput) -> StepResult:
        return self.worker.execute(so)

    def shutdown(self) -> None:
        self.worker.shutdown()
