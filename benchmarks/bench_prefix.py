"""Prefix caching on one engine, side by side with its baselines, in one run.

Sections (each a ratio measured back to back on the same machine and weights):
  prefill     engine TTFT for an N-token prompt (cache off) vs a transformers forward pass
  prefix_hit  TTFT for prefix + suffix: cache off vs full prefix hit; transformers with
              past_key_values reused by hand as the baseline
  shared      throughput on a generated-shared-prefix workload, cache on vs off
  no_sharing  all prompts distinct: cache on vs off (the cost of the cache at 0% hits)
  batching    mixed lengths without sharing: engine vs transformers generate with static
              batches (the best of several batch sizes, prompts sorted by length)
  decode      TPOT at batch 1, 8, 32 against the weight-bandwidth floor (weight bytes / this
              machine's read bandwidth, measured in the same run), and batch-32 tokens/s
              against transformers generate at its best static batch

Every figure is repeated, interleaved with what it is compared to, and reported as its
median with min/max; the load average (1 min) is recorded beside each repeat, so a
figure from a loaded machine shows as such. Where time goes on a hit: profile_hit.py.

    python -m radixserve.benchmarks.bench_prefix                  # full size on small-llama
    python -m radixserve.benchmarks.bench_prefix --quick          # seconds, on tiny-llama (smoke test)
    python -m radixserve.benchmarks.bench_prefix --dtype bfloat16 # both sides in bf16 (AMX CPUs)
"""
from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from radixserve.benchmarks.common import (
    bar_plot,
    command_line,
    load_average,
    median,
    print_summary,
    spread,
    write_result,
)
from radixserve.benchmarks.profile_hit import linears_alone
from radixserve.benchmarks.workloads import override
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.default_models import resolve_model

_DTYPE_LABEL = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class PrefixBenchConfig:
    model: str = "small-llama"
    dtype: str = "float32"  # of the engine and of transformers alike
    repeats: int = 5
    prefill_len: int = 2048
    hit_prefix_len: int = 2048
    hit_suffix_len: int = 32
    shared_groups: int = 8
    shared_questions: int = 16
    shared_prefix_len: int = 1024
    shared_suffix_len: int = 64
    shared_output_len: int = 32
    distinct_prompts: int = 32
    distinct_prompt_len: int = 512
    distinct_output_len: int = 32
    no_sharing_repeats: int = 6  # pairs, the order alternating: the cost is ~1% against a few % of noise
    batching_requests: int = 48
    batching_prompt_range: tuple[int, int] = (32, 512)
    batching_output_range: tuple[int, int] = (16, 256)
    hf_batch_sizes: tuple[int, ...] = (8, 16)
    workload_repeats: int = 3
    decode_batches: tuple[int, ...] = (1, 8, 32)
    decode_prompt_len: int = 64
    decode_output_len: int = 32
    decode_hf_batch_sizes: tuple[int, ...] = (16, 32)
    max_num_seqs: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_LABEL:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_LABEL)}, got {self.dtype!r}")


QUICK = PrefixBenchConfig(model="tiny-llama", repeats=2, prefill_len=256, hit_prefix_len=256, hit_suffix_len=16,
                          shared_groups=2, shared_questions=4, shared_prefix_len=128, shared_suffix_len=16,
                          shared_output_len=8, distinct_prompts=6, distinct_prompt_len=64, distinct_output_len=8,
                          batching_requests=8, batching_prompt_range=(8, 64), batching_output_range=(4, 24),
                          hf_batch_sizes=(4,), workload_repeats=1, no_sharing_repeats=2, decode_batches=(1, 4), decode_prompt_len=16,
                          decode_output_len=8, decode_hf_batch_sizes=(4,))


class Bench:
    def __init__(self, cfg: PrefixBenchConfig, cache_dir: str | None):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.model_dir = resolve_model(cfg.model, cache_dir)
        max_len = max(cfg.prefill_len, cfg.hit_prefix_len + cfg.hit_suffix_len) + 64
        common = dict(max_model_len=max(max_len, 1024), max_num_seqs=cfg.max_num_seqs, dtype=cfg.dtype)
        self.on = LLM(str(self.model_dir), enable_prefix_caching=True, **common)
        self.off = LLM(str(self.model_dir), enable_prefix_caching=False, **common)
        self.vocab = self.on.engine.arch.vocab_size
        self._hf = None

    @property
    def hf(self):
        if self._hf is None:
            from transformers import AutoModelForCausalLM
            self._hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.cfg.dtype)).eval()
        return self._hf

    def tokens(self, n: int) -> list[int]:
        # Ordinary (non-special) token ids; random ids keep every prompt distinct.
        return [self.rng.randrange(10, self.vocab - 32) for _ in range(n)]

    @staticmethod
    def ttft(llm: LLM, prompt: list[int]) -> float:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1))[0]
        return out.metrics.ttft

    @torch.inference_mode()
    def hf_forward(self, ids: list[int], past=None) -> float:
        x = torch.tensor([ids])
        start = time.perf_counter()
        self.hf(x, past_key_values=past, logits_to_keep=1)
        return time.perf_counter() - start

    # -- sections ------------------------------------------------------------------------

    def prefill(self) -> dict:
        prompt = self.tokens(self.cfg.prefill_len)
        self.ttft(self.off, prompt[:64])  # warm up both sides
        self.hf_forward(prompt[:64])
        ours, hf, load = [], [], []
        for _ in range(self.cfg.repeats):  # interleaved, so drift hits both alike
            ours.append(self.ttft(self.off, prompt))
            hf.append(self.hf_forward(prompt))
            load.append(load_average()[:1])
        # min over repeats: on a shared 2-core VM the spread between runs (~25%)
        # is noise from outside; the fastest run is each side's real capability.
        return {"engine_ttft_s": ours, "hf_forward_s": hf, "load_1m": load, "engine": spread(ours), "hf": spread(hf),
                "ratio_engine_over_hf": min(ours) / min(hf), "ratio_of_medians": median(ours) / median(hf)}

    @torch.inference_mode()
    def prefix_hit(self) -> dict:
        cfg = self.cfg
        prefix = self.tokens(cfg.hit_prefix_len)
        suffixes = [self.tokens(cfg.hit_suffix_len) for _ in range(cfg.repeats + 1)]
        self.ttft(self.on, prefix + suffixes[0])  # caches the prefix
        out = self.hf(torch.tensor([prefix]), use_cache=True)
        miss, hit, hf_full, hf_suffix, linears, load = [], [], [], [], [], []
        for s in suffixes[1:]:  # interleaved, so drift on a shared machine hits every side alike
            miss.append(self.ttft(self.off, prefix + s))
            hit.append(self.ttft(self.on, prefix + s))
            hf_full.append(self.hf_forward(prefix + s))
            hf_suffix.append(self.hf_forward(s, copy.deepcopy(out.past_key_values)))
            linears.append(linears_alone(self.on, cfg.hit_suffix_len))
            load.append(load_average()[:1])
        return {"miss_ttft_s": miss, "hit_ttft_s": hit, "hf_full_s": hf_full, "hf_reused_kv_s": hf_suffix,
                "linears_alone_s": linears, "load_1m": load,
                "miss": spread(miss), "hit": spread(hit), "hf_reuse": spread(hf_suffix), "linears": spread(linears),
                "speedup_engine": median(miss) / median(hit),
                "speedup_hf_reuse": median(hf_full) / median(hf_suffix),
                "engine_hit_over_hf_reuse": median(hit) / median(hf_suffix),
                "hit_over_linears_alone": median(hit) / median(linears)}

    def _run_workload(self, llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        elapsed = time.perf_counter() - start
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_per_s": out_tokens / elapsed,
                "requests_per_s": len(outs) / elapsed, "ttft_s": [o.metrics.ttft for o in outs],
                "cached_tokens": sum(o.num_cached_tokens for o in outs),
                "prompt_tokens": sum(len(p) for p in prompts)}

    def shared(self) -> dict:
        cfg = self.cfg
        params = SamplingParams(temperature=0, max_tokens=cfg.shared_output_len, ignore_eos=True)
        runs: dict[str, list] = {"cache_on": [], "cache_off": [], "load_1m": []}
        for _ in range(cfg.workload_repeats):  # fresh prefixes each time, interleaved on/off
            prompts = []
            for _ in range(cfg.shared_groups):
                prefix = self.tokens(cfg.shared_prefix_len)
                prompts += [prefix + self.tokens(cfg.shared_suffix_len) for _ in range(cfg.shared_questions)]
            runs["cache_on"].append(self._run_workload(self.on, prompts, [params] * len(prompts)))
            runs["cache_off"].append(self._run_workload(self.off, prompts, [params] * len(prompts)))
            runs["load_1m"].append(load_average()[:1])
        on = [r["elapsed_s"] for r in runs["cache_on"]]
        off = [r["elapsed_s"] for r in runs["cache_off"]]
        last = runs["cache_on"][-1]
        return {**runs, "on_elapsed": spread(on), "off_elapsed": spread(off),
                "throughput_ratio": median(off) / median(on), "hit_rate": last["cached_tokens"] / last["prompt_tokens"]}

    def no_sharing(self) -> dict:
        cfg = self.cfg
        params = SamplingParams(temperature=0, max_tokens=cfg.distinct_output_len, ignore_eos=True)
        runs: dict[str, list] = {"cache_on": [], "cache_off": [], "load_1m": []}
        for i in range(cfg.no_sharing_repeats):  # fresh prompt sets, interleaved, on first every other pair
            prompts = [self.tokens(cfg.distinct_prompt_len) for _ in range(cfg.distinct_prompts)]
            for name in (("cache_on", "cache_off") if i % 2 == 0 else ("cache_off", "cache_on")):
                llm = self.on if name == "cache_on" else self.off
                runs[name].append(self._run_workload(llm, prompts, [params] * len(prompts)))
            runs["load_1m"].append(load_average()[:1])
        on = [r["elapsed_s"] for r in runs["cache_on"]]
        off = [r["elapsed_s"] for r in runs["cache_off"]]
        paired = [a / b for a, b in zip(on, off)]  # each pair ran the same prompts back to back
        return {**runs, "on_elapsed": spread(on), "off_elapsed": spread(off), "paired_on_over_off": spread(paired),
                "overhead": min(on) / min(off) - 1.0, "overhead_paired_median": median(paired) - 1.0}

    @torch.inference_mode()
    def _hf_static(self, prompts: list[list[int]], outs: list[int], batch: int) -> float:
        """transformers generate over static batches, sorted by prompt length to limit padding."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        start = time.perf_counter()
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):  # left padding, as decoder-only generation needs
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            new = max(outs[i] for i in idx)  # a static batch runs until its longest request is done
            self.hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    def batching(self) -> dict:
        cfg = self.cfg
        prompts = [self.tokens(self.rng.randint(*cfg.batching_prompt_range)) for _ in range(cfg.batching_requests)]
        outs = [self.rng.randint(*cfg.batching_output_range) for _ in range(cfg.batching_requests)]
        useful = sum(outs)
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs]
        ours, load = [], []
        hf: dict[str, list[float]] = {str(b): [] for b in cfg.hf_batch_sizes}
        for _ in range(cfg.workload_repeats):  # interleaved
            ours.append(self._run_workload(self.off, prompts, params)["elapsed_s"])
            for b in cfg.hf_batch_sizes:
                hf[str(b)].append(self._hf_static(prompts, outs, b))
            load.append(load_average()[:1])
        best = min(median(v) for v in hf.values())
        return {"engine_elapsed_s": ours, "hf_static_elapsed_s": hf, "load_1m": load, "engine": spread(ours),
                "hf": {b: spread(v) for b, v in hf.items()}, "useful_output_tokens": useful,
                "engine_tok_per_s": useful / median(ours), "hf_best_tok_per_s": useful / best,
                "ratio": best / median(ours)}

    def _tpot(self, prompts: list[list[int]]) -> tuple[float, float, float]:
        """(median TPOT over the batch, output tokens/s of the whole call, the last first token's
        time: the batch's prefill), all sequences decoding together."""
        n = self.cfg.decode_output_len
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outs = self.off.generate([{"prompt_token_ids": p} for p in prompts], params)
        elapsed = time.perf_counter() - start
        return (median([(o.metrics.e2e - o.metrics.ttft) / (n - 1) for o in outs]), len(prompts) * n / elapsed,
                max(o.metrics.ttft for o in outs))

    def decode(self) -> dict:
        cfg = self.cfg
        weights = weight_bytes(self.off)
        bw, load = [], []
        tpot: dict[str, list[float]] = {str(b): [] for b in cfg.decode_batches}
        tok_s: dict[str, list[float]] = {str(b): [] for b in cfg.decode_batches}
        hf: dict[str, list[float]] = {str(b): [] for b in cfg.decode_hf_batch_sizes}
        big, n = max(cfg.decode_batches), cfg.decode_output_len
        prefill, hf_prefill, hf_step = [], [], []  # the batch of ``big``: its prefill, transformers' decode step
        for _ in range(cfg.repeats):  # interleaved: bandwidth, every batch size, transformers
            bw.append(read_bandwidth())
            for b in cfg.decode_batches:
                t, r, first = self._tpot([self.tokens(cfg.decode_prompt_len) for _ in range(b)])
                tpot[str(b)].append(t)
                tok_s[str(b)].append(r)
                if b == big:
                    prefill.append(first)
            prompts = [self.tokens(cfg.decode_prompt_len) for _ in range(big)]
            elapsed = {hb: self._hf_static(prompts, [n] * big, hb) for hb in cfg.decode_hf_batch_sizes}
            for hb, e in elapsed.items():
                hf[str(hb)].append(big * n / e)
            # transformers' step at batch ``big``: generate n tokens less generate 1 (its prefill), per step
            full = elapsed[big] if big in elapsed else self._hf_static(prompts, [n] * big, big)
            hf_prefill.append(self._hf_static(prompts, [1] * big, big))
            hf_step.append((full - hf_prefill[-1]) / (n - 1))
            load.append(load_average()[:1])
        floor = weights / max(bw)  # the machine's capability: its best streaming rate
        hf_best = max(median(v) for v in hf.values())
        return {"weight_bytes": weights, "read_bandwidth_bytes_per_s": bw, "bandwidth": spread(bw),
                "tpot_floor_s": floor, "tpot_s": tpot, "tok_per_s": tok_s, "hf_tok_per_s": hf, "load_1m": load,
                "tpot": {b: spread(v) for b, v in tpot.items()},
                "tpot_over_floor": {b: median(v) / floor for b, v in tpot.items()},
                "tpot_min_over_floor": {b: min(v) / floor for b, v in tpot.items()},
                "hf_best_tok_per_s": hf_best,
                f"batch{big}_tok_per_s_over_hf_best": median(tok_s[str(big)]) / hf_best,
                # the whole call splits into its prefill and its decode steps; each side by side
                f"batch{big}_prefill_s": prefill, f"hf_batch{big}_prefill_s": hf_prefill,
                f"hf_batch{big}_step_s": hf_step,
                f"batch{big}_prefill_engine_over_hf": median(prefill) / median(hf_prefill),
                f"batch{big}_step_hf_over_engine": median(hf_step) / median(tpot[str(big)])}


def weight_bytes(llm: LLM) -> int:
    """Bytes of weights one decode step reads: every linear layer and the LM head (not the embedding)."""
    model = llm.engine.executor.worker.runner.model
    lins = [lin.weight for layer in model.layers for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                             layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    return sum(w.numel() * w.element_size() for w in [*lins, model.lm_head.weight])


def read_bandwidth(mib: int = 512, repeats: int = 3) -> float:
    """Bytes/s this machine streams from memory: the best of ``repeats`` sums over a buffer
    larger than the caches report (a decode step reads its weights once, like this)."""
    buf = torch.ones(mib << 18)  # fp32: mib MiB
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * buf.element_size() / best


SECTIONS = ("prefill", "prefix_hit", "shared", "no_sharing", "batching", "decode")


def summarize(m: dict) -> dict:
    s = {}
    if "prefill" in m:
        s["prefill_ttft_engine_over_hf"] = m["prefill"]["ratio_engine_over_hf"]
    if "prefix_hit" in m:
        s["prefix_hit_speedup"] = m["prefix_hit"]["speedup_engine"]
        s["hf_reuse_speedup"] = m["prefix_hit"]["speedup_hf_reuse"]
        s["hit_ttft_engine_over_hf_reuse"] = m["prefix_hit"]["engine_hit_over_hf_reuse"]
        s["hit_ttft_over_linears_alone"] = m["prefix_hit"]["hit_over_linears_alone"]
    if "shared" in m:
        s["shared_prefix_throughput_on_over_off"] = m["shared"]["throughput_ratio"]
        s["shared_prefix_hit_rate"] = m["shared"]["hit_rate"]
    if "no_sharing" in m:
        s["no_sharing_overhead"] = m["no_sharing"]["overhead"]
        if "overhead_paired_median" in m["no_sharing"]:
            s["no_sharing_overhead_paired_median"] = m["no_sharing"]["overhead_paired_median"]
    if "batching" in m:
        s["continuous_batching_over_hf_static"] = m["batching"]["ratio"]
    if "decode" in m:
        d = m["decode"]
        for b, r in d["tpot_over_floor"].items():
            s[f"decode_tpot_b{b}_over_bandwidth_floor"] = r
        s.update({k: v for k, v in d.items() if k.endswith(("_over_hf_best", "_engine_over_hf", "_hf_over_engine"))})
    return s


TARGETS = {"prefill_ttft_engine_over_hf": 1.0, "prefix_hit_speedup": 30.0, "hit_ttft_engine_over_hf_reuse": 0.8,
           "hit_ttft_over_linears_alone": 1.5, "shared_prefix_throughput_on_over_off": 3.0,
           "continuous_batching_over_hf_static": 1.5, "decode_tpot_b1_over_bandwidth_floor": 1.5,
           "batch32_tok_per_s_over_hf_best": 1.5}


def plot(summary: dict, path: Path, dtype: str = "float32") -> Path:
    rows = [(k.replace("_", "\n", 2), v, TARGETS.get(k)) for k, v in summary.items()
            if k not in ("no_sharing_overhead", "no_sharing_overhead_paired_median", "shared_prefix_hit_rate")]
    title = f"radixserve prefix caching, ratios measured side by side (CPU {_DTYPE_LABEL[dtype]})"
    return bar_plot(path, title, rows, "ratio")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on tiny-llama (seconds)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPE_LABEL),
                   help="engine and transformers dtype (default float32; bfloat16 is fast on AMX CPUs)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a PrefixBenchConfig field, e.g. prefill_len=1024 (repeatable), to size a run")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else PrefixBenchConfig()
    if args.model:
        cfg = PrefixBenchConfig(**{**asdict(cfg), "model": args.model})
    if args.dtype:
        cfg = PrefixBenchConfig(**{**asdict(cfg), "dtype": args.dtype})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set wants FIELD=VALUE, got {item!r}")
        cfg = override(cfg, key, value)
    torch.manual_seed(cfg.seed)
    bench = Bench(cfg, args.cache_dir)
    measurements = {}
    sections = [s for s in args.sections.split(",") if s]
    for name in tqdm(sections, desc="bench_prefix"):
        measurements[name] = getattr(bench, name)()
        tqdm.write(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in summarize({name: measurements[name]}).items()))
    summary = summarize(measurements)
    # Another model than the default gets its own name, so it never shadows the default's result in the report.
    default = (QUICK if args.quick else PrefixBenchConfig()).model
    # So does another dtype than fp32.
    suite = ("prefix" + (f"-{Path(cfg.model).name}" if cfg.model != default else "")
             + (f"-{_DTYPE_LABEL[cfg.dtype]}" if cfg.dtype != "float32" else "") + ("-quick" if args.quick else ""))
    path = write_result(suite, asdict(cfg), measurements, summary, Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_prefix", argv))
    plot(summary, path.with_suffix(".png"), cfg.dtype)
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
