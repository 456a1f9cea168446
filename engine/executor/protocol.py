"""Every message of the engine's two ZMQ queues, and what each side may send.

* The engine-worker queue (``engine_worker_queue_port``): the engine binds a
  ROUTER, each tensor-parallel rank connects a DEALER. A worker says
  ``hello``, reports ``loaded`` (how many KV blocks fit), then answers
  ``init_cache`` / ``ping`` / ``shutdown`` with ``ack`` and each ``step``
  (a SchedulerOutput) with a StepReply, or sends ``failure``.
* The cache queue (``cache_queue_port``, only with a CPU tier): the engine
  binds a ROUTER, each rank's transfer thread connects a DEALER, says
  ``hello``, then runs each ``task`` (swap-in / swap-out) and sends an
  ``ack``; the engine folds a task's acks from all ranks into a TransferDone.

Every frame is signed with the engine's per-launch key and stamped with the
group's epoch (engine/executor/auth.py); frames that fail either check are
dropped unread. Peers are addressed by the ZMQ routing id their signed
``hello`` came from, never by a name a peer picks for itself.

Each side decodes with the table of what the other may send (kind -> body
dataclass, None for no body), through the typed codec in wire.py. Every
message carries ``wire.WIRE_VERSION``: engine and workers must run the same
version, so bump it when any type here (or one nested in it) changes shape.
Plain data only -- importable without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.engine.config import EngineConfig
from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult

# -- engine-worker queue --------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to start; plain values so it can cross a process boundary."""

    config: EngineConfig
    model_dir: str
    rank: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    dist_init_method: str | None = None  # tcp://127.0.0.1:port when tensor_parallel_size > 1


@dataclass(frozen=True)
class WorkerArgs:
    """A worker's start arguments: JSON on a local process's stdin (never its command
    line, which ``ps`` shows to everyone), or a Ray actor's call argument."""

    spec: WorkerSpec
    engine_address: str   # tcp://127.0.0.1:8002
    auth_key: str         # hex; signs every frame of both queues (engine/executor/auth.py)
    epoch: int            # the group's generation: frames of any other one are dropped
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    die_with_parent: bool = True  # local processes: never outlive the engine
    parent_pid: int = 0   # the engine's pid; a worker whose parent is already gone exits


@dataclass(frozen=True)
class Hello:
    rank: int
    pid: int


@dataclass(frozen=True)
class Loaded:
    rank: int
    num_blocks: int   # device blocks that fit on this rank
    block_bytes: int  # bytes of one block on this rank (sizes the CPU tier)


@dataclass(frozen=True)
class InitCache:
    num_blocks: int
    num_cpu_blocks: int = 0
    cache_address: str = ""  # the engine's cache queue, when there is a CPU tier


@dataclass(frozen=True)
class Ack:
    rank: int


@dataclass(frozen=True)
class Failure:
    rank: int
    message: str


@dataclass(frozen=True)
class StepReply:
    rank: int
    result: StepResult
    compute_s: float  # time inside the worker, so the engine can tell queue overhead apart


# What the engine may send a worker: kind -> body type.
ENGINE_TO_WORKER = {"init_cache": InitCache, "step": SchedulerOutput, "ping": None, "shutdown": None}
# What a worker may send the engine.
WORKER_TO_ENGINE = {"hello": Hello, "loaded": Loaded, "ack": Ack, "step": StepReply, "failure": Failure}

# -- cache queue ----------------------------------------------------------------------


@dataclass(frozen=True)
class RankKV:
    """One rank's KV of a run of blocks, as raw bytes (engine/cache/peer.py)."""

    rank: int
    data: bytes  # a C-contiguous tensor [layers, 2, blocks, block_size, kv_heads/tp, head_dim]
    dtype: str   # torch dtype name, e.g. "float32"
    shape: list[int]


@dataclass(frozen=True)
class TransferTask:
    task_id: int
    # "swap_in" (CPU -> device) | "swap_out" (device -> CPU) | "export" (device blocks
    # then CPU blocks -> bytes in the ack) | "import" (``kv`` -> device blocks)
    kind: str
    gpu_blocks: list[int]
    cpu_blocks: list[int]
    kv: RankKV | None = None  # import: this rank's bytes (its first len(gpu_blocks) blocks are written)


@dataclass(frozen=True)
class TransferAck:
    task_id: int
    rank: int
    ok: bool
    error: str
    seconds: float
    num_bytes: int
    kv: RankKV | None = None  # export: the blocks' bytes


@dataclass(frozen=True)
class TransferHello:
    rank: int


@dataclass(frozen=True)
class TransferDone:
    """A task every rank finished (ok) or some rank failed (engine-side, never sent)."""

    task_id: int
    ok: bool
    error: str
    seconds: float  # slowest rank
    num_bytes: int  # summed over ranks
    kv: list[RankKV] = field(default_factory=list)  # export: every rank's bytes, by rank


# What the engine may send a rank's transfer thread.
TO_SERVER = {"task": TransferTask, "stop": None}
# What a transfer thread may send the engine.
TO_CLIENT = {"hello": TransferHello, "ack": TransferAck}
