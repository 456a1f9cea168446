"""Engine metrics with Prometheus names, rendered as Prometheus text.

Kept dependency-free so the engine runs without prometheus_client; the
cluster adds a ``replica`` label when it merges every replica's text.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

PREFIX = "radixserve:"
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

    def render(self, labels: str) -> list[str]:
        name = PREFIX + self.name
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
}


class EngineMetrics:
    """Counters, gauges and histograms of one engine; thread-safe reads."""

    def __init__(self) -> None:
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
        """Prometheus text; ``labels`` like 'replica="r1"' is added to every sample."""
        lab = f"{{{labels}}}" if labels else ""
        lines = []
        with self._lock:
            for name, (kind, help_) in _SCALARS.items():
                full = PREFIX + name + ("_total" if kind == "counter" else "")
                lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}", f"{full}{lab} {self.values[name]}"]
            for h in self.histograms.values():
                lines += h.render(labels)
        return "\n".join(lines) + "\n"
