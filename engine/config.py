"""Frozen, validated configuration for every engine component.

Each dataclass checks itself in ``__post_init__`` so a bad value fails at
construction with a message naming the field, not deep inside a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how.

    ``model`` is an embedded model name (``tiny-llama``, ``small-llama``) or a
    path to a Hugging Face directory. ``max_model_len`` of None means the
    model's ``max_position_embeddings``.
    """

    model: str = "tiny-llama"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    max_model_len: int | None = None
    seed: int = 0  # engine-wide sampling seed for requests without their own
    cache_dir: str | None = None  # where embedded models are generated

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must be a model name or a directory path")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len >= 1,
                 f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """KV cache layout and sizing (per tensor-parallel rank)."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None  # explicit size of the device pool; wins over the others
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory the engine may use
    kv_cache_gib: float | None = None  # explicit device-pool size in GiB (CPU default: 2 GiB)
    swap_space: float = 0.0  # GiB of host memory per rank for the CPU tier (0 = no CPU tier)
    num_cpu_blocks: int | None = None  # explicit CPU-tier size; wins over swap_space

    def __post_init__(self) -> None:
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
                 f"block_size must be a power of two from 1 to 128, got {self.block_size}")
        _require(self.num_gpu_blocks is None or self.num_gpu_blocks >= 1,
                 f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.kv_cache_gib is None or self.kv_cache_gib > 0,
                 f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        _require(self.swap_space >= 0, f"swap_space must be >= 0 GiB, got {self.swap_space}")
        _require(self.num_cpu_blocks is None or self.num_cpu_blocks >= 0,
                 f"num_cpu_blocks must be >= 0, got {self.num_cpu_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048  # token budget of one step
    enable_chunked_prefill: bool = True
    # What a preempted sequence's cached blocks may do: swap = move to the CPU tier
    # (needs one), recompute = stay device-only; auto: swap when a CPU tier exists.
    preemption_mode: str = "auto"

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _require(self.preemption_mode in ("auto", "recompute", "swap"),
                 f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism and the ports the workers are driven over."""

    tensor_parallel_size: int = 1
    engine_worker_queue_port: int = 8002
    cache_queue_port: int = 8003
    host: str = "127.0.0.1"
    worker_timeout_s: float = 60.0  # a step slower than this marks the workers dead

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        for name in ("engine_worker_queue_port", "cache_queue_port"):
            port = getattr(self, name)
            _require(0 <= port < 65536, f"{name} must be a TCP port (0 = any free one), got {port}")
        _require(self.worker_timeout_s > 0, f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (PEFT adapters on q/k/v/o/gate/up/down).

    ``max_loras`` adapters are resident in device slots at once (LRU over idle
    ones); every slot is sized for ``max_lora_rank``. ``max_cpu_loras`` is how
    many adapters' weight shards each worker keeps in host memory so a slot
    reload need not read the disk (None = 2 * max_loras). ``lora_modules`` are
    (name, path) pairs loaded at startup.
    """

    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_modules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _require(self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras}")
        _require(1 <= self.max_lora_rank <= 1024, f"max_lora_rank must be in [1, 1024], got {self.max_lora_rank}")
        _require(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras,
                 f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        names = [name for name, _ in self.lora_modules]
        _require(all(names), "lora_modules: every adapter needs a non-empty name (name=path)")
        _require(len(set(names)) == len(names), f"lora_modules: duplicate adapter names in {names}")
        _require(self.enable_lora or not self.lora_modules,
                 "lora_modules were given but enable_lora is False; pass enable_lora=True (--enable-lora true)")

    @property
    def cpu_cache_size(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else 2 * self.max_loras


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    device: str = "auto"  # auto: cuda if available, else cpu
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        _require(self.attention_backend in ("auto", "torch", "triton"),
                 f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        cache = self.cache
        cpu_tier = cache.num_cpu_blocks > 0 if cache.num_cpu_blocks is not None else cache.swap_space > 0
        _require(self.scheduler.preemption_mode != "swap" or cpu_tier,
                 "preemption_mode='swap' moves preempted blocks to the CPU tier, which needs "
                 "swap_space > 0 (or num_cpu_blocks > 0); use 'recompute' or 'auto' without one")
