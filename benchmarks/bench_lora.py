"""Multi-LoRA serving: throughput and TTFT with 1, 4 and 16 adapters on a
shared-system-prompt workload, prefix caching on vs off, and the LoRA path's
overhead against the base model.

Workload: every request is one shared system prompt + its own suffix; request i
runs on adapter i % k (all requests arrive at once, so TTFT includes queueing).
With prefix caching the system prompt is computed once *per adapter* (blocks are
namespaced by adapter), so the cache's benefit shrinks as k grows.

Sweep (each run from a cold prefix cache, prefix caching on and off; ``repeats``
rounds over all eight variants, the fastest of each kept):
  base        engine without LoRA (enable_lora=False)
  lora k=N    LoRA-enabled engine, N adapters (rank ``rank``, all seven target modules)

Overhead (prefix caching off, ``overhead_requests`` requests, runs interleaved and
repeated ``overhead_repeats`` times; the fastest of each is compared, since noise on
a shared machine only ever slows a run down):
  base vs lora k=1            the LoRA path's cost on every token
  base vs lora-engine-base    a LoRA-enabled engine serving base-model requests (hook cost)

    python -m radixserve.benchmarks.bench_lora                 # small-llama
    python -m radixserve.benchmarks.bench_lora --quick         # seconds, on tiny-llama (smoke test)
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from radixserve.benchmarks.common import command_line, median, percentile, print_summary, write_result
from radixserve.engine import LLM, LoRARequest, SamplingParams
from radixserve.engine.lora.adapter import TARGET_MODULES, module_shapes
from radixserve.engine.model.default_models import resolve_model
from radixserve.engine.model.hf_config import load_arch_config


@dataclass(frozen=True)
class LoRABenchConfig:
    model: str = "small-llama"
    adapter_counts: tuple[int, ...] = (1, 4, 16)
    rank: int = 16
    requests: int = 32
    system_prompt_len: int = 128
    suffix_len: int = 16
    output_len: int = 16
    max_num_seqs: int = 32
    max_loras: int = 16
    repeats: int = 3
    overhead_requests: int = 8
    overhead_repeats: int = 5
    seed: int = 0


QUICK = LoRABenchConfig(model="tiny-llama", requests=16, system_prompt_len=64, suffix_len=8, output_len=4,
                        rank=8, max_num_seqs=16, overhead_requests=4, overhead_repeats=2)


def write_adapters(root: Path, model_dir: Path, count: int, rank: int, seed: int) -> list[Path]:
    """``count`` random PEFT adapters (all seven target modules) for the model."""
    arch = load_arch_config(model_dir)
    shapes = module_shapes(arch)
    paths = []
    for k in range(count):
        path = root / f"adapter-{k}-r{rank}"
        paths.append(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        tensors = {}
        for i in range(arch.num_layers):
            for m, block in TARGET_MODULES.items():
                in_f, out_f = shapes[m]
                prefix = f"base_model.model.model.layers.{i}.{block}.{m}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * in_f ** -0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGET_MODULES)}))
    return paths


def run_workload(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None], output_len: int) -> dict:
    llm.engine.kv.reset_prefix_cache()  # every run starts cold
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.ttft for o in outs]
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_per_s": out_tokens / elapsed,
            "requests_per_s": len(outs) / elapsed, "ttft_s": ttft, "ttft_p50_s": median(ttft),
            "ttft_p90_s": percentile(ttft, 0.9), "cached_tokens": sum(o.num_cached_tokens for o in outs),
            "prompt_tokens": sum(len(p) for p in prompts)}


def best(runs: list[dict]) -> dict:
    """The fastest of the repeats (noise on a shared machine only ever slows a run down)."""
    return min(runs, key=lambda r: r["elapsed_s"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on tiny-llama (seconds)")
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--system-prompt-len", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="where embedded models and the bench adapters live")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else LoRABenchConfig()
    overrides = {k: v for k, v in (("model", args.model), ("requests", args.requests),
                                   ("system_prompt_len", args.system_prompt_len), ("repeats", args.repeats))
                 if v is not None}
    cfg = LoRABenchConfig(**{**asdict(cfg), **overrides})
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model_dir = resolve_model(cfg.model, args.cache_dir)
    adapter_root = Path(args.cache_dir or model_dir.parent) / "bench-lora-adapters" / cfg.model
    paths = write_adapters(adapter_root, model_dir, max(cfg.adapter_counts), cfg.rank, cfg.seed)
    vocab = load_arch_config(model_dir).vocab_size
    tokens = lambda n: [rng.randrange(10, vocab - 32) for _ in range(n)]  # noqa: E731
    system = tokens(cfg.system_prompt_len)
    prompts = [system + tokens(cfg.suffix_len) for _ in range(cfg.requests)]
    max_len = cfg.system_prompt_len + cfg.suffix_len + cfg.output_len + 16
    common = dict(max_model_len=max_len, max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=2048)
    lora_kwargs = dict(enable_lora=True, max_loras=cfg.max_loras, max_lora_rank=cfg.rank,
                       lora_modules=[f"a{k}={path}" for k, path in enumerate(paths)])

    runs = [("base", False, None)] + [(f"lora k={k}", True, k) for k in cfg.adapter_counts]
    overhead_runs = [("base", False, None), ("lora-engine-base", True, None), ("lora k=1", True, 1)]
    m: dict[str, dict] = {}
    bar = tqdm(total=2 * len(runs) * cfg.repeats + len(overhead_runs) * cfg.overhead_repeats, desc="bench_lora")

    def record(key: str, reps: list[dict]) -> None:
        m[key] = {"repeats": reps, **{k2: v for k2, v in best(reps).items() if k2 != "ttft_s"}}
        tqdm.write(f"{key}: {m[key]['output_tok_per_s']:.1f} tok/s, elapsed {m[key]['elapsed_s']:.2f}s, "
                   f"TTFT p50 {m[key]['ttft_p50_s']:.3f}s, cached {m[key]['cached_tokens']}/{m[key]['prompt_tokens']}")

    # All four engines live at once and every repeat visits every variant in turn, so a
    # busy spell on the shared machine slows all of them alike rather than one.
    engines = {(cache, lora): LLM(str(model_dir), enable_prefix_caching=cache, **common,
                                  **(lora_kwargs if lora else {}))
               for cache in (True, False) for lora in (False, True)}
    for (cache, lora), llm in engines.items():  # warm-up, incl. loading every adapter into a slot once
        llm.generate([{"prompt_token_ids": system[:8]}], SamplingParams(max_tokens=2))
        for k in range(min(len(paths), cfg.max_loras) if lora else 0):
            llm.generate([{"prompt_token_ids": system[:8]}], SamplingParams(max_tokens=1),
                         lora_request=LoRARequest(f"a{k}"))
    sweep = [(cache, name, lora, k) for cache in (True, False) for name, lora, k in runs]
    reps: dict[str, list[dict]] = {}
    for _ in range(cfg.repeats):
        for cache, name, lora, k in sweep:
            loras = [LoRARequest(f"a{i % k}") if k else None for i in range(cfg.requests)]
            key = f"{name} | cache {'on' if cache else 'off'}"
            reps.setdefault(key, []).append(run_workload(engines[(cache, lora)], prompts, loras, cfg.output_len))
            bar.update(1)
    for key, runs_ in reps.items():
        record(key, runs_)
    n = cfg.overhead_requests
    oreps: dict[str, list[dict]] = {name: [] for name, _, _ in overhead_runs}
    for _ in range(cfg.overhead_repeats):
        for name, lora, k in overhead_runs:
            loras = [LoRARequest(f"a{i % k}") if k else None for i in range(n)]
            oreps[name].append(run_workload(engines[(False, lora)], prompts[:n], loras, cfg.output_len))
            bar.update(1)
    for name, runs_ in oreps.items():
        record(f"overhead {name} | cache off", runs_)
    for llm in engines.values():
        llm.shutdown()
    bar.close()

    def el(name, cache):
        return m[f"{name} | cache {cache}"]["elapsed_s"]
    summary = {
        "lora_overhead": el("overhead lora k=1", "off") / el("overhead base", "off") - 1.0,
        "lora_engine_base_requests_overhead": el("overhead lora-engine-base", "off") / el("overhead base", "off") - 1.0,
        "base_cache_speedup": el("base", "off") / el("base", "on"),
    }
    for k in cfg.adapter_counts:
        summary[f"k{k}_cache_speedup"] = el(f"lora k={k}", "off") / el(f"lora k={k}", "on")
        summary[f"k{k}_hit_rate"] = (m[f"lora k={k} | cache on"]["cached_tokens"]
                                     / m[f"lora k={k} | cache on"]["prompt_tokens"])
        summary[f"k{k}_cache_on_tok_per_s_over_base"] = (m[f"lora k={k} | cache on"]["output_tok_per_s"]
                                                         / m["base | cache on"]["output_tok_per_s"])
    suite = "lora-quick" if args.quick else "lora"
    path = write_result(suite, asdict(cfg), m, summary, Path(args.out_dir) if args.out_dir else None,
                        command=command_line("radixserve.benchmarks.bench_lora", argv))
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print_summary(path, summary)
    return summary


def plot(doc: dict, path: Path) -> Path:
    """Two panels from the JSON alone: output tok/s and TTFT p50, cache on vs off per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = doc["measurements"]
    names = list(dict.fromkeys(k.split(" | ")[0] for k in m if not k.startswith("overhead")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.38
    for ax, metric, label in ((axes[0], "output_tok_per_s", "output tokens / s"),
                              (axes[1], "ttft_p50_s", "TTFT p50 (s), all requests arrive at once")):
        for j, (cache, color) in enumerate((("on", "#4878a8"), ("off", "#b0b0b0"))):
            vals = [m[f"{n} | cache {cache}"][metric] for n in names]
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            ax.bar(xs, vals, width, color=color, label=f"prefix cache {cache}")
            for x, v in zip(xs, vals):
                ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    c = doc["config"]
    s = doc["summary"]
    fig.suptitle(f"multi-LoRA, {c['model']} (CPU fp32), {c['requests']} requests = {c['system_prompt_len']}-token "
                 f"shared system prompt + {c['suffix_len']}, {c['output_len']} out; rank {c['rank']}\n"
                 f"LoRA path overhead vs base (k=1, cache off, best of {c['overhead_repeats']}) "
                 f"{100 * s['lora_overhead']:+.1f}% (hook only: {100 * s['lora_engine_base_requests_overhead']:+.1f}%)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
