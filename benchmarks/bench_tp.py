"""Tensor parallelism: tokens/s at TP=1 vs TP=N, and the engine-worker queue's cost per step.

On this 2-core CPU machine TP=2 splits two cores between two ranks and adds a
gloo all-reduce per layer, so it is expected to be slower than TP=1; the point
of running it here is the queue overhead, and that it works. GPU numbers need
a machine with >= 2 GPUs.

    python -m radixserve.benchmarks.bench_tp [--quick] [--tp 2]
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
from radixserve.engine.core.scheduler_output import SchedulerOutput
from radixserve.engine.model.default_models import resolve_model


@dataclass(frozen=True)
class TPBenchConfig:
    model: str = "small-llama"
    tp: int = 2
    requests: int = 16
    prompt_len: int = 256
    output_len: int = 64
    pings: int = 200
    seed: int = 0


QUICK = TPBenchConfig(model="tiny-llama", requests=4, prompt_len=32, output_len=8, pings=20)


def throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], params)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_per_s": tokens / elapsed,
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def queue_overhead(llm: LLM, pings: int) -> dict:
    """Round trips through every rank's queue: an empty step, and a bare ping."""
    executor = llm.engine.executor
    empty, ping = [], []
    for i in range(pings):
        start = time.perf_counter()
        executor.execute(SchedulerOutput(step_id=10**9 + i))
        empty.append(time.perf_counter() - start)
        ping.append(executor.ping())
    us = lambda xs: {"p50_us": median(xs) * 1e6, "p90_us": percentile(xs, 0.9) * 1e6}  # noqa: E731
    return {"empty_step": us(empty), "ping": us(ping)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else TPBenchConfig()
    cfg = TPBenchConfig(**{**asdict(cfg), "tp": args.tp})
    rng = random.Random(cfg.seed)
    model_dir = str(resolve_model(cfg.model, args.cache_dir))
    prompts = [[rng.randrange(10, 2000) for _ in range(cfg.prompt_len)] for _ in range(cfg.requests)]
    m = {}
    for tp in tqdm((1, cfg.tp), desc="bench_tp"):
        llm = LLM(model_dir, tensor_parallel_size=tp, engine_worker_queue_port=0)
        m[f"tp{tp}"] = throughput(llm, prompts, cfg.output_len)
        if tp > 1:
            m[f"tp{tp}"]["queue"] = queue_overhead(llm, cfg.pings)
            h = llm.engine.metrics.histograms["step_seconds"]
            m[f"tp{tp}"]["mean_step_s"] = h.total / max(h.count, 1)
        llm.shutdown()
    same = m["tp1"]["token_ids"] == m[f"tp{cfg.tp}"]["token_ids"]
    summary = {f"tp{cfg.tp}_over_tp1_tok_per_s": m[f"tp{cfg.tp}"]["output_tok_per_s"] / m["tp1"]["output_tok_per_s"],
               "queue_empty_step_p50_us": m[f"tp{cfg.tp}"]["queue"]["empty_step"]["p50_us"],
               "queue_ping_p50_us": m[f"tp{cfg.tp}"]["queue"]["ping"]["p50_us"],
               "greedy_tokens_identical": float(same)}
    path = write_result("tp-quick" if args.quick else "tp", asdict(cfg), m, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_tp", argv))
    bar_plot(path.with_suffix(".png"), f"TP={cfg.tp} vs TP=1 ({cfg.model}, CPU gloo)",
             [(f"tok/s TP{cfg.tp}/TP1", summary[f"tp{cfg.tp}_over_tp1_tok_per_s"], None),
              ("queue step p50 (ms)", summary["queue_empty_step_p50_us"] / 1000, None)], "value")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
