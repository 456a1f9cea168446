"""One source of configuration: the frozen dataclasses in engine/config.py.

The flat keywords of LLM(...)/engine_config(...), the CLI's engine flags, the
Serve config's args and the router's block size / step budget are all derived
from them; these tests fail when a second copy of a default or a name appears.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from radixserve.cli import build_parser, engine_kwargs
from radixserve.cluster.config import ClusterConfig
from radixserve.cluster.routing_policy import ReplicaState, RouterConfig, RoutingPolicy
from radixserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig, engine_flags
from radixserve.engine.entrypoints.llm import engine_config

ROOT = Path(__file__).resolve().parents[2]

# A valid non-default value per engine option (the test needs one for every option: a new
# field fails test_every_option_has_a_test_value until it is added here).
OTHER = {
    "model": "small-llama", "dtype": "float32", "max_model_len": 100, "seed": 7, "cache_dir": "/tmp/models",
    "tokenizer": "tiny-llama", "revision": "v1", "chat_template": "{{ messages }}", "generation_config": "vllm",
    "cpu_linear": "dense",
    "block_size": 8, "enable_prefix_caching": False, "num_gpu_blocks": 10, "gpu_memory_utilization": 0.5,
    "kv_cache_gib": 1.5, "swap_space": 2.0, "num_cpu_blocks": 5, "max_concurrent_pulls": 2, "peer_pull_timeout_s": 3.0,
    "peer_kv": False,
    "max_num_seqs": 3, "max_num_batched_tokens": 512, "enable_chunked_prefill": False,
    "preemption_mode": "recompute", "schedule_policy": "sjf", "prefill_step_tokens": 64, "max_wait_s": 1.0,
    "tensor_parallel_size": 2, "engine_worker_queue_port": 0, "cache_queue_port": 0, "worker_host": "0.0.0.0",
    "worker_timeout_s": 5.0,
    "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 8, "lora_modules": ("a=/p/a",),
    "grammar_compile_threads": 1, "grammar_cache_size": 8,
    "device": "cpu", "attention_backend": "torch", "log_stats_interval_s": 0.0,
}
NEEDS = {"lora_modules": {"enable_lora": True}}  # options only valid together with another one


def leaves(cfg: EngineConfig) -> dict[str, object]:
    """EngineConfig flattened to {field name: value} over its sections."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def test_every_option_has_a_test_value():
    assert set(OTHER) == set(engine_flags())


def declared_defaults() -> dict[str, object]:
    """Every leaf field of EngineConfig and its default, read straight off the dataclasses."""
    out: dict[str, object] = {}
    cfg = EngineConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({g.name: g.default for g in dataclasses.fields(value)})
        else:
            out[f.name] = f.default
    return out


def test_options_are_the_dataclass_fields_with_their_defaults():
    assert {name: flag.default for name, flag in engine_flags().items()} == declared_defaults()
    assert all(flag.help for flag in engine_flags().values())
    assert leaves(engine_config()) == declared_defaults()
    assert engine_config() == EngineConfig()


@pytest.mark.parametrize("name", sorted(OTHER))
def test_each_keyword_sets_exactly_its_own_field(name):
    base = leaves(EngineConfig())
    got = leaves(engine_config(**{name: OTHER[name], **NEEDS.get(name, {})}))
    changed = {k for k in base if got[k] != base[k]}
    assert changed == {name, *NEEDS.get(name, {})}


def test_config_dataclasses_are_frozen_and_keyword_only():
    for cls in (EngineConfig, CacheConfig, SchedulerConfig, RouterConfig, ClusterConfig):
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen, cls
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls
    with pytest.raises(TypeError):
        CacheConfig(16)  # type: ignore[misc]
    with pytest.raises(TypeError, match="bogus"):
        engine_config(bogus=1)


def cli_argv(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag, str(value).lower()]
    if isinstance(value, tuple):
        return [flag, *value]
    return [flag, str(value)]


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_cli_flags_default_to_the_fields(command):
    args = build_parser().parse_args([command])
    for name, flag in engine_flags().items():
        assert getattr(args, name) == flag.default, name
    assert engine_config(args.model, **engine_kwargs(args)) == EngineConfig()


@pytest.mark.parametrize("name", sorted(OTHER))
def test_cli_flag_parses_to_the_same_config_as_the_keyword(name):
    extra = NEEDS.get(name, {})
    argv = ["generate", *cli_argv(name, OTHER[name])]
    for k, v in extra.items():
        argv += cli_argv(k, v)
    args = build_parser().parse_args(argv)
    assert engine_config(args.model, **engine_kwargs(args)) == engine_config(**{name: OTHER[name], **extra})


def serve_yaml_args() -> tuple[dict, set[str]]:
    """serve.yaml's app args, and the keys of its commented-out examples (``# key: value``)."""
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "ray_configs" / "serve.yaml").read_text()
    args = yaml.safe_load(text)["applications"][0]["args"]
    block = text.split("    args:\n", 1)[1]
    examples = set(re.findall(r"^\s+#\s*([a-z_]+):\s*\S", block, flags=re.M))
    return args, examples


def test_serve_yaml_keys_are_all_accepted():
    args, examples = serve_yaml_args()
    cfg = ClusterConfig.from_args(args)
    assert cfg.model == args["model"]
    known = {f.name for f in dataclasses.fields(ClusterConfig)} | (set(engine_flags()) - {"model"})
    assert examples and examples <= known, sorted(examples - known)
    with pytest.raises(ValueError, match="unknown serve arguments"):
        ClusterConfig.from_args({**args, "blok_size": 8})


def test_cluster_defaults_come_from_the_engine():
    assert ClusterConfig().model == EngineConfig().model.model
    assert ClusterConfig().engine_config() == EngineConfig()


def test_router_block_size_and_step_budget_are_the_engines():
    default = ClusterConfig().router_config()
    assert default.block_size == CacheConfig().block_size
    assert default.step_tokens == SchedulerConfig().max_num_batched_tokens
    cfg = ClusterConfig.from_args({"block_size": 8, "max_num_batched_tokens": 512, "router_kwargs": {"load_epsilon": 1}})
    router = cfg.router_config()
    assert (router.block_size, router.step_tokens, router.load_epsilon) == (8, 512, 1)
    # the policy counts a hit in the engine's blocks: 2 cached blocks of 8 tokens
    state = ReplicaState("r", gpu_hit=2, cpu_hit=0, inflight=0, queued_tokens=0)
    assert RoutingPolicy(router).cost(100, state) == 100 - 2 * 8
    with pytest.raises(ValueError, match="engine config"):
        ClusterConfig(router_kwargs={"block_size": 32})  # a second, disagreeing block size


def test_deployed_router_gets_the_engines_block_size():
    pytest.importorskip("ray")
    from radixserve.cluster.app import build_application
    app = build_application(ClusterConfig(engine={"block_size": 8, "max_num_batched_tokens": 512}))
    llm = app._bound_deployment.init_args[0]  # the ingress is bound to the LLMServer deployment
    kwargs = llm._bound_deployment._deployment_config.request_router_config.request_router_kwargs
    assert RouterConfig(**kwargs) == RouterConfig.for_engine(engine_config(block_size=8, max_num_batched_tokens=512))
    assert (kwargs["block_size"], kwargs["step_tokens"]) == (8, 512)


def test_ray_serve_deployment_options_as_ray_serve_llm_users_write_them():
    pytest.importorskip("ray")
    from radixserve.cluster.app import build_application
    cfg = ClusterConfig(num_replicas="auto", runtime_env={"env_vars": {"A": "1"}},
                        deployment_config={"ray_actor_options": {"memory": 10**9}, "max_ongoing_requests": 7})
    llm = build_application(cfg)._bound_deployment.init_args[0]._bound_deployment
    dc = llm._deployment_config
    assert dc.autoscaling_config is not None and dc.max_ongoing_requests == 7  # "auto": Serve's autoscaling
    assert llm.ray_actor_options["memory"] == 10**9 and llm.ray_actor_options["num_cpus"] == 0.5
    assert llm.ray_actor_options["runtime_env"] == {"env_vars": {"A": "1"}}
    scaled = ClusterConfig(deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    dc = build_application(scaled)._bound_deployment.init_args[0]._bound_deployment._deployment_config
    assert (dc.autoscaling_config.min_replicas, dc.autoscaling_config.max_replicas) == (1, 3)
    with pytest.raises(ValueError, match="'auto'"):
        ClusterConfig(num_replicas="many")
    with pytest.raises(ValueError, match="placement_group_bundles"):
        ClusterConfig(deployment_config={"placement_group_bundles": [{"CPU": 1}]})
    args = ClusterConfig.from_args({"num_replicas": "auto", "deployment_config": {"max_ongoing_requests": 3}})
    assert args.num_replicas == "auto" and args.deployment_config == {"max_ongoing_requests": 3}
