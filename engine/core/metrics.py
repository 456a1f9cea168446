"""Engine metrics with Prometheus names, rendered as Prometheus text.

Kept dependency-free so the engine runs without prometheus_client; the
cluster adds a ``replica`` label when it merges every replica's text
(cluster/metrics_merge.py). Every sample carries ``model_name``, as vLLM's do,
and the families dashboards built for vLLM read are also rendered under their
``vllm:`` names (:data:`VLLM_ALIASES`), so those dashboards work unchanged.
:class:`StatsLogger` writes vLLM's periodic one-line summary.
"""
from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from dataclasses import dataclass, field

PREFIX = "radixserve:"
VLLM_PREFIX = "vllm:"
# radixserve name -> vLLM name, for the families vLLM's Grafana dashboard and tools read.
VLLM_ALIASES = {
    "prefix_cache_queries_tokens": "prefix_cache_queries",
    "prefix_cache_hits_tokens": "prefix_cache_hits",
    "kv_cache_usage_perc": "kv_cache_usage_perc",
    "num_requests_running": "num_requests_running",
    "num_requests_waiting": "num_requests_waiting",
    "num_preemptions": "num_preemptions",
    "prompt_tokens": "prompt_tokens",
    "generation_tokens": "generation_tokens",
    "time_to_first_token_seconds": "time_to_first_token_seconds",
    "time_per_output_token_seconds": "time_per_output_token_seconds",
    "e2e_request_latency_seconds": "e2e_request_latency_seconds",
}
_TIERS = {"all": "prefix_cache_hits_tokens", "gpu": "prefix_cache_gpu_hits_tokens",
          "cpu": "prefix_cache_cpu_hits_tokens", "remote": "prefix_cache_remote_hits_tokens"}
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_STEP_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding quantile q (coarse; for dashboards and tests)."""
        if not self.count:
            return math.nan
        rank, seen = q * self.count, 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            seen += n
            if seen >= rank:
                return bound
        return math.inf

    def render(self, labels: str, prefix: str = PREFIX, name: str | None = None) -> list[str]:
        name = prefix + (name or self.name)
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        cum = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            cum += n
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{name}_bucket{{{labels + "," if labels else ""}le="{le}"}} {cum}')
        lab = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{lab} {self.total}", f"{name}_count{lab} {self.count}"]
        return lines


# name -> (type, help) for the scalar metrics; values live in EngineMetrics.values
_SCALARS = {
    "prefix_cache_queries_tokens": ("counter", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hits_tokens": ("counter", "Prompt tokens served from the prefix cache (all tiers)"),
    "prefix_cache_gpu_hits_tokens": ("counter", "Prompt tokens served from the device tier"),
    "prefix_cache_cpu_hits_tokens": ("counter", "Prompt tokens served from the CPU tier"),
    "prefix_cache_remote_hits_tokens": ("counter", "Prompt tokens pulled from a peer replica's cache"),
    "peer_pulls_ok": ("counter", "Peer KV pulls that brought at least one block"),
    "peer_pulls_failed": ("counter", "Peer KV pulls that fell back to recompute"),
    "peer_import_bytes": ("counter", "Bytes of peer KV written into the device pool, all ranks"),
    "peer_export_blocks": ("counter", "KV blocks exported to peer replicas"),
    "prompt_tokens": ("counter", "Prompt tokens of finished requests"),
    "generation_tokens": ("counter", "Generated tokens"),
    "num_requests_finished": ("counter", "Requests finished (any reason)"),
    "num_requests_aborted": ("counter", "Requests aborted by the client"),
    "num_requests_failed": ("counter", "Requests failed by an engine error"),
    "num_preemptions": ("counter", "Sequences preempted"),
    "num_preemptions_swap": ("counter", "Preemptions whose blocks may move to the CPU tier (preemption_mode swap)"),
    "num_preemptions_recompute": ("counter", "Preemptions whose blocks stay device-only (preemption_mode recompute)"),
    "swap_in_blocks": ("counter", "KV blocks copied CPU tier -> device"),
    "swap_out_blocks": ("counter", "KV blocks copied device -> CPU tier"),
    "swap_in_bytes": ("counter", "Bytes copied CPU tier -> device, all ranks"),
    "swap_out_bytes": ("counter", "Bytes copied device -> CPU tier, all ranks"),
    "num_requests_running": ("gauge", "Requests with a sequence in the running batch"),
    "num_requests_waiting": ("gauge", "Requests waiting to be scheduled"),
    "kv_cache_usage_perc": ("gauge", "Fraction of device KV blocks referenced by live sequences"),
    "cpu_cache_usage_perc": ("gauge", "Fraction of CPU-tier KV blocks in use"),
    "num_cached_blocks": ("gauge", "Blocks held by the radix prefix tree"),
    "lora_slot_loads": ("counter", "LoRA adapters loaded into a device slot"),
    "lora_slot_evictions": ("counter", "Idle LoRA adapters evicted from a device slot (LRU)"),
    "num_loras_loaded": ("gauge", "LoRA adapters registered (accepting requests)"),
    "num_loras_resident": ("gauge", "LoRA adapters resident in device slots"),
    "grammar_compiles": ("counter", "Structured-output grammars compiled"),
    "grammar_cache_hits": ("counter", "Structured-output requests whose grammar was already compiled (or compiling)"),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class EngineMetrics:
    """Counters, gauges and histograms of one engine; thread-safe reads."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.values: dict[str, float] = {k: 0.0 for k in _SCALARS}
        self.histograms = {h.name: h for h in (
            Histogram("time_to_first_token_seconds", "Time to first token", _TTFT_BUCKETS),
            Histogram("time_per_output_token_seconds", "Time per output token after the first", _TPOT_BUCKETS),
            Histogram("e2e_request_latency_seconds", "Arrival to finish", _TTFT_BUCKETS),
            Histogram("step_seconds", "Wall time of one engine step", _STEP_BUCKETS),
            Histogram("cache_transfer_seconds", "Time of one cache-queue transfer (slowest rank)",
                      _STEP_BUCKETS),
        )}

    def inc(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self.values[name] += amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.values[name] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)

    def render(self, labels: str = "") -> str:
        """Prometheus text; ``labels`` like 'replica="r1"' is added to every sample, after model_name."""
        labels = ",".join(x for x in (f'model_name="{_escape(self.model_name)}"' if self.model_name else "",
                                      labels) if x)
        lab = f"{{{labels}}}" if labels else ""
        lines = []
        with self._lock:
            for prefix, names in ((PREFIX, {n: n for n in _SCALARS}), (VLLM_PREFIX, VLLM_ALIASES)):
                for ours, theirs in names.items():
                    if ours not in _SCALARS:
                        continue
                    kind, help_ = _SCALARS[ours]
                    full = prefix + theirs + ("_total" if kind == "counter" else "")
                    lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}", f"{full}{lab} {self.values[ours]}"]
                for h in self.histograms.values():
                    if prefix == PREFIX or h.name in VLLM_ALIASES:
                        lines += h.render(labels, prefix, names.get(h.name, h.name))
            lines += self._hit_rates(labels)
        return "\n".join(lines) + "\n"

    def _hit_rates(self, labels: str) -> list[str]:
        name = PREFIX + "prefix_cache_hit_rate"
        queries = self.values["prefix_cache_queries_tokens"]
        lines = [f"# HELP {name} Prompt tokens served from the prefix cache / looked up, since start, per tier",
                 f"# TYPE {name} gauge"]
        for tier, key in _TIERS.items():
            rate = self.values[key] / queries if queries else 0.0
            lines.append(f'{name}{{{labels + "," if labels else ""}tier="{tier}"}} {rate}')
        return lines


class StatsLogger:
    """vLLM's periodic one-line engine summary (throughput, queue, KV usage, hit rates).

    ``maybe_log`` is called once per engine step; it logs at most every ``interval_s``
    (0 disables it), with throughputs averaged over the interval.
    """

    def __init__(self, metrics: EngineMetrics, interval_s: float, logger: logging.Logger | None = None):
        self.metrics, self.interval_s = metrics, interval_s
        self.log = logger or logging.getLogger("radixserve.engine")
        self._last_t = time.monotonic()
        self._last = metrics.snapshot()

    def maybe_log(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if self.interval_s <= 0 or now - self._last_t < self.interval_s:
            return None
        cur, dt = self.metrics.snapshot(), now - self._last_t
        d = {k: cur[k] - self._last[k] for k in cur}
        q = d["prefix_cache_queries_tokens"]

        def pct(key: str) -> float:
            return 100.0 * d[key] / q if q else 0.0

        line = (f"Avg prompt throughput: {d['prompt_tokens'] / dt:.1f} tokens/s, "
                f"Avg generation throughput: {d['generation_tokens'] / dt:.1f} tokens/s, "
                f"Running: {cur['num_requests_running']:.0f} reqs, Waiting: {cur['num_requests_waiting']:.0f} reqs, "
                f"KV cache usage: {100 * cur['kv_cache_usage_perc']:.1f}%, "
                f"Prefix cache hit rate: {pct('prefix_cache_hits_tokens'):.1f}% "
                f"(GPU {pct('prefix_cache_gpu_hits_tokens'):.1f}%, CPU {pct('prefix_cache_cpu_hits_tokens'):.1f}%, "
                f"peer {pct('prefix_cache_remote_hits_tokens'):.1f}%)")
        self._last_t, self._last = now, cur
        self.log.info(line)
        return line
