"""Engine suite: realistic workloads through radixserve and its baselines, side by side.

Every workload in ``benchmarks/workloads.py`` (shared_prefix, multi_turn, rag,
no_sharing) is sent, request for request, to each *variant*:

  cache_on           radixserve AsyncLLMEngine, prefix cache on, device pool only (the reference)
  cache_off          the same engine with the prefix cache off
  cache_on_cpu_tier  prefix cache on plus a 1 GiB CPU tier (``swap_space=1``); rag only,
                     the one workload whose working set exceeds the device pool
  hf                 Hugging Face transformers ``generate`` on the same weights, one
                     request at a time (no server, no batching, no cache)

Variants are data (:data:`VARIANTS`: a name and ``engine_config`` keyword
arguments), so a new comparison is one line. Each run gets a fresh engine
(cold cache) and one warm-up request; rounds repeat the whole plan with the
variant order rotated, so background load on a shared machine hits every
variant alike; each ratio is taken within a round and the median over rounds
reported. For ``rag`` the device KV pool is the documents' working set /
``rag.working_set_over_pool`` for every engine variant alike.

Defaults: small-llama, closed loop with 4 users, 2 rounds, TTFT SLO 2 s,
workload sizes = the workload configs' defaults (shared_prefix 4x4 of 512+32
tokens; multi_turn 4 sessions x 4 turns over a 256-token system prompt; rag
40 questions over 12 documents of 256 tokens, pool 2/3 of the working set;
no_sharing 10 x 512 tokens; 16-24 output tokens): 10 minutes on the 2-core
development VM with another benchmark running beside it (less when idle).
``--quick``: tiny-llama, a few requests, seconds.

    python -m radixserve.benchmarks.bench_workloads                     # default size, small-llama
    python -m radixserve.benchmarks.bench_workloads --quick             # smoke size, tiny-llama
    python -m radixserve.benchmarks.bench_workloads --mode open --rate 0.5 --workloads rag \\
        --set rag.documents=32 --set rag.working_set_over_pool=2 --ttft-slo 1.5
    python -m radixserve.benchmarks.bench_workloads --plot-only benchmarks/results/workloads-cpu-2026-11-23.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from radixserve.benchmarks import drivers
from radixserve.benchmarks.common import command_line, load_average, print_summary, workload_panels_plot, write_result
from radixserve.benchmarks.metrics import Run, Slo, TierHits, aggregate, headline, round_ratios, summarize
from radixserve.benchmarks.workloads import (
    WORKLOADS,
    MultiTurnConfig,
    NoSharingConfig,
    RAGConfig,
    RequestSpec,
    SharedPrefixConfig,
    TokenSpace,
    apply_overrides,
    shape,
    with_poisson_arrivals,
)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    engine: Mapping[str, Any] | None  # engine_config keyword arguments; None: the transformers baseline
    workloads: tuple[str, ...] | None = None  # run only on these (None: all)


VARIANTS: tuple[Variant, ...] = (
    Variant("cache_on", "radixserve, prefix cache on (device pool only)", {"enable_prefix_caching": True}),
    Variant("cache_off", "radixserve, prefix cache off", {"enable_prefix_caching": False}),
    # Only rag's pool is smaller than its working set; elsewhere a CPU tier is never touched.
    Variant("cache_on_cpu_tier", "radixserve, prefix cache on + 1 GiB CPU tier",
            {"enable_prefix_caching": True, "swap_space": 1.0}, workloads=("rag",)),
    Variant("hf", "transformers generate, one request at a time", None),
)
BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class WorkloadsBenchConfig:
    model: str = "small-llama"
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    variants: tuple[str, ...] = ("cache_on", "cache_off", "cache_on_cpu_tier", "hf")
    reference: str = "cache_on"  # ratios are "reference vs each other variant"
    load: drivers.Load = drivers.Load("closed", users=4)
    repeats: int = 2
    slo: Slo = Slo(ttft_s=2.0)
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    seed: int = 0  # open-loop arrivals
    # The workload configs' defaults: about 5 minutes a round on 2 busy CPU cores with small-llama.
    shared_prefix: SharedPrefixConfig = SharedPrefixConfig()
    multi_turn: MultiTurnConfig = MultiTurnConfig()
    rag: RAGConfig = RAGConfig()
    no_sharing: NoSharingConfig = NoSharingConfig()

    def __post_init__(self) -> None:
        bad = [w for w in self.workloads if w not in WORKLOADS] + [v for v in self.variants if v not in BY_NAME]
        if bad:
            raise ValueError(f"unknown workloads/variants {bad}; workloads: {list(WORKLOADS)}, "
                             f"variants: {list(BY_NAME)}")
        if self.reference not in self.variants:
            raise ValueError(f"reference {self.reference!r} must be one of the variants run {self.variants}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


QUICK = WorkloadsBenchConfig(
    model="tiny-llama", load=drivers.Load("closed", users=2), repeats=1, slo=Slo(ttft_s=0.5),
    shared_prefix=SharedPrefixConfig(groups=2, questions=3, prefix_len=64, suffix_len=8, output_len=4),
    multi_turn=MultiTurnConfig(sessions=2, turns=2, system_len=32, user_len=8, output_len=4, think_s=0.01),
    rag=RAGConfig(documents=4, doc_len=64, questions=8, question_len=8, output_len=4),
    no_sharing=NoSharingConfig(requests=3, prompt_len=48, output_len=4))


# -- requests and engine sizing -------------------------------------------------------


def make_requests(cfg: WorkloadsBenchConfig, name: str, tokens: TokenSpace) -> list[RequestSpec]:
    requests = WORKLOADS[name].generate(getattr(cfg, name), tokens)
    if cfg.load.mode == "open":
        requests = with_poisson_arrivals(requests, cfg.load.rate, cfg.seed)
    return requests


def engine_kwargs(cfg: WorkloadsBenchConfig, variant: Variant, workload: str,
                  requests: Sequence[RequestSpec]) -> dict[str, Any]:
    longest = max(s.prompt_len + s.output_len for s in requests)
    # Ports 0: any free ones, so a run never collides with a server or test on this machine.
    kwargs = {"max_model_len": _round_up(longest + 1, cfg.block_size), "block_size": cfg.block_size,
              "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
              "engine_worker_queue_port": 0, "cache_queue_port": 0, **variant.engine}
    if workload == "rag":
        kwargs["num_gpu_blocks"] = rag_pool_blocks(cfg, longest)
    return kwargs


def rag_pool_blocks(cfg: WorkloadsBenchConfig, longest_request: int) -> int:
    """Device KV pool for rag: the documents' working set / working_set_over_pool."""
    blocks = math.ceil(cfg.rag.working_set_tokens / cfg.rag.working_set_over_pool / cfg.block_size)
    live = cfg.load.users * math.ceil(longest_request / cfg.block_size)
    if cfg.load.mode == "closed" and blocks < live:
        raise ValueError(f"rag: a pool of {blocks} blocks cannot hold {cfg.load.users} live requests of "
                         f"{longest_request} tokens ({live} blocks); lower rag.working_set_over_pool or users")
    return blocks


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


# -- one run per (round, workload, variant) ------------------------------------------------


def run_engine(cfg: WorkloadsBenchConfig, model_dir: str, variant: Variant, workload: str,
               requests: Sequence[RequestSpec], rnd: int) -> Run:
    from radixserve.engine import AsyncLLMEngine
    kwargs = engine_kwargs(cfg, variant, workload, requests)
    engine = AsyncLLMEngine.from_kwargs(model_dir, **kwargs)
    try:
        _warm_up(engine, requests[0].output_len)
        before, load0 = engine.engine.metrics.snapshot(), load_average()
        records = drivers.run(drivers.EngineTarget(engine, variant.name), requests, cfg.load,
                              desc=f"{workload}/{variant.name}")
        after = engine.engine.metrics.snapshot()
    finally:
        engine.shutdown()
    tiers = TierHits.between(before, after)
    counters = {k: after[k] - before.get(k, 0.0) for k in COUNTERS if k in after}
    return Run(rnd, workload, variant.name, summarize(records, cfg.slo, tiers), records, tiers, counters, kwargs,
               load0, load_average())


COUNTERS = ("prefix_cache_queries_tokens", "prefix_cache_hits_tokens", "prefix_cache_gpu_hits_tokens",
            "prefix_cache_cpu_hits_tokens", "prompt_tokens", "generation_tokens", "num_preemptions",
            "swap_in_blocks", "swap_out_blocks")


def _warm_up(engine: Any, output_len: int) -> None:
    """First-call costs (allocations, lazy inits) must not land on the first measured request."""
    from radixserve.engine.sampling_params import SamplingParams
    ids = [random.Random(-1).randrange(10, 200) for _ in range(12)]  # < one block: nothing gets cached

    async def go() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max(2, output_len), ignore_eos=True)
        async for _ in engine.generate(prompt_token_ids=ids, sampling_params=params, request_id="warm-up"):
            pass

    asyncio.run(go())


def load_hf(model_dir: str) -> drivers.HFTarget:
    import torch
    import transformers
    transformers.logging.set_verbosity_error()  # generation-config chatter on every call
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    target = drivers.HFTarget(model)
    target.warm_up()
    return target


def run_hf(cfg: WorkloadsBenchConfig, target: drivers.HFTarget, workload: str, requests: Sequence[RequestSpec],
           rnd: int) -> Run:
    load0 = load_average()
    records = drivers.run(target, requests, cfg.load, desc=f"{workload}/hf")
    return Run(rnd, workload, "hf", summarize(records, cfg.slo), records, load_average_before=load0,
               load_average_after=load_average())


def plan(cfg: WorkloadsBenchConfig) -> list[tuple[int, str, str]]:
    """(round, workload, variant), the variant order rotated every round."""
    out = []
    for r in range(cfg.repeats):
        k = r % len(cfg.variants)
        order = cfg.variants[k:] + cfg.variants[:k]
        out += [(r, w, v) for w in cfg.workloads for v in order
                if BY_NAME[v].workloads is None or w in BY_NAME[v].workloads]
    return out


def run_suite(cfg: WorkloadsBenchConfig, cache_dir: str | None) -> tuple[list[Run], dict]:
    from radixserve.engine.model.default_models import resolve_model
    from radixserve.engine.tokenizer import Tokenizer
    model_dir = str(resolve_model(cfg.model, cache_dir))
    tokens = TokenSpace.from_tokenizer(Tokenizer(model_dir))
    requests = {w: make_requests(cfg, w, tokens) for w in cfg.workloads}
    hf = load_hf(model_dir) if "hf" in cfg.variants else None
    runs = []
    try:
        for rnd, w, v in tqdm(plan(cfg), desc="bench_workloads"):
            variant = BY_NAME[v]
            run = run_hf(cfg, hf, w, requests[w], rnd) if variant.engine is None else \
                run_engine(cfg, model_dir, variant, w, requests[w], rnd)
            runs.append(run)
            s = run.summary
            tqdm.write(f"round {rnd} {w:13s} {v:17s} ttft p50 {s.ttft_p50:7.3f}s p99 {s.ttft_p99:7.3f}s  "
                       f"{s.output_tok_per_s:7.1f} out tok/s  hit {s.hit_rate_client:.2f}  "
                       f"slo {s.slo_attainment:.2f}")
    finally:
        if hf is not None:
            hf.shutdown()
    shapes = {w: {"description": WORKLOADS[w].description, "config": asdict(getattr(cfg, w)),
                  "shape": shape(requests[w])} for w in cfg.workloads}
    if "rag" in cfg.workloads:
        longest = shapes["rag"]["shape"]["max_request_len"]
        shapes["rag"]["kv_pool_tokens"] = rag_pool_blocks(cfg, longest) * cfg.block_size
        shapes["rag"]["working_set_tokens"] = cfg.rag.working_set_tokens
    return runs, shapes


# -- command line ---------------------------------------------------------------------------


def parse_config(args: argparse.Namespace) -> WorkloadsBenchConfig:
    cfg = QUICK if args.quick else WorkloadsBenchConfig()
    load = drivers.Load(args.mode or cfg.load.mode, args.users or cfg.load.users,
                        args.rate if args.rate is not None else cfg.load.rate)
    slo = Slo(args.ttft_slo or cfg.slo.ttft_s, args.tpot_slo)
    top = {"model": args.model, "repeats": args.repeats, "reference": args.reference,
           "workloads": tuple(args.workloads.split(",")) if args.workloads else None,
           "variants": tuple(args.variants.split(",")) if args.variants else None}
    cfg = replace(cfg, load=load, slo=slo, **{k: v for k, v in top.items() if v is not None})
    return apply_overrides(cfg, args.set or [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_workloads", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size on tiny-llama (seconds)")
    p.add_argument("--model", help="embedded model name or HF directory (default small-llama)")
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--variants", help=f"comma list of {', '.join(BY_NAME)} (default: all)")
    p.add_argument("--reference", help="variant the ratios are taken against (default cache_on)")
    p.add_argument("--mode", choices=("open", "closed"), help="open: Poisson arrivals at --rate; closed: --users")
    p.add_argument("--users", type=int, help="closed loop: concurrent users (default 4)")
    p.add_argument("--rate", type=float, help="open loop: sessions per second (inf: all at once)")
    p.add_argument("--repeats", type=int, help="rounds, variant order rotated each round (default 2)")
    p.add_argument("--ttft-slo", type=float, help="TTFT SLO in seconds for goodput (default 2.0)")
    p.add_argument("--tpot-slo", type=float, help="optional TPOT SLO in seconds for goodput")
    p.add_argument("--set", action="append", metavar="WORKLOAD.FIELD=VALUE",
                   help="workload parameter, e.g. shared_prefix.prefix_len=1024 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a shared machine 1 thread "
                   "avoids multi-threaded ops stalling whenever another process holds a core")
    p.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw the PNG of an existing result")
    p.add_argument("--cache-dir", help="where embedded models are generated")
    p.add_argument("--out-dir", help="result directory (default benchmarks/results)")
    return p


def plot(json_path: Path) -> Path:
    doc = json.loads(Path(json_path).read_text())
    cfg, env = doc["config"], doc["env"]
    return workload_panels_plot(json_path, f"radixserve workloads on {env['device']} ({env['cpu']}), "
                                           f"{cfg['model']}, {drivers.Load(**cfg['load']).label()}; "
                                           f"median of {cfg['repeats']} round(s)")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        print(plot(args.plot_only))
        return {}
    cfg = parse_config(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)  # recorded as env.torch_threads
    runs, shapes = run_suite(cfg, args.cache_dir)
    agg, ratios = aggregate(runs), round_ratios(runs, cfg.reference)
    summary = headline(ratios, agg, cfg.reference)
    for w, vs in agg.items():  # the CPU tier's own hit rate, where it ran
        if "cache_on_cpu_tier" in vs:
            summary[f"{w}/hit_rate_cache_on_cpu_tier"] = vs["cache_on_cpu_tier"]["hit_rate_client"]
    config = {**asdict(cfg), "variant_definitions": {v: {"description": BY_NAME[v].description,
                                                          "engine": BY_NAME[v].engine} for v in cfg.variants}}
    measurements = {"workloads": shapes, "aggregate": agg, "round_ratios": ratios,
                    "runs": [r.to_json() for r in runs]}
    # Another model than the default gets its own name, so it never shadows the default's result in the report.
    default = (QUICK if args.quick else WorkloadsBenchConfig()).model
    suite = "workloads" + (f"-{Path(cfg.model).name}" if cfg.model != default else "") + ("-quick" if args.quick else "")
    path = write_result(suite, config, measurements, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_workloads", argv))
    plot(path)
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
