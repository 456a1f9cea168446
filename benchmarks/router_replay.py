"""Router policies on the real cluster, replaying the Mooncake trace over HTTP.

Each trace request becomes a token-id prompt: one shared system-prompt block,
then one ``block_size``-token block per 512-token hash id (tokens drawn from a
generator seeded by the id, so equal ids give equal blocks and a shared id
prefix is a shared token prefix; ../shared/traces/README.md), capped to the
model's context; ``max_tokens`` 1 by default (the router is judged on prefill).

For every concurrency level (closed loop: that many clients, requests in trace
order) and every policy, interleaved, a fresh Serve app (cold caches) serves
the same requests. Measured per cell: cached-token rate (usage
prompt_tokens_details) against the one-cache oracle (one LRU cache with every
replica's blocks, fed the same requests in send order: router_sim's
BlockCache), requests and prompt tokens per replica (from /metrics), router
decisions by reason, TTFT p50/p99, requests/s.

    python -m radixserve.benchmarks.bench_router --trace [--requests N] [--concurrency 1,4,16] [--policies ...]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from radixserve.benchmarks.common import (
    command_line,
    grouped_bar_plot,
    median,
    percentile,
    print_summary,
    write_result,
)
from radixserve.benchmarks.router_sim import TRACE, BlockCache

POLICIES = ("prefix_affinity", "pow2", "round_robin", "consistent_hash")


@dataclass(frozen=True)
class TraceBenchConfig:
    model: str = "tiny-llama"
    replicas: int = 2
    policies: tuple[str, ...] = POLICIES
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 0        # first N trace requests (0: all)
    max_tokens: int = 1
    gpu_blocks: int = 512    # per replica
    max_model_len: int = 2048
    block_size: int = 16     # the engine's (one hash id -> one block)
    system_blocks: int = 1   # shared system prompt before every prompt
    trace: str = str(TRACE)

    def __post_init__(self) -> None:
        bad = set(self.policies) - set(POLICIES)
        if bad:
            raise ValueError(f"unknown policies {sorted(bad)}")
        if self.max_tokens < 1 or self.replicas < 1 or not self.concurrency:
            raise ValueError("max_tokens and replicas must be >= 1, concurrency non-empty")


@dataclass(frozen=True)
class TraceRequest:
    blocks: tuple[int, ...]  # block identities (system blocks negative, then the trace's hash ids)
    token_ids: list[int]


@dataclass
class Result:
    ttft: float = float("nan")
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    error: str = ""


def block_tokens(block: int, n: int, low: int, high: int) -> list[int]:
    rng = random.Random(f"block/{block}")
    return [rng.randrange(low, high) for _ in range(n)]


def trace_requests(cfg: TraceBenchConfig, low: int, high: int) -> list[TraceRequest]:
    rows = [json.loads(line) for line in Path(cfg.trace).read_text().splitlines() if line.strip()]
    rows = rows[:cfg.requests] if cfg.requests else rows
    cap = (cfg.max_model_len - cfg.max_tokens) // cfg.block_size  # blocks that fit the context
    out = []
    for row in rows:
        blocks = tuple([-1 - i for i in range(cfg.system_blocks)] + list(row["hash_ids"]))[:cap]
        ids = [t for b in blocks for t in block_tokens(b, cfg.block_size, low, high)]
        out.append(TraceRequest(blocks, ids))
    return out


def oracle_hit_rate(reqs: list[TraceRequest], order: list[int], capacity: int, bs: int) -> float:
    """One LRU cache of ``capacity`` blocks, the requests in the order they were sent; the
    last prompt token is always computed, so a prompt's last full block never hits."""
    cache = BlockCache(capacity)
    hit = total = 0
    for i in order:
        r = reqs[i]
        n = cache.hit(r.blocks, (len(r.token_ids) - 1) // bs)
        hit += n * bs
        total += len(r.token_ids)
        cache.admit(r.blocks, n, 0, pin=False)
    return hit / max(1, total)


async def send(client: httpx.AsyncClient, model: str, req: TraceRequest, max_tokens: int) -> Result:
    res = Result()
    body = {"model": model, "prompt": req.token_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            res.replica = resp.headers.get("x-radixserve-replica", "")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and res.ttft != res.ttft:  # first token: NaN check
                    res.ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens") or 0
    except Exception as exc:  # recorded, counted as an error
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def drive(url: str, cfg: TraceBenchConfig, reqs: list[TraceRequest], concurrency: int,
                label: str) -> tuple[list[Result], list[int], float]:
    results: list[Result] = [Result() for _ in reqs]
    sent: list[int] = []  # request indices in the order they were sent
    nxt = iter(range(len(reqs)))
    bar = tqdm(total=len(reqs), desc=label, leave=False)
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in nxt:
                sent.append(i)
                results[i] = await send(client, cfg.model, reqs[i], cfg.max_tokens)
                bar.update(1)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    bar.close()
    return results, sent, elapsed


_SAMPLE = re.compile(r'^radixserve:(\w+)\{([^}]*)\} (\S+)$')
_PER_REPLICA = ("num_requests_finished_total", "prompt_tokens_total", "prefix_cache_hits_tokens_total")


def scrape(text: str) -> dict[str, dict[str, float]]:
    """/metrics -> {replica: {metric: value}} for the per-replica counters we report,
    plus {"router": {"<reason>": decisions}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "router_decisions_total":
            d = out.setdefault("router", {})
            d[lab.get("reason", "")] = d.get(lab.get("reason", ""), 0.0) + float(value)
        elif name == "router_report_age_seconds" and "replica" in lab:
            out.setdefault("router_report_age_s", {})[lab["replica"]] = float(value)
        elif name in _PER_REPLICA and "replica" in lab:
            out.setdefault(lab["replica"], {})[name.removesuffix("_total")] = float(value)
    return out


def summarize(results: list[Result], sent: list[int], reqs: list[TraceRequest], elapsed: float,
              metrics: dict[str, dict[str, float]], cfg: TraceBenchConfig) -> dict:
    ok = [r for r in results if not r.error]
    per_replica = {k: v for k, v in metrics.items() if k not in ("router", "router_report_age_s")}
    counts = [v.get("num_requests_finished", 0.0) for v in per_replica.values()]
    counts += [0.0] * (cfg.replicas - len(counts))
    by_header: dict[str, int] = {}  # the x-radixserve-replica header: a cross-check of /metrics
    for r in ok:
        by_header[r.replica] = by_header.get(r.replica, 0) + 1
    hit = sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok))
    oracle = oracle_hit_rate(reqs, sent, cfg.gpu_blocks * cfg.replicas, cfg.block_size)
    ttft = [r.ttft for r in ok]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), ""),
            "hit_rate": hit, "oracle_hit_rate": oracle, "hit_over_oracle": hit / oracle if oracle else 0.0,
            "ttft_p50_s": median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "requests_per_s": len(ok) / elapsed, "elapsed_s": elapsed,
            "load_max_over_mean": max(counts) / (sum(counts) / len(counts)) if sum(counts) else 0.0,
            "per_replica": per_replica, "requests_by_header": by_header,
            "router_decisions": metrics.get("router", {}),
            "report_age_s": metrics.get("router_report_age_s", {})}


def run_cell(cfg: TraceBenchConfig, policy: str, concurrency: int, reqs: list[TraceRequest], port: int,
             cache_dir: str | None) -> dict:
    from ray import serve

    from radixserve.cluster.app import ClusterConfig, build_application
    from radixserve.cluster.serve_cli import kill_metadata_actor
    name = "bench-trace"
    app = build_application(ClusterConfig(
        model=cfg.model, num_replicas=cfg.replicas, router=policy,
        engine={"cache_dir": cache_dir, "num_gpu_blocks": cfg.gpu_blocks, "max_model_len": cfg.max_model_len,
                "block_size": cfg.block_size, "engine_worker_queue_port": 0, "cache_queue_port": 0}))
    serve.run(app, name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        results, sent, elapsed = asyncio.run(drive(url, cfg, reqs, concurrency, f"{policy} c={concurrency}"))
        time.sleep(1.0)  # let the replicas' last metrics reach the metadata actor
        metrics = scrape(httpx.get(f"{url}/metrics", timeout=60).text)
    finally:
        serve.delete(name)
        kill_metadata_actor(name)
    return summarize(results, sent, reqs, elapsed, metrics, cfg)


def plot(path: Path, cells: dict, cfg: TraceBenchConfig) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [f"c={c}" for c in cfg.concurrency]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, metric, label in zip(axes, ("hit_over_oracle", "load_max_over_mean", "ttft_p50_s", "ttft_p99_s"),
                                 ("cached tokens / oracle", "max/mean requests", "TTFT p50 (s)", "TTFT p99 (s)")):
        series = {p: [cells[str(c)][p][metric] for c in cfg.concurrency] for p in cfg.policies}
        grouped_bar_plot(ax, groups, series, label, label, legend=metric == "hit_over_oracle")
    fig.suptitle(f"Mooncake trace replay, {cfg.replicas} replicas, {cfg.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=0, help="first N trace requests (0: all)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--gpu-blocks", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--trace-file", default=str(TRACE), help="Mooncake-format JSONL trace")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--port", type=int, default=8078)
    args = p.parse_args(argv)
    cfg = TraceBenchConfig(model=args.model, replicas=args.replicas, policies=tuple(args.policies.split(",")),
                           concurrency=tuple(int(c) for c in args.concurrency.split(",")), requests=args.requests,
                           max_tokens=args.max_tokens, gpu_blocks=args.gpu_blocks,
                           max_model_len=args.max_model_len, trace=args.trace_file)
    import ray
    from ray import serve

    from radixserve.benchmarks.workloads import TokenSpace
    from radixserve.engine.model.default_models import resolve_model
    from radixserve.engine.tokenizer import Tokenizer
    space = TokenSpace.from_tokenizer(Tokenizer(resolve_model(cfg.model, args.cache_dir)))
    reqs = trace_requests(cfg, space.low, space.high)
    if ray.is_initialized():  # a caller's Ray: this benchmark needs its own 4-CPU local cluster
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="rsbt-")  # our own Ray session dir: nothing shared with other users
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve", logging_level="ERROR", _temp_dir=tmp)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    cells: dict[str, dict[str, dict]] = {}
    try:
        for c in cfg.concurrency:  # policies interleaved within each level
            for policy in cfg.policies:
                r = run_cell(cfg, policy, c, reqs, args.port, args.cache_dir)
                cells.setdefault(str(c), {})[policy] = r
                tqdm.write(f"c={c} {policy}: hit {r['hit_rate']:.3f} ({r['hit_over_oracle']:.2f}x oracle "
                           f"{r['oracle_hit_rate']:.3f}), max/mean {r['load_max_over_mean']:.2f}, ttft p50 "
                           f"{r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s, {r['requests_per_s']:.2f} req/s, "
                           f"errors {r['errors']}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, float] = {"errors": sum(r["errors"] for row in cells.values() for r in row.values())}
    for c, row in cells.items():
        ours = row.get("prefix_affinity")
        if not ours:
            continue
        summary[f"c{c}_affinity_hit_over_oracle"] = ours["hit_over_oracle"]
        summary[f"c{c}_affinity_load_max_over_mean"] = ours["load_max_over_mean"]
        if "pow2" in row:
            summary[f"c{c}_affinity_hit_over_pow2"] = ours["hit_rate"] / max(1e-9, row["pow2"]["hit_rate"])
            summary[f"c{c}_affinity_ttft_p50_over_pow2"] = ours["ttft_p50_s"] / row["pow2"]["ttft_p50_s"]
    suite = f"router-trace-{cfg.model}"
    path = write_result(suite, asdict(cfg), cells, summary, Path(args.out_dir) if args.out_dir else None,
                        command=command_line("radixserve.benchmarks.bench_router", ["--trace", *(argv or [])]))
    plot(path.with_suffix(".png"), cells, cfg)
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
