"""Build the Serve application: OpenAI ingress -> LLMServer replicas behind PrefixAffinityRouter.

    serve run ray_configs/serve.yaml              # import_path: cluster.app:build_app
    radixserve serve --model tiny-llama            # the CLI calls build_application()

``build_app(args)`` takes the plain dict of a Serve config's ``args``; its keys
are the fields of ``ClusterConfig`` plus any ``radixserve.engine.entrypoints.llm.engine_config``
keyword (tensor_parallel_size, swap_space, block_size, ...).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from radixserve.cluster.ingress import OpenAIIngress
from radixserve.cluster.ray_launcher import replica_bundles
from radixserve.cluster.replica import LLMServer
from radixserve.cluster.request_router import PrefixAffinityRouter
from radixserve.cluster.routing_policy import POLICIES, RouterConfig
from radixserve.engine.entrypoints.llm import engine_config


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "tiny-llama"
    num_replicas: int = 1
    router: str = "prefix_affinity"
    api_keys: dict[str, str] | None = None  # API key -> tenant; None = open
    served_model_name: str | None = None
    max_ongoing_requests: int = 64  # per replica, before Serve queues at the router
    autoscaling: dict | None = None  # Serve autoscaling_config (then num_replicas is ignored)
    replica_cpus: float = 0.5  # CPU resources per bundle (replica and each TP worker)
    use_gpu: bool | None = None  # None: use GPUs when the node has them
    router_kwargs: dict = field(default_factory=dict)  # RouterConfig overrides
    engine: dict = field(default_factory=dict)  # engine_config keywords

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.router not in POLICIES:
            raise ValueError(f"router must be one of {', '.join(POLICIES)}, got {self.router!r}")
        engine_config(self.model, **self.engine)  # validate the engine flags now, not on a replica
        RouterConfig(policy=self.router, **self.router_kwargs)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ClusterConfig:
        """Split a flat dict into cluster fields and engine keywords; unknown keys are an error."""
        own = {f.name for f in fields(cls)}
        engine_keys = set(inspect.signature(engine_config).parameters) - {"model"}
        unknown = set(args) - own - engine_keys
        if unknown:
            raise ValueError(f"unknown serve arguments: {sorted(unknown)}")
        mine = {k: v for k, v in args.items() if k in own}
        engine = {**mine.pop("engine", {}), **{k: v for k, v in args.items() if k in engine_keys}}
        return cls(**mine, engine=engine)


def build_application(cfg: ClusterConfig):
    import torch
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    tp = cfg.engine.get("tensor_parallel_size", 1)
    engine_kwargs = {"model": cfg.model, **cfg.engine}
    router = RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"policy": cfg.router, "block_size": cfg.engine.get("block_size", 16),
                               "step_tokens": cfg.engine.get("max_num_batched_tokens", 2048),
                               **cfg.router_kwargs})
    options: dict[str, Any] = dict(
        name="LLMServer", max_ongoing_requests=cfg.max_ongoing_requests,
        request_router_config=router, health_check_period_s=5, health_check_timeout_s=30,
        placement_group_bundles=replica_bundles(tp, use_gpu, cfg.replica_cpus),
        placement_group_strategy="STRICT_PACK",
        # the replica lives in bundle 0; with TP=1 on a GPU it runs the model itself
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": 1 if use_gpu and tp == 1 else 0})
    if cfg.autoscaling:
        options["autoscaling_config"] = cfg.autoscaling
    else:
        options["num_replicas"] = cfg.num_replicas
    llm = serve.deployment(LLMServer).options(**options).bind(engine_kwargs)
    server = {"served_model_name": cfg.served_model_name, "api_keys": cfg.api_keys,
              "return_request_id_header": False}
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=1, ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=1000)
    lora_rank = engine_config(cfg.model, **cfg.engine).lora.max_lora_rank if cfg.engine.get("enable_lora") else None
    return ingress.bind(llm, cfg.model, cfg.engine.get("cache_dir"), server, lora_rank)


def build_app(args: dict[str, Any]):
    """Entry point for ``serve run``/``serve deploy`` configs (import_path cluster.app:build_app)."""
    return build_application(ClusterConfig.from_args(dict(args or {})))
