"""ClusterConfig: what one Serve deployment of radixserve is built from.

Ray-free, so ``radixserve serve --help`` and config checks stay light. A Serve
config's ``args`` (ray_configs/serve.yaml) are ClusterConfig's fields plus any
engine option (``radixserve.engine.config.engine_flags()``: block_size,
tensor_parallel_size, ...), whose defaults live in the engine's dataclasses.
The router's block size and step budget are not options of their own: they
are the engine's (:meth:`ClusterConfig.router_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from radixserve.cluster.routing_policy import POLICIES, RouterConfig
from radixserve.engine.config import EngineConfig, ModelConfig, engine_flags

# LLMServer options a deployment_config may not override: they place the replica and its workers.
_OWNED_OPTIONS = {"name", "placement_group_bundles", "placement_group_strategy", "request_router_config"}


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    model: str = ModelConfig.model
    num_replicas: int | str = 1  # or "auto": Serve's default autoscaling
    router: str = "prefix_affinity"
    api_keys: dict[str, str] | None = None  # API key -> tenant; None = open
    served_model_name: str | list[str] | None = None  # several: the first is reported, all accepted
    allowed_origins: tuple[str, ...] = ()  # CORS (none by default; ("*",) allows any origin)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    tool_call_parser: str = "hermes"  # how tool_choice "auto" reads tool calls (vLLM's --tool-call-parser)
    max_ongoing_requests: int = 64  # per replica, before Serve queues at the router
    autoscaling: dict | None = None  # Serve autoscaling_config (then num_replicas is ignored)
    # Ray Serve LLM's shape: LLMServer deployment options (autoscaling_config, max_ongoing_requests,
    # ray_actor_options, health checks, ...) applied over ours; placement is ours to decide.
    deployment_config: dict = field(default_factory=dict)
    runtime_env: dict | None = None  # Ray runtime_env of every replica (env_vars, pip, ...)
    # A replica whose engine has work but makes no progress this long fails its health check
    # (0: never); above the slowest legitimate step, a TP group restart included.
    stall_timeout_s: float = 120.0
    # The HTTP layer's limits and access (ServerConfig in cluster/openai_api/app.py says what each does).
    max_request_body_bytes: int = 8 * 2**20
    max_prompt_chars: int | None = None
    max_prompts_per_request: int = 256
    max_stop_sequences: int = 64
    metrics_api_key: str | None = None
    allowed_lora_roots: tuple[str, ...] = ()
    replica_cpus: float = 0.5  # CPU resources per bundle (replica and each TP worker)
    use_gpu: bool | None = None  # None: use GPUs when the node has them
    router_kwargs: dict = field(default_factory=dict)  # RouterConfig overrides (not block_size/step_tokens)
    engine: dict = field(default_factory=dict)  # engine options (engine_flags()) other than model

    def __post_init__(self) -> None:
        if self.num_replicas != "auto" and not (isinstance(self.num_replicas, int) and self.num_replicas >= 1):
            raise ValueError(f"num_replicas must be an int >= 1 or 'auto', got {self.num_replicas!r}")
        owned = sorted(set(self.deployment_config) & _OWNED_OPTIONS)
        if owned:
            raise ValueError(f"deployment_config may not set {owned}: radixserve places replicas and their "
                             "TP workers itself (use replica_cpus / use_gpu)")
        from radixserve.cluster.openai_api.tools import check_tool_parser
        check_tool_parser(self.tool_call_parser)  # at startup, not in the ingress replica
        if self.router not in POLICIES:
            raise ValueError(f"router must be one of {', '.join(POLICIES)}, got {self.router!r}")
        if not (isinstance(self.stall_timeout_s, (int, float)) and self.stall_timeout_s >= 0):
            raise ValueError(f"stall_timeout_s must be a number >= 0 (0: off), got {self.stall_timeout_s!r}")
        self.router_config()  # validates the engine options too: fail here, not on a replica
        from radixserve.cluster.openai_api.app import ServerConfig  # fastapi: only once a config is built
        ServerConfig(**self.server_limits())  # and the HTTP limits

    def server_limits(self) -> dict[str, Any]:
        """The ServerConfig fields this config sets beyond names, keys and CORS."""
        return {"max_request_body_bytes": self.max_request_body_bytes, "max_prompt_chars": self.max_prompt_chars,
                "max_prompts_per_request": self.max_prompts_per_request,
                "max_stop_sequences": self.max_stop_sequences, "metrics_api_key": self.metrics_api_key,
                "allowed_lora_roots": tuple(self.allowed_lora_roots)}

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_flat(model=self.model, **self.engine)

    def router_config(self) -> RouterConfig:
        """The router hashes and counts in the engine's blocks and step budget."""
        return RouterConfig.for_engine(self.engine_config(), policy=self.router, **self.router_kwargs)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ClusterConfig:
        """Split a flat dict into cluster fields and engine options; unknown keys are an error."""
        own = {f.name for f in fields(cls)}
        engine_keys = set(engine_flags()) - {"model"}
        unknown = set(args) - own - engine_keys
        if unknown:
            raise ValueError(f"unknown serve arguments: {sorted(unknown)}")
        mine = {k: v for k, v in args.items() if k in own}
        engine = {**mine.pop("engine", {}), **{k: v for k, v in args.items() if k in engine_keys}}
        return cls(**mine, engine=engine)
