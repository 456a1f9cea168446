"""One real Ray Serve deployment shared by the cluster tests (kept lean: 2 CPU cores).

App "radixserve" at /: 2 LLMServer replicas x TP=1 behind PrefixAffinityRouter,
configured from ray_configs/serve.yaml (with a test model cache, a small KV
pool and two API keys); app "radixserve-tp2" at /tp2: one TP=2 replica whose
workers are Ray actors in the replica's placement group.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.cluster.helpers import KEYS, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.hookimpl(tryfirst=True)  # before -m selects: `pytest -m "not cluster"` skips this folder
def pytest_collection_modifyitems(items) -> None:
    """Every test in this folder needs a real Ray cluster: mark it ``cluster``."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.cluster)


@dataclass
class Cluster:
    url: str
    tp2_url: str
    handle: object  # DeploymentHandle to the 2-replica LLMServer deployment
    model_dir: Path
    cache_dir: str
    lora_root: Path  # the deployment's allowed_lora_roots: runtime loads come from here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from radixserve.cluster.app import ClusterConfig, build_application
    from radixserve.cluster.serve_cli import kill_metadata_actor
    from radixserve.engine.model.default_models import resolve_model
    cache = str(tmp_path_factory.mktemp("cluster-models"))
    model_dir = resolve_model("tiny-llama", cache)
    lora_root = tmp_path_factory.mktemp("cluster-adapters")
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = yaml.safe_load((ROOT / "ray_configs" / "serve.yaml").read_text())["applications"][0]["args"]
    args.update(model="tiny-llama", cache_dir=cache, num_gpu_blocks=96, max_model_len=1024, api_keys=KEYS,
                engine_worker_queue_port=0, cache_queue_port=0, enable_lora=True, max_loras=2,
                allowed_lora_roots=[str(lora_root)])
    serve.run(build_application(ClusterConfig.from_args(args)), name="radixserve", route_prefix="/")
    tp2 = ClusterConfig(model="tiny-llama", num_replicas=1,
                        engine={"cache_dir": cache, "tensor_parallel_size": 2, "max_model_len": 1024,
                                "engine_worker_queue_port": 0, "cache_queue_port": 0})
    serve.run(build_application(tp2), name="radixserve-tp2", route_prefix="/tp2")
    handle = serve.get_deployment_handle("LLMServer", app_name="radixserve")
    yield Cluster(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/tp2", handle, model_dir, cache, lora_root)
    serve.shutdown()
    for app in ("radixserve", "radixserve-tp2"):
        kill_metadata_actor(app)
    ray.shutdown()
