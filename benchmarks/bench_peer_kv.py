"""Hot-prefix spill: TTFT on replica B pulling a prefix's KV from replica A vs recomputing it.

Replica A holds one long prefix (its device tier); a request with that prefix
lands on B (A is loaded). B either recomputes the prefix or pulls its blocks
from A: A exports them (every rank copies them out over its cache queue), B's
ranks write them into B's pool. Both engines run in this process and the
fetcher calls A directly: the transfer measured is the engine side (export +
import over both cache queues), not a cross-node network. Rounds interleave
pull and recompute; B's cache is reset between requests.

    python -m radixserve.benchmarks.bench_peer_kv            # small-llama, 2048-token prefix
    python -m radixserve.benchmarks.bench_peer_kv --quick    # tiny-llama, seconds
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from radixserve.benchmarks.common import bar_plot, command_line, load_average, median, print_summary, write_result
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.peer import KVExport, PeerHint
from radixserve.engine.core.peer_driver import PeerDriver
from radixserve.engine.model.default_models import resolve_model


@dataclass(frozen=True)
class PeerBenchConfig:
    model: str = "small-llama"
    prefix_len: int = 2048
    suffix_len: int = 16
    output_len: int = 4
    gpu_blocks: int = 160
    cpu_blocks: int = 16  # a CPU tier starts the cache queue the transfers run over
    repeats: int = 3
    seed: int = 0


QUICK = PeerBenchConfig(model="tiny-llama", prefix_len=256, gpu_blocks=40, repeats=2)


def make_engine(model_dir: str, cfg: PeerBenchConfig) -> LLM:
    return LLM(model_dir, num_gpu_blocks=cfg.gpu_blocks, num_cpu_blocks=cfg.cpu_blocks,
               max_model_len=cfg.prefix_len + cfg.suffix_len + cfg.output_len + 16,
               engine_worker_queue_port=0, cache_queue_port=0)


def ttft(llm: LLM, ids: list[int], hint: PeerHint | None, rid: str) -> tuple[float, int]:
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    eng.add_request(rid, prompt_token_ids=ids, params=params, peer_hint=hint)
    while True:
        for out in eng.step():
            if out.finished:
                return time.perf_counter() - start, out.num_cached_tokens


def run(cfg: PeerBenchConfig, cache_dir: str | None) -> dict:
    model_dir = str(resolve_model(cfg.model, cache_dir))
    a, b = make_engine(model_dir, cfg), make_engine(model_dir, cfg)
    exports: list[tuple[float, int]] = []

    def fetch(hint: PeerHint, hashes: list[int]) -> KVExport:
        t = time.perf_counter()
        got = a.engine.export_kv(hashes)
        exports.append((time.perf_counter() - t, got.num_bytes))
        return got

    b.engine.peer = PeerDriver(b.engine, fetch)
    rng = random.Random(cfg.seed)
    vocab = b.engine.arch.vocab_size
    prefix = [rng.randrange(10, vocab) for _ in range(cfg.prefix_len)]
    ttft(a, prefix + [11] * cfg.suffix_len, None, "warm")  # A caches the prefix
    hint = PeerHint("A", cfg.prefix_len // b.engine.block_size)
    pull, recompute, cached = [], [], []
    for i in tqdm(range(cfg.repeats), desc="bench_peer_kv"):
        suffix = [rng.randrange(10, vocab) for _ in range(cfg.suffix_len)]
        for mode in (("pull", "recompute") if i % 2 == 0 else ("recompute", "pull")):
            assert b.engine.kv.reset_prefix_cache()
            s, c = ttft(b, prefix + suffix, hint if mode == "pull" else None, f"{mode}{i}")
            (pull if mode == "pull" else recompute).append(s)
            if mode == "pull":
                cached.append(c)
    a.shutdown()
    b.shutdown()
    export_s = [e[0] for e in exports]
    nbytes = exports[0][1] if exports else 0
    return {"pull_ttft_s": pull, "recompute_ttft_s": recompute, "pull_cached_tokens": cached,
            "export_s": export_s, "export_bytes": nbytes,
            "export_gb_per_s": nbytes / median(export_s) / 1e9 if export_s else 0.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama, a 256-token prefix")
    p.add_argument("--cache-dir", default=None, help="model cache directory")
    p.add_argument("--out-dir", type=Path, default=None, help="results directory (default: benchmarks/results)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else PeerBenchConfig()
    load_before = load_average()
    m = run(cfg, args.cache_dir)
    summary = {"pull_ttft_p50_s": median(m["pull_ttft_s"]), "recompute_ttft_p50_s": median(m["recompute_ttft_s"]),
               "pull_speedup_vs_recompute": median(m["recompute_ttft_s"]) / median(m["pull_ttft_s"]),
               "export_gb_per_s": m["export_gb_per_s"], "load_average_before": load_before[0],
               "load_average_after": load_average()[0]}
    suite = "peer_kv-quick" if args.quick else "peer_kv"
    path = write_result(suite, asdict(cfg), m, summary, args.out_dir, command_line("bench_peer_kv", argv))
    bar_plot(path.with_suffix(".png"), f"Hot-prefix spill, {cfg.model}, {cfg.prefix_len}-token prefix",
             [("pull vs recompute\nTTFT", summary["pull_speedup_vs_recompute"], 5.0)], "speedup (x)")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
