"""Per-request records and the summaries every suite reports.

All times are wall-clock seconds from ``time.perf_counter``, relative to the
start of a run. Definitions (the same for the engine, transformers and HTTP):

- TTFT: submit -> first output token received by the client (queueing included).
- TPOT: (last token - first token) / (output tokens - 1), per request.
- ITL: gaps between consecutive streamed token arrivals (all requests pooled).
- throughput: finished requests and output tokens / run duration, where the
  duration runs from the first submit to the last finish (the makespan).
- goodput: requests/s that met the SLO (TTFT <= ttft_s, and TPOT <= tpot_s when
  set); a failed request never meets it.
- hit rate: cached prompt tokens / prompt tokens. ``client`` counts what each
  response reported (``num_cached_tokens`` / ``usage...cached_tokens``); the
  tiers come from the engine's own counters (queries vs GPU / CPU hits).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from radixserve.benchmarks.common import percentile


@dataclass(frozen=True)
class RequestRecord:
    """What one request did, as the client saw it."""

    request_id: str
    session_id: str
    turn: int
    submit_s: float
    token_times_s: tuple[float, ...]  # arrival of each output token, same clock as submit_s
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    replica: str | None = None  # x-radixserve-replica over HTTP
    error: str | None = None
    server_request_id: str | None = None  # x-request-id over HTTP (the server's response id)

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_tokens > 0

    @property
    def ttft(self) -> float:
        return self.token_times_s[0] - self.submit_s if self.token_times_s else math.nan

    @property
    def e2e(self) -> float:
        return self.finish_s - self.submit_s

    @property
    def tpot(self) -> float:
        if self.output_tokens < 2 or len(self.token_times_s) < 2:
            return math.nan
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def to_json(self) -> dict:
        # Token times relative to submit, rounded to microseconds: the raw data, kept compact.
        return {"id": self.request_id, "session": self.session_id, "turn": self.turn,
                "submit_s": round(self.submit_s, 6), "finish_s": round(self.finish_s, 6),
                "token_times_s": [round(t - self.submit_s, 6) for t in self.token_times_s],
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "cached_tokens": self.cached_tokens, "replica": self.replica, "error": self.error}


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        if not self.ttft_s > 0 or (self.tpot_s is not None and not self.tpot_s > 0):
            raise ValueError(f"SLO bounds must be > 0 seconds, got ttft {self.ttft_s}, tpot {self.tpot_s}")

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or not r.ttft <= self.ttft_s:
            return False
        return self.tpot_s is None or r.output_tokens < 2 or r.tpot <= self.tpot_s


@dataclass(frozen=True)
class TierHits:
    """Engine counter deltas over a run: prompt tokens looked up and hits per tier."""

    queries_tokens: float = 0.0
    gpu_hits_tokens: float = 0.0
    cpu_hits_tokens: float = 0.0

    @classmethod
    def between(cls, before: Mapping[str, float], after: Mapping[str, float]) -> TierHits:
        d = {k: after.get(f"prefix_cache_{k}", 0.0) - before.get(f"prefix_cache_{k}", 0.0)
             for k in ("queries_tokens", "gpu_hits_tokens", "cpu_hits_tokens")}
        return cls(**d)

    def rate(self, hits: float) -> float:
        return hits / self.queries_tokens if self.queries_tokens else math.nan


@dataclass(frozen=True)
class RunSummary:
    requests: int
    failed: int
    duration_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    itl_p50: float
    itl_p99: float
    e2e_p50: float
    requests_per_s: float
    output_tok_per_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    hit_rate_client: float
    hit_rate_gpu: float
    hit_rate_cpu: float
    slo_ttft_s: float
    slo_tpot_s: float | None
    slo_attainment: float
    goodput_req_per_s: float
    replicas: dict[str, int] = field(default_factory=dict)


def duration(records: Sequence[RequestRecord]) -> float:
    if not records:
        return math.nan
    return max(r.finish_s for r in records) - min(r.submit_s for r in records)


def goodput(records: Sequence[RequestRecord], slo: Slo, seconds: float | None = None) -> float:
    """Requests per second that met the SLO."""
    seconds = duration(records) if seconds is None else seconds
    met = sum(slo.met(r) for r in records)
    return met / seconds if seconds and seconds > 0 else math.nan


def summarize(records: Sequence[RequestRecord], slo: Slo, tiers: TierHits | None = None) -> RunSummary:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if not math.isnan(r.tpot)]
    itl = [g for r in ok for g in r.itl]
    secs = duration(records)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    replicas: dict[str, int] = {}
    for r in records:
        if r.replica is not None:
            replicas[r.replica] = replicas.get(r.replica, 0) + 1
    tiers = tiers or TierHits()
    return RunSummary(
        requests=len(records), failed=len(records) - len(ok), duration_s=secs,
        ttft_p50=percentile(ttft, 0.5), ttft_p90=percentile(ttft, 0.9), ttft_p99=percentile(ttft, 0.99),
        tpot_p50=percentile(tpot, 0.5), tpot_p90=percentile(tpot, 0.9),
        itl_p50=percentile(itl, 0.5), itl_p99=percentile(itl, 0.99), e2e_p50=percentile([r.e2e for r in ok], 0.5),
        requests_per_s=len(ok) / secs if secs else math.nan,
        output_tok_per_s=out_tokens / secs if secs else math.nan,
        prompt_tokens=prompt, output_tokens=out_tokens, cached_tokens=cached,
        hit_rate_client=cached / prompt if prompt else math.nan,
        hit_rate_gpu=tiers.rate(tiers.gpu_hits_tokens), hit_rate_cpu=tiers.rate(tiers.cpu_hits_tokens),
        slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s,
        slo_attainment=sum(slo.met(r) for r in records) / len(records) if records else math.nan,
        goodput_req_per_s=goodput(records, slo, secs), replicas=replicas)


# -- runs side by side ------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One workload through one variant (engine config, baseline or endpoint) in one round."""

    round: int
    workload: str
    variant: str
    summary: RunSummary
    records: Sequence[RequestRecord] = ()
    tiers: TierHits = TierHits()
    counters: Mapping[str, float] = field(default_factory=dict)  # engine counter deltas (preemptions, swaps)
    settings: Mapping[str, object] | None = None  # what this variant ran with (engine kwargs, base URL)
    load_average_before: Sequence[float] = ()
    load_average_after: Sequence[float] = ()

    def to_json(self) -> dict:
        return {"round": self.round, "workload": self.workload, "variant": self.variant,
                "settings": dict(self.settings) if self.settings is not None else None,
                "load_average_before": list(self.load_average_before),
                "load_average_after": list(self.load_average_after),
                "summary": asdict(self.summary), "tiers": asdict(self.tiers), "engine_counters": dict(self.counters),
                "records": [r.to_json() for r in self.records]}


AGG_FIELDS = ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "itl_p50", "itl_p99", "e2e_p50",
              "requests_per_s", "output_tok_per_s", "goodput_req_per_s", "slo_attainment", "hit_rate_client",
              "hit_rate_gpu", "hit_rate_cpu", "duration_s")


def median_finite(xs: Sequence[float | None]) -> float:
    kept = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(kept) if kept else math.nan


def aggregate(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> variant -> summary field -> median over rounds."""
    grouped: dict[str, dict[str, list[RunSummary]]] = {}
    for r in runs:
        grouped.setdefault(r.workload, {}).setdefault(r.variant, []).append(r.summary)
    return {w: {v: {f: median_finite([getattr(s, f) for s in ss]) for f in AGG_FIELDS} for v, ss in vs.items()}
            for w, vs in grouped.items()}


def round_ratios(runs: Sequence[Run], reference: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """workload -> variant -> ratio -> one value per round, each taken within its round.

    ttft_*_speedup = variant TTFT / reference TTFT; throughput_gain = reference
    output tok/s / variant's. Above 1: the reference is better.
    """
    by = {(r.round, r.workload, r.variant): r.summary for r in runs}
    out: dict = {}
    for (rnd, w, v), s in sorted(by.items()):
        ref = by.get((rnd, w, reference))
        if v == reference or ref is None:
            continue
        d = out.setdefault(w, {}).setdefault(v, {"ttft_p50_speedup": [], "ttft_p99_speedup": [],
                                                  "throughput_gain": []})
        d["ttft_p50_speedup"].append(_div(s.ttft_p50, ref.ttft_p50))
        d["ttft_p99_speedup"].append(_div(s.ttft_p99, ref.ttft_p99))
        d["throughput_gain"].append(_div(ref.output_tok_per_s, s.output_tok_per_s))
    return out


def _div(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def headline(ratios: Mapping, agg: Mapping, reference: str) -> dict[str, float]:
    """A suite's summary: per workload, median ratios of the reference vs each variant, and its hit rate."""
    s: dict[str, float] = {}
    for w, vs in ratios.items():
        for v, d in vs.items():
            for k, values in d.items():
                s[f"{w}/{k}_vs_{v}"] = median_finite(values)
    for w, vs in agg.items():
        if reference in vs:
            s[f"{w}/hit_rate_{reference}"] = vs[reference]["hit_rate_client"]
    return s
