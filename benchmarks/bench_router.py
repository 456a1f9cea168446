"""Router policies on a real 2-replica cluster: multi-tenant multi-turn chat over HTTP.

For each policy (prefix_affinity, pow2, consistent_hash) the same Serve app is
deployed with that router; ``users`` concurrent users run the same sessions
(tenant API key, one of the tenant's system prompts, 4-8 turns whose
prompts carry the answers actually generated -- greedy, so every policy sees
the same conversation). Measured per policy: cluster-wide prefix hit rate
(cached / prompt tokens, from usage.prompt_tokens_details), TTFT p50/p99,
request throughput, and load balance (max/mean requests per replica). The
oracle is one unbounded radix cache replaying the same requests in the order
they were sent: the hit rate no placement of requests could beat.

    python -m radixserve.benchmarks.bench_router            # tiny-llama, a few minutes on 2 CPU cores
    python -m radixserve.benchmarks.bench_router --quick

``--trace`` instead replays the Mooncake synthetic trace (../shared/traces) over HTTP,
policies side by side (prefix_affinity, pow2, round_robin, consistent_hash) at each
``--concurrency`` (closed loop, requests in trace order): see router_replay.py.

    python -m radixserve.benchmarks.bench_router --trace                     # the whole trace: hours on CPU
    python -m radixserve.benchmarks.bench_router --trace --requests 40 --concurrency 1,4 --policies prefix_affinity,pow2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from radixserve.benchmarks.common import bar_plot, command_line, median, percentile, print_summary, write_result
from radixserve.engine.cache.hashing import prompt_block_hashes, request_namespace
from radixserve.engine.model.default_models import resolve_model
from radixserve.engine.tokenizer import Tokenizer

WORDS = ("cache", "replica", "tenant", "block", "prefix", "router", "latency", "token", "policy", "memory",
         "request", "stream", "model", "answer", "system", "review", "contract", "invoice", "travel", "menu")


@dataclass(frozen=True)
class RouterBenchConfig:
    model: str = "tiny-llama"
    replicas: int = 2
    policies: tuple[str, ...] = ("prefix_affinity", "pow2", "consistent_hash")
    tenants: int = 4
    system_prompts: int = 16  # spread over the tenants
    system_words: int = 220
    sessions: int = 48
    min_turns: int = 4
    max_turns: int = 8
    user_words: int = 12
    output_tokens: int = 12
    users: int = 8  # concurrent sessions (closed loop)
    gpu_blocks: int = 512  # per replica
    seed: int = 0

    def __post_init__(self) -> None:
        if self.system_prompts < self.tenants:
            raise ValueError("need at least one system prompt per tenant")


QUICK = RouterBenchConfig(system_prompts=4, tenants=2, system_words=60, sessions=6, min_turns=2, max_turns=3,
                          users=3, policies=("prefix_affinity", "pow2"))


@dataclass
class Turn:
    session: int
    tenant: str
    messages: list[dict]
    start: float = 0.0
    ttft: float = float("nan")
    e2e: float = float("nan")
    prompt_tokens: int = 0
    cached_tokens: int = 0
    out_tokens: int = 0
    replica: str = ""
    answer: str = ""
    error: str = ""


@dataclass
class Session:
    idx: int
    tenant: str
    system: str
    questions: list[str] = field(default_factory=list)


def make_sessions(cfg: RouterBenchConfig) -> list[Session]:
    rng = random.Random(cfg.seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    systems = [f"You are assistant {i} of tenant {i % cfg.tenants}. " + words(cfg.system_words)
               for i in range(cfg.system_prompts)]
    out = []
    for s in range(cfg.sessions):
        sp = rng.randrange(cfg.system_prompts)
        turns = rng.randint(cfg.min_turns, cfg.max_turns)
        out.append(Session(s, f"tenant-{sp % cfg.tenants}", systems[sp],
                           [f"Question {t} of session {s}: " + words(cfg.user_words) for t in range(turns)]))
    return out


async def run_session(client: httpx.AsyncClient, sess: Session, cfg: RouterBenchConfig, t0: float,
                      turns: list[Turn]) -> None:
    messages = [{"role": "system", "content": sess.system}]
    for q in sess.questions:
        messages = messages + [{"role": "user", "content": q}]
        turn = Turn(sess.idx, sess.tenant, list(messages), start=time.perf_counter() - t0)
        turns.append(turn)
        body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.output_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer key-{sess.tenant}"}) as resp:
                turn.replica = resp.headers.get("x-radixserve-replica", "")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None:
                        if turn.ttft != turn.ttft:  # first content: NaN check
                            turn.ttft = time.perf_counter() - start
                        turn.answer += chunk["choices"][0]["delta"]["content"]
                    if chunk.get("usage"):
                        turn.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        turn.cached_tokens = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                        turn.out_tokens = chunk["usage"]["completion_tokens"]
        except Exception as exc:  # recorded, counted as an error
            turn.error = f"{type(exc).__name__}: {exc}"
        turn.e2e = time.perf_counter() - start
        messages = messages + [{"role": "assistant", "content": turn.answer}]


async def drive(url: str, sessions: list[Session], cfg: RouterBenchConfig) -> tuple[list[Turn], float]:
    turns: list[Turn] = []
    queue = list(sessions)
    bar = tqdm(total=len(sessions), desc="sessions", leave=False)
    limits = httpx.Limits(max_connections=cfg.users * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def user():
            while queue:
                await run_session(client, queue.pop(0), cfg, t0, turns)
                bar.update(1)
        await asyncio.gather(*(user() for _ in range(cfg.users)))
        elapsed = time.perf_counter() - t0
    bar.close()
    return turns, elapsed


def oracle_hit_rate(turns: list[Turn], tok: Tokenizer, llm, block_size: int) -> float:
    """One unbounded prefix cache replaying the requests in the order they were
    sent: each prompt hits the longest cached chain (its last token always
    recomputed), then caches what the engine caches -- the full blocks of the
    prompt plus the generated tokens except the last. The generated tokens are
    recomputed offline (greedy, same weights), since the API returns text."""
    from radixserve.engine import SamplingParams
    order = sorted((t for t in turns if not t.error), key=lambda t: t.start)
    prompts = [tok.encode_chat(t.messages) for t in order]
    gen = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       [SamplingParams(temperature=0, max_tokens=t.out_tokens, ignore_eos=True) for t in order])
    seen: set[int] = set()
    hit = total = 0
    for t, ids, out in zip(order, prompts, gen):
        ns = request_namespace(t.tenant, None)
        n = 0
        for h in prompt_block_hashes(ids, block_size, ns)[:(len(ids) - 1) // block_size]:
            if h not in seen:
                break
            n += 1
        hit += n * block_size
        total += len(ids)
        computed = ids + out.outputs[0].token_ids[:-1]
        seen.update(prompt_block_hashes(computed, block_size, ns))
    return hit / total if total else 0.0


def summarize(turns: list[Turn], elapsed: float, replicas: int) -> dict:
    ok = [t for t in turns if not t.error]
    per_replica: dict[str, int] = {}
    for t in ok:
        per_replica[t.replica] = per_replica.get(t.replica, 0) + 1
    counts = list(per_replica.values()) + [0] * (replicas - len(per_replica))
    ttft = [t.ttft for t in ok]
    return {"requests": len(turns), "errors": len(turns) - len(ok),
            "hit_rate": sum(t.cached_tokens for t in ok) / max(1, sum(t.prompt_tokens for t in ok)),
            "ttft_p50_s": median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "requests_per_s": len(ok) / elapsed, "elapsed_s": elapsed, "per_replica": per_replica,
            "load_max_over_mean": max(counts) / (sum(counts) / len(counts)) if counts and sum(counts) else 0.0}


def run_policy(cfg: RouterBenchConfig, policy: str, cache_dir: str | None, port: int,
               sessions: list[Session]) -> tuple[dict, list[Turn]]:
    from ray import serve

    from radixserve.cluster.app import ClusterConfig, build_application
    from radixserve.cluster.serve_cli import kill_metadata_actor
    keys = {f"key-tenant-{i}": f"tenant-{i}" for i in range(cfg.tenants)}
    app = build_application(ClusterConfig(
        model=cfg.model, num_replicas=cfg.replicas, router=policy, api_keys=keys,
        engine={"cache_dir": cache_dir, "num_gpu_blocks": cfg.gpu_blocks, "max_model_len": 2048,
                "engine_worker_queue_port": 0, "cache_queue_port": 0}))
    serve.run(app, name="bench", route_prefix="/")
    try:
        turns, elapsed = asyncio.run(drive(f"http://127.0.0.1:{port}", sessions, cfg))
    finally:
        serve.delete("bench")
        kill_metadata_actor("bench")
    return summarize(turns, elapsed, cfg.replicas), turns


def main(argv: list[str] | None = None) -> dict:
    if argv is None:
        import sys
        argv = sys.argv[1:]
    if "--trace" in argv:
        from radixserve.benchmarks.router_replay import main as trace_main
        return trace_main([a for a in argv if a != "--trace"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--port", type=int, default=8077)
    p.add_argument("--model", default=None, help="e.g. small-llama: prefill cost makes cache hits show in TTFT")
    for name in ("sessions", "users", "system_words", "min_turns", "max_turns", "gpu_blocks"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else RouterBenchConfig()
    overrides = {k: getattr(args, k) for k in ("model", "sessions", "users", "system_words", "min_turns",
                                               "max_turns", "gpu_blocks") if getattr(args, k) is not None}
    cfg = RouterBenchConfig(**{**asdict(cfg), **overrides})
    import ray
    from ray import serve

    from radixserve.engine import LLM
    model_dir = resolve_model(cfg.model, args.cache_dir)
    tok = Tokenizer(model_dir)
    oracle_llm = LLM(str(model_dir), max_model_len=2048)
    sessions = make_sessions(cfg)
    if ray.is_initialized():  # a caller's Ray: this benchmark needs its own 4-CPU local cluster
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve", logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    results, oracle = {}, []
    try:
        for policy in tqdm(cfg.policies, desc="bench_router"):
            summary, turns = run_policy(cfg, policy, args.cache_dir, args.port, sessions)
            summary["oracle_hit_rate"] = oracle_hit_rate(turns, tok, oracle_llm, 16)
            oracle.append(summary["oracle_hit_rate"])
            results[policy] = summary
            tqdm.write(f"{policy}: hit {summary['hit_rate']:.3f} (oracle {summary['oracle_hit_rate']:.3f}), "
                       f"ttft p50 {summary['ttft_p50_s']:.3f}s, load max/mean {summary['load_max_over_mean']:.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()
    aff = results["prefix_affinity"]
    summary = {"affinity_hit_over_oracle": aff["hit_rate"] / aff["oracle_hit_rate"],
               "affinity_load_max_over_mean": aff["load_max_over_mean"],
               "affinity_ttft_p50_over_pow2": aff["ttft_p50_s"] / results["pow2"]["ttft_p50_s"],
               "affinity_hit_rate": aff["hit_rate"], "pow2_hit_rate": results["pow2"]["hit_rate"],
               "oracle_hit_rate": aff["oracle_hit_rate"],
               "errors": sum(r["errors"] for r in results.values())}
    if "consistent_hash" in results:
        summary["consistent_hash_hit_rate"] = results["consistent_hash"]["hit_rate"]
        summary["consistent_hash_load_max_over_mean"] = results["consistent_hash"]["load_max_over_mean"]
    suite = "router-quick" if args.quick else f"router-{cfg.model}"
    path = write_result(suite, asdict(cfg), results, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command=command_line("radixserve.benchmarks.bench_router", argv))
    rows = [(f"{pol}\nhit rate", r["hit_rate"], None) for pol, r in results.items()]
    rows += [("oracle\nhit rate", aff["oracle_hit_rate"], None),
             ("affinity TTFT p50\n/ pow2", summary["affinity_ttft_p50_over_pow2"], 1.0),
             ("affinity load\nmax/mean", aff["load_max_over_mean"], 1.25)]
    bar_plot(path.with_suffix(".png"), f"Router policies, {cfg.replicas} replicas, multi-tenant multi-turn ({cfg.model})",
             rows, "value")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
