"""fp32 against bf16 on CPU, for the engine and for transformers alike, in one run.

Speed (bench_prefix's own sections, one repeat per dtype per round, the dtype order
alternating round by round so drift hits both alike):
  prefill     TTFT of an N-token prompt (cache off) / transformers forward
  prefix_hit  TTFT of prefix + suffix on a full hit / transformers reusing past_key_values
  decode      TPOT at batch 1 and 32, tokens/s of the batch-32 call (its prefill included)
              / transformers generate on one static batch of 32

Accuracy of bf16 against fp32 on a few prompts (greedy, EOS ignored):
  the fp32 engine's greedy continuation C of each prompt is scored teacher-forced
  (prompt logprobs of prompt + C) in each dtype, by the engine and by transformers:
  max |logprob difference| over every position, and how often the two dtypes' argmax
  agree; free-running, how many of bf16's greedy tokens match fp32's before the first
  divergence. Random-weight models (small-llama) have flat next-token distributions, so
  their argmax flips at the smallest rounding; a real model (smollm2) says more.

    python -m radixserve.benchmarks.bench_dtype                       # small-llama, 3 rounds
    python -m radixserve.benchmarks.bench_dtype --accuracy-model smollm2
    python -m radixserve.benchmarks.bench_dtype --quick               # seconds, tiny-llama (smoke test)
"""
from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from radixserve.benchmarks.bench_prefix import QUICK, Bench, PrefixBenchConfig
from radixserve.benchmarks.common import (
    bar_plot,
    command_line,
    load_average,
    median,
    print_summary,
    spread,
    write_result,
)
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.default_models import resolve_model

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class DtypeBenchConfig:
    rounds: int = 3
    accuracy_prompts: int = 6
    accuracy_prompt_len: int = 48
    accuracy_output_len: int = 32


QUICK_DTYPE = DtypeBenchConfig(rounds=1, accuracy_prompts=2, accuracy_prompt_len=12, accuracy_output_len=6)


def prefix_config(quick: bool, model: str | None) -> PrefixBenchConfig:
    base = QUICK if quick else PrefixBenchConfig()
    big = max(base.decode_batches)
    cfg = replace(base, repeats=1, decode_batches=(1, big), decode_hf_batch_sizes=(big,))
    return replace(cfg, model=model) if model else cfg


# -- speed -----------------------------------------------------------------------------


def one_round(bench: Bench) -> dict[str, float]:
    """One repeat of each timed section: raw seconds and tokens/s."""
    big = str(max(bench.cfg.decode_batches))
    pre, hit, dec = bench.prefill(), bench.prefix_hit(), bench.decode()
    return {"prefill_ttft_s": pre["engine_ttft_s"][0], "hf_prefill_s": pre["hf_forward_s"][0],
            "hit_ttft_s": hit["hit_ttft_s"][0], "hf_hit_s": hit["hf_reused_kv_s"][0],
            "miss_ttft_s": hit["miss_ttft_s"][0], "linears_alone_s": hit["linears_alone_s"][0],
            "tpot_b1_s": dec["tpot_s"]["1"][0], f"tpot_b{big}_s": dec["tpot_s"][big][0],
            f"tok_per_s_b{big}": dec["tok_per_s"][big][0], f"hf_tok_per_s_b{big}": dec["hf_tok_per_s"][big][0],
            "load_1m": load_average()[0]}


def speed_summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    med = {dt: {k: median([r[k] for r in rs]) for k in rs[0]} for dt, rs in runs.items()}
    f, b = med["float32"], med["bfloat16"]
    big = next(k for k in f if k.startswith("tok_per_s_b"))[len("tok_per_s_b"):]
    s = {}
    for what, key, hf_key in (("prefill_ttft", "prefill_ttft_s", "hf_prefill_s"),
                              ("hit_ttft", "hit_ttft_s", "hf_hit_s")):
        s[f"{what}_bf16_over_fp32"] = b[key] / f[key]
        s[f"hf_{what}_bf16_over_fp32"] = b[hf_key] / f[hf_key]
        for dt, m in (("fp32", f), ("bf16", b)):
            s[f"{what}_engine_over_hf_{dt}"] = m[key] / m[hf_key]
    s["tpot_b1_bf16_over_fp32"] = b["tpot_b1_s"] / f["tpot_b1_s"]
    s[f"tpot_b{big}_bf16_over_fp32"] = b[f"tpot_b{big}_s"] / f[f"tpot_b{big}_s"]
    s[f"tok_per_s_b{big}_bf16_over_fp32"] = b[f"tok_per_s_b{big}"] / f[f"tok_per_s_b{big}"]
    s[f"hf_tok_per_s_b{big}_bf16_over_fp32"] = b[f"hf_tok_per_s_b{big}"] / f[f"hf_tok_per_s_b{big}"]
    for dt, m in (("fp32", f), ("bf16", b)):
        s[f"tok_per_s_b{big}_engine_over_hf_{dt}"] = m[f"tok_per_s_b{big}"] / m[f"hf_tok_per_s_b{big}"]
        s[f"hit_over_linears_alone_{dt}"] = m["hit_ttft_s"] / m["linears_alone_s"]
        s[f"miss_over_hit_{dt}"] = m["miss_ttft_s"] / m["hit_ttft_s"]
    return s


# -- accuracy --------------------------------------------------------------------------


def _engine_scores(llm: LLM, seq: list[int]) -> tuple[list[float], list[int]]:
    """Teacher-forced logprob of every token of ``seq`` after the first, and each position's argmax."""
    out = llm.generate([{"prompt_token_ids": seq}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
    lps, top = [], []
    for tok, pos in zip(seq[1:], out.prompt_logprobs[1:]):
        lps.append(pos[tok].logprob)
        top.append(next(t for t, lp in pos.items() if lp.rank == 1))
    return lps, top


@torch.inference_mode()
def _hf_scores(hf, seq: list[int]) -> tuple[list[float], list[int]]:
    logits = hf(torch.tensor([seq])).logits[0, :-1].float()  # [len - 1, vocab]
    lp = logits.log_softmax(-1)
    tgt = torch.tensor(seq[1:])
    return lp.gather(1, tgt[:, None]).squeeze(1).tolist(), lp.argmax(-1).tolist()


def _greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _agree_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _compare(a: tuple[list[float], list[int]], b: tuple[list[float], list[int]]) -> dict[str, float]:
    diffs = [abs(x - y) for x, y in zip(a[0], b[0])]
    return {"max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "argmax_agreement": sum(x == y for x, y in zip(a[1], b[1])) / len(a[1])}


def accuracy(engines: dict[str, LLM], hfs: dict[str, object], prompts: list[list[int]], n: int) -> dict:
    """bf16 against fp32 (engine, transformers) and the engine against transformers in each dtype."""
    conts = _greedy(engines["float32"], prompts, n)
    bf16_conts = _greedy(engines["bfloat16"], prompts, n)
    rows = []
    for p, c, cb in zip(prompts, conts, bf16_conts):
        seq = p + c
        eng = {dt: _engine_scores(engines[dt], seq) for dt in DTYPES}
        hf = {dt: _hf_scores(hfs[dt], seq) for dt in DTYPES}
        rows.append({"greedy_tokens_agreeing": _agree_prefix(c, cb), "greedy_tokens": n,
                     "engine_bf16_vs_fp32": _compare(eng["bfloat16"], eng["float32"]),
                     "hf_bf16_vs_fp32": _compare(hf["bfloat16"], hf["float32"]),
                     "engine_vs_hf_fp32": _compare(eng["float32"], hf["float32"]),
                     "engine_vs_hf_bf16": _compare(eng["bfloat16"], hf["bfloat16"])})
    summary = {"greedy_sequences_identical": sum(r["greedy_tokens_agreeing"] == n for r in rows) / len(rows),
               "greedy_tokens_before_divergence_mean": sum(r["greedy_tokens_agreeing"] for r in rows) / len(rows)}
    for key in ("engine_bf16_vs_fp32", "hf_bf16_vs_fp32", "engine_vs_hf_fp32", "engine_vs_hf_bf16"):
        summary[f"{key}_max_abs_logprob_diff"] = max(r[key]["max_abs_logprob_diff"] for r in rows)
        summary[f"{key}_argmax_agreement"] = sum(r[key]["argmax_agreement"] for r in rows) / len(rows)
    return {"per_prompt": rows, "summary": summary}


def _text_prompts(llm: LLM, count: int, length: int, rng: random.Random) -> list[list[int]]:
    """Prompts of ``length`` tokens cut from the packaged corpus (real text, for a trained model)."""
    from radixserve.engine.model.default_models import CORPUS_PATH
    ids = llm.get_tokenizer().encode(CORPUS_PATH.read_text(), add_special_tokens=False)
    starts = [rng.randrange(0, len(ids) - length) for _ in range(count)]
    return [ids[s:s + length] for s in starts]


def model_accuracy(model: str, dcfg: DtypeBenchConfig, cache_dir: str | None, rng: random.Random) -> dict:
    from transformers import AutoModelForCausalLM
    path = str(resolve_model(model, cache_dir))
    engines = {dt: LLM(path, enable_prefix_caching=False, dtype=dt, max_model_len=1024) for dt in DTYPES}
    hfs = {dt: AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dt)).eval() for dt in DTYPES}
    prompts = _text_prompts(engines["float32"], dcfg.accuracy_prompts, dcfg.accuracy_prompt_len, rng)
    return accuracy(engines, hfs, prompts, dcfg.accuracy_output_len)


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on tiny-llama (seconds)")
    p.add_argument("--model", default=None, help="the speed sections' model (default: small-llama)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--accuracy-model", action="append", default=None,
                   help="also score bf16 against fp32 on this model, on corpus text (repeatable; e.g. smollm2)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    dcfg = QUICK_DTYPE if args.quick else DtypeBenchConfig()
    if args.rounds:
        dcfg = replace(dcfg, rounds=args.rounds)
    cfg = prefix_config(args.quick, args.model)
    torch.manual_seed(cfg.seed)
    benches = {dt: Bench(replace(cfg, dtype=dt), args.cache_dir) for dt in DTYPES}
    runs: dict[str, list[dict[str, float]]] = {dt: [] for dt in DTYPES}
    for r in tqdm(range(dcfg.rounds), desc="bench_dtype rounds"):
        for dt in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
            runs[dt].append(one_round(benches[dt]))
    summary = speed_summary(runs)
    rng = random.Random(cfg.seed)
    acc_prompts = _text_prompts(benches["float32"].off, dcfg.accuracy_prompts, dcfg.accuracy_prompt_len, rng)
    measurements = {"speed_runs": runs,
                    "speed": {dt: {k: spread([r[k] for r in rs]) for k in rs[0]} for dt, rs in runs.items()},
                    "accuracy": {cfg.model: accuracy({dt: b.off for dt, b in benches.items()},
                                                     {dt: b.hf for dt, b in benches.items()},
                                                     acc_prompts, dcfg.accuracy_output_len)}}
    for model in args.accuracy_model or []:
        measurements["accuracy"][model] = model_accuracy(model, dcfg, args.cache_dir, rng)
    for model, acc in measurements["accuracy"].items():
        summary.update({f"accuracy_{Path(model).name}_{k}": v for k, v in acc["summary"].items()})
    suite = "dtype" + ("-quick" if args.quick else "")
    path = write_result(suite, {**asdict(cfg), **asdict(dcfg)}, measurements, summary,
                        Path(args.out_dir) if args.out_dir else None, command_line("radixserve.benchmarks.bench_dtype", argv))
    rows = [(k.replace("_", "\n", 2), v, 1.0) for k, v in summary.items() if "_over_" in k]
    bar_plot(path.with_suffix(".png"), "CPU bf16 against fp32, engine and transformers side by side", rows, "ratio")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
