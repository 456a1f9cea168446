"""/metrics is valid Prometheus text, merged across replicas, with what vLLM dashboards read."""
from __future__ import annotations

import logging

from prometheus_client.parser import text_string_to_metric_families

from radixserve.cluster.metrics_merge import merge
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.core.metrics import VLLM_ALIASES, EngineMetrics, StatsLogger
from tests.cpu.openai_harness import MODEL

VLLM_FAMILIES = {"vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:kv_cache_usage_perc",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds",
                 "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:prompt_tokens", "vllm:generation_tokens"}


def families(text: str) -> dict:
    parsed = list(text_string_to_metric_families(text))
    names = [f.name for f in parsed]
    assert len(names) == len(set(names)), "a family appears twice"
    return {f.name: f for f in parsed}


def engine_text(hits: float, ttft: float) -> str:
    m = EngineMetrics("smollm2")
    m.inc("prefix_cache_queries_tokens", 100)
    m.inc("prefix_cache_hits_tokens", hits)
    m.inc("prefix_cache_gpu_hits_tokens", hits)
    m.observe("time_to_first_token_seconds", ttft)
    return m.render()


def test_merged_replicas_are_one_family_each():
    text = merge([('replica="a"', engine_text(30, 0.1)), ('replica="b"', engine_text(50, 2.0)),
                  ("", '# HELP radixserve:router_decisions_total d\n# TYPE radixserve:router_decisions_total '
                       'counter\nradixserve:router_decisions_total{router="r",replica="a",reason="affinity"} 3\n')])
    fams = families(text)
    assert VLLM_FAMILIES <= set(fams) and len(VLLM_ALIASES) == len(VLLM_FAMILIES) + 1  # + num_preemptions
    hits = {s.labels["replica"]: s.value for s in fams["vllm:prefix_cache_hits"].samples}
    assert hits == {"a": 30, "b": 50}
    assert all(s.labels["model_name"] == "smollm2" for s in fams["vllm:prefix_cache_hits"].samples)
    counts = [s for s in fams["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sorted(s.labels["replica"] for s in counts) == ["a", "b"]
    rates = {(s.labels["replica"], s.labels["tier"]): s.value for s in fams["radixserve:prefix_cache_hit_rate"].samples}
    assert rates[("a", "all")] == 0.3 and rates[("b", "gpu")] == 0.5 and rates[("b", "cpu")] == 0.0
    assert fams["radixserve:router_decisions"].samples[0].labels == {"router": "r", "replica": "a",
                                                                     "reason": "affinity"}


def test_http_metrics_parse(http, url):
    assert http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "metrics please",
                                                    "max_tokens": 2}).status_code == 200
    fams = families(http.get(f"{url}/metrics").text)
    assert VLLM_FAMILIES <= set(fams)
    queries = fams["vllm:prefix_cache_queries"].samples[0]
    assert queries.value > 0 and queries.labels["model_name"]


def test_periodic_stats_line(tiny_dir, caplog):
    llm = LLM(str(tiny_dir), log_stats_interval_s=0.001)
    prompt = list(range(5, 60))
    with caplog.at_level(logging.INFO, logger="radixserve.engine"):
        llm.generate([{"prompt_token_ids": prompt}] * 2, SamplingParams(max_tokens=4, ignore_eos=True))
    lines = [r.getMessage() for r in caplog.records if "Prefix cache hit rate" in r.getMessage()]
    assert lines and all("Avg generation throughput" in line and "KV cache usage" in line for line in lines)
    quiet = StatsLogger(EngineMetrics(), 0.0)
    assert quiet.maybe_log(now=1e9) is None  # 0 turns it off
