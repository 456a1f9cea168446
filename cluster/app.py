"""Build the Serve application: OpenAI ingress -> LLMServer replicas behind PrefixAffinityRouter.

    serve run ray_configs/serve.yaml              # import_path: radixserve.cluster.app:build_app
    radixserve serve --model tiny-llama            # the CLI calls build_application()

``build_app(args)`` takes the plain dict of a Serve config's ``args``; its keys
are the fields of ``ClusterConfig`` (cluster/config.py) plus any engine option
(tensor_parallel_size, swap_space, block_size, ...; see radixserve/engine/config.py).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from radixserve.cluster.config import ClusterConfig
from radixserve.cluster.ingress import OpenAIIngress
from radixserve.cluster.ray_launcher import replica_bundles
from radixserve.cluster.replica import LLMServer
from radixserve.cluster.request_router import PrefixAffinityRouter


def _user_options(cfg: ClusterConfig, ours: dict[str, Any]) -> dict[str, Any]:
    """deployment_config and runtime_env over our defaults; ray_actor_options merge key by key."""
    user = dict(cfg.deployment_config)
    actor = {**ours, **user.pop("ray_actor_options", {})}
    if cfg.runtime_env is not None:
        actor["runtime_env"] = {**actor.get("runtime_env", {}), **cfg.runtime_env}
    return {**user, "ray_actor_options": actor}


def build_application(cfg: ClusterConfig):
    import torch
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    engine = cfg.engine_config()
    tp = engine.parallel.tensor_parallel_size
    engine_kwargs = {"model": cfg.model, **cfg.engine}
    router = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                 request_router_kwargs=asdict(cfg.router_config()))
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
    options.update(_user_options(cfg, options["ray_actor_options"]))
    if "autoscaling_config" in options:
        options.pop("num_replicas", None)  # Serve takes one or the other
    llm = serve.deployment(LLMServer).options(**options).bind(engine_kwargs, stall_timeout_s=cfg.stall_timeout_s)
    server = {"served_model_name": cfg.served_model_name, "api_keys": cfg.api_keys,
              "allowed_origins": tuple(cfg.allowed_origins), "allowed_methods": tuple(cfg.allowed_methods),
              "allowed_headers": tuple(cfg.allowed_headers), "allow_credentials": cfg.allow_credentials,
              "tool_call_parser": cfg.tool_call_parser, "return_request_id_header": False, **cfg.server_limits()}
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=1, ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=1000)
    lora_rank = engine.lora.max_lora_rank if engine.lora.enable_lora else None
    return ingress.bind(llm, asdict(engine.model), server, lora_rank)


def build_app(args: dict[str, Any]):
    """Entry point for ``serve run``/``serve deploy`` configs (import_path radixserve.cluster.app:build_app)."""
    return build_application(ClusterConfig.from_args(dict(args or {})))
