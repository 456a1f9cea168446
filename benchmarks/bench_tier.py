"""The CPU tier on long-document QA whose working set is ~4x the device KV pool.

Documents are revisited round-robin, the worst case for an LRU cache that
cannot hold them all: a device-only prefix cache evicts every document
before it comes back, while the CPU tier keeps them and swaps them in.
Three engines run the same requests: cache off, device-only prefix cache,
device + CPU tiers, in two modes. ``sequential``: one request at a time, like
a reading user, so TTFT is the engine's own. ``batched``: each round's
questions (one per document) submitted together, as vLLM's long-document QA
throughput benchmark does, so decoding is shared and total time is mostly
prefill. A last section times a CPU-tier hit against a miss for one long prefix.

    python -m radixserve.benchmarks.bench_tier            # small-llama, ~5 minutes on 2 CPU cores
    python -m radixserve.benchmarks.bench_tier --quick    # tiny-llama, seconds
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from radixserve.benchmarks.common import bar_plot, command_line, median, percentile, print_summary, write_result
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.default_models import resolve_model


@dataclass(frozen=True)
class TierBenchConfig:
    model: str = "small-llama"
    num_docs: int = 12
    doc_len: int = 1024
    question_len: int = 32
    output_len: int = 10  # short answers, as in vLLM's long-document QA benchmark (its default)
    rounds: int = 4  # each document: one miss, then three questions that hit its cached KV
    gpu_blocks: int = 192  # 3072 tokens: 3 of the 12 documents fit
    cpu_blocks: int = 2048
    hit_prefix_len: int = 2048
    repeats: int = 3
    seed: int = 0


QUICK = TierBenchConfig(model="tiny-llama", num_docs=6, doc_len=128, question_len=8, output_len=4, rounds=2,
                        gpu_blocks=24, cpu_blocks=256, hit_prefix_len=256, repeats=2)


def make_engine(model_dir: str, cfg: TierBenchConfig, caching: bool, cpu: bool) -> LLM:
    return LLM(model_dir, enable_prefix_caching=caching, num_gpu_blocks=cfg.gpu_blocks,
               num_cpu_blocks=cfg.cpu_blocks if cpu else 0, max_num_seqs=8,
               engine_worker_queue_port=0, cache_queue_port=0)


def doc_qa(llm: LLM, docs: list[list[int]], questions: list[list[int]], cfg: TierBenchConfig,
           batched: bool) -> dict:
    params = SamplingParams(temperature=0, max_tokens=cfg.output_len, ignore_eos=True)
    ttft, cached, cpu_cached, total = [], [], [], 0.0
    for r in range(cfg.rounds):
        prompts = [{"prompt_token_ids": doc + questions[r * len(docs) + d]} for d, doc in enumerate(docs)]
        groups = [prompts] if batched else [[p] for p in prompts]
        for group in groups:
            start = time.perf_counter()
            outs = llm.generate(group, params)
            total += time.perf_counter() - start
            ttft += [o.metrics.ttft for o in outs]
            cached += [o.num_cached_tokens for o in outs]
            cpu_cached += [o.num_cpu_cached_tokens for o in outs]
    prompt_tokens = sum(len(d) + cfg.question_len for d in docs) * cfg.rounds
    m = llm.engine.metrics.snapshot()
    return {"total_s": total, "ttft_s": ttft, "ttft_p50_s": median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
            "hit_rate": sum(cached) / prompt_tokens, "cpu_hit_rate": sum(cpu_cached) / prompt_tokens,
            "swap_in_blocks": m["swap_in_blocks"], "swap_out_blocks": m["swap_out_blocks"],
            "preemptions": m["num_preemptions"]}


def cpu_hit_vs_miss(model_dir: str, cfg: TierBenchConfig, rng: random.Random, vocab: int) -> dict:
    tokens = lambda n: [rng.randrange(10, vocab - 32) for _ in range(n)]  # noqa: E731
    prefix = tokens(cfg.hit_prefix_len)
    params = SamplingParams(temperature=0, max_tokens=1)
    off = make_engine(model_dir, cfg, caching=False, cpu=False)
    tier = make_engine(model_dir, cfg, caching=True, cpu=True)
    tier.generate([{"prompt_token_ids": prefix + tokens(8)}], params)
    miss, hit, cpu_tokens = [], [], []
    for _ in range(cfg.repeats):
        # push the prefix out of the device pool into the CPU tier
        tier.generate([{"prompt_token_ids": tokens(cfg.gpu_blocks * 16 - 64)}], params)
        suffix = tokens(32)
        out = tier.generate([{"prompt_token_ids": prefix + suffix}], params)[0]
        hit.append(out.metrics.ttft)
        cpu_tokens.append(out.num_cpu_cached_tokens)
        miss.append(off.generate([{"prompt_token_ids": prefix + suffix}], params)[0].metrics.ttft)
    tier.shutdown()
    off.shutdown()
    return {"miss_ttft_s": miss, "cpu_hit_ttft_s": hit, "cpu_cached_tokens": cpu_tokens,
            "speedup": min(miss) / min(hit)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else TierBenchConfig()
    rng = random.Random(cfg.seed)
    model_dir = str(resolve_model(cfg.model, args.cache_dir))
    setups = {"cache_off": (False, False), "gpu_only": (True, False), "gpu_cpu": (True, True)}
    m = {}
    vocab = None
    runs = [(mode, name) for mode in ("sequential", "batched") for name in setups]
    for mode, name in tqdm(runs, desc="bench_tier"):
        llm = make_engine(model_dir, cfg, *setups[name])
        vocab = llm.engine.arch.vocab_size
        rng = random.Random(cfg.seed)  # identical documents and questions for every setup
        docs = [[rng.randrange(10, vocab - 32) for _ in range(cfg.doc_len)] for _ in range(cfg.num_docs)]
        questions = [[rng.randrange(10, vocab - 32) for _ in range(cfg.question_len)]
                     for _ in range(cfg.num_docs * cfg.rounds)]
        m[f"{mode}/{name}"] = doc_qa(llm, docs, questions, cfg, batched=mode == "batched")
        llm.shutdown()
    m["cpu_hit_vs_miss"] = cpu_hit_vs_miss(model_dir, cfg, rng, vocab)
    summary = {}
    for mode in ("sequential", "batched"):
        off, gpu, tier = (m[f"{mode}/{n}"] for n in setups)
        summary[f"{mode}_gpu_cpu_over_gpu_only_speedup"] = gpu["total_s"] / tier["total_s"]
        summary[f"{mode}_gpu_cpu_over_off_speedup"] = off["total_s"] / tier["total_s"]
    seq_gpu, seq_tier = m["sequential/gpu_only"], m["sequential/gpu_cpu"]
    summary.update({"gpu_only_hit_rate": seq_gpu["hit_rate"], "gpu_cpu_hit_rate": seq_tier["hit_rate"],
                    "sequential_ttft_p50_gpu_only_over_gpu_cpu": seq_gpu["ttft_p50_s"] / seq_tier["ttft_p50_s"],
                    "cpu_hit_ttft_speedup_vs_miss": m["cpu_hit_vs_miss"]["speedup"]})
    path = write_result("tier-quick" if args.quick else "tier", asdict(cfg), m, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command=command_line("radixserve.benchmarks.bench_tier", argv))
    bar_plot(path.with_suffix(".png"), f"CPU tier, doc QA with a working set ~4x the device pool ({cfg.model})",
             [("GPU+CPU vs GPU-only\none at a time", summary["sequential_gpu_cpu_over_gpu_only_speedup"], 2.0),
              ("GPU+CPU vs GPU-only\nbatched rounds", summary["batched_gpu_cpu_over_gpu_only_speedup"], 2.0),
              ("GPU+CPU vs off\nbatched rounds", summary["batched_gpu_cpu_over_off_speedup"], None),
              ("CPU hit vs miss\nTTFT", summary["cpu_hit_ttft_speedup_vs_miss"], 5.0)], "speedup (x)")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
