"""Hot-prefix spill over real Ray Serve: TTFT on the replica without the prefix, pulling vs recomputing.

Two apps run side by side in one local Ray cluster, each 2 replicas behind the
round-robin router (so consecutive requests alternate replicas, which is what
a spill does): "pull" with peer KV on, "recompute" with it off. Each round
sends a fresh long prefix to one replica (it caches it), waits for its block
report to reach the router, then sends the same prefix with a new question:
round robin puts it on the other replica, which either pulls the blocks from
the first (the router's hint, a targeted Serve call, Ray's object store) or
recomputes them. Rounds interleave the two apps. TTFT is the client's time to
the whole response of a one-token completion (HTTP and tokenization included,
as a user sees it).

    python -m radixserve.benchmarks.bench_peer_kv_cluster            # small-llama, 2048-token prefix
    python -m radixserve.benchmarks.bench_peer_kv_cluster --quick    # tiny-llama, a 256-token prefix
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from radixserve.benchmarks.common import bar_plot, command_line, load_average, median, print_summary, write_result

MODES = ("pull", "recompute")


@dataclass(frozen=True)
class ClusterPeerBenchConfig:
    model: str = "small-llama"
    prefix_len: int = 2048
    suffix_len: int = 16
    gpu_blocks: int = 320
    repeats: int = 4
    vocab: int = 2000  # token ids drawn below this: ordinary tokens of every default model (tiny-llama has 2048)
    seed: int = 0


QUICK = ClusterPeerBenchConfig(model="tiny-llama", prefix_len=256, gpu_blocks=64, repeats=2)


def deploy(cfg: ClusterPeerBenchConfig, mode: str, cache_dir: str | None) -> None:
    from ray import serve

    from radixserve.cluster.app import ClusterConfig, build_application
    app = build_application(ClusterConfig(
        model=cfg.model, num_replicas=2, router="round_robin",
        engine={"cache_dir": cache_dir, "num_gpu_blocks": cfg.gpu_blocks, "peer_kv": mode == "pull",
                "max_model_len": cfg.prefix_len + cfg.suffix_len + 64,
                "engine_worker_queue_port": 0, "cache_queue_port": 0}))
    serve.run(app, name=f"peer-{mode}", route_prefix=f"/{mode}")


def complete(c: httpx.Client, mode: str, ids: list[int], model: str) -> tuple[float, str, int]:
    """(seconds, replica, cached prompt tokens) of a one-token completion."""
    t = time.perf_counter()
    r = c.post(f"/{mode}/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    took = time.perf_counter() - t
    return took, r.headers["x-radixserve-replica"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def run(cfg: ClusterPeerBenchConfig, cache_dir: str | None, port: int) -> dict:
    rng = random.Random(cfg.seed)
    out: dict[str, dict[str, list]] = {m: {"ttft_s": [], "cached_tokens": [], "same_replica": []} for m in MODES}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
        for m in MODES:  # warm both apps: first requests pay one-time costs
            for _ in range(2):
                complete(c, m, [rng.randrange(10, cfg.vocab) for _ in range(32)], cfg.model)
        for i in tqdm(range(cfg.repeats), desc="bench_peer_kv_cluster"):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                prefix = [rng.randrange(10, cfg.vocab) for _ in range(cfg.prefix_len)]
                _, home, _ = complete(c, mode, prefix, cfg.model)
                time.sleep(0.5)  # its block report reaches the router (publish 0.1 s, pull 0.05 s)
                s, where, cached = complete(c, mode, prefix + [rng.randrange(10, cfg.vocab)
                                                               for _ in range(cfg.suffix_len)], cfg.model)
                rec = out[mode]
                rec["ttft_s"].append(s)
                rec["cached_tokens"].append(cached)
                rec["same_replica"].append(where == home)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama, a 256-token prefix")
    p.add_argument("--cache-dir", default=None, help="model cache directory")
    p.add_argument("--port", type=int, default=8079)
    p.add_argument("--out-dir", type=Path, default=None, help="results directory (default: benchmarks/results)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else ClusterPeerBenchConfig()
    import ray
    from ray import serve

    from radixserve.cluster.serve_cli import kill_metadata_actor
    load_before = load_average()
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve", logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        for mode in MODES:
            deploy(cfg, mode, args.cache_dir)
        m = run(cfg, args.cache_dir, args.port)
    finally:
        serve.shutdown()
        for mode in MODES:
            kill_metadata_actor(f"peer-{mode}")
        ray.shutdown()
    pull, rec = median(m["pull"]["ttft_s"]), median(m["recompute"]["ttft_s"])
    summary = {"pull_ttft_p50_s": pull, "recompute_ttft_p50_s": rec, "pull_speedup_vs_recompute": rec / pull,
               "pull_cached_tokens_min": min(m["pull"]["cached_tokens"]),
               "recompute_cached_tokens_max": max(m["recompute"]["cached_tokens"]),
               "spilled_share": sum(not s for md in MODES for s in m[md]["same_replica"])
               / sum(len(m[md]["same_replica"]) for md in MODES),
               "load_average_before": load_before[0], "load_average_after": load_average()[0]}
    suite = "peer_kv-cluster-quick" if args.quick else "peer_kv-cluster"
    path = write_result(suite, asdict(cfg), m, summary, args.out_dir,
                        command_line("radixserve.benchmarks.bench_peer_kv_cluster", argv))
    bar_plot(path.with_suffix(".png"), f"Hot-prefix spill over Ray Serve, {cfg.model}, {cfg.prefix_len}-token prefix",
             [("pull vs recompute\nTTFT", summary["pull_speedup_vs_recompute"], 5.0)], "speedup (x)")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
