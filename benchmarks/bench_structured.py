"""Structured outputs: decode tokens/s constrained (JSON schema) vs unconstrained, and grammar compile times.

Batch 1 and 16, interleaved rounds in one run; the constrained requests follow
a JSON schema (an array of >= 200 small integers) that cannot end within
``output_len`` tokens, so both sides decode the same number of tokens. Compile
times are per schema of the structured-output tests, then the cache hit on a
repeat. The grammar's own cost per step (fill the bitmasks, mask the logits,
advance the matchers) is also timed alone and set against a plain step, which
holds on a loaded machine where whole-run tokens/s drift.

    python -m radixserve.benchmarks.bench_structured [--quick]
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from radixserve.benchmarks.common import bar_plot, command_line, median, percentile, print_summary, write_result
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.core.scheduler_output import SampleRow, SchedulerOutput
from radixserve.engine.model.default_models import resolve_model
from radixserve.engine.structured.mask import apply_grammar_mask
from radixserve.engine.structured.params import StructuredOutputsParams

LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 200}
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
     "required": ["a", "b"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "tag": {"enum": ["x", "y"]}}, "required": ["n", "tag"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 25, "maxItems": 30},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
     "required": ["city", "unit"], "additionalProperties": False},
]


@dataclass(frozen=True)
class StructuredBenchConfig:
    model: str = "small-llama"
    batches: tuple[int, ...] = (1, 16)
    output_len: int = 64
    prompt_len: int = 32
    rounds: int = 3
    seed: int = 0


QUICK = StructuredBenchConfig(model="tiny-llama", output_len=8, rounds=1)


def decode_rate(llm: LLM, prompts: list[list[int]], output_len: int, constrained: bool) -> float:
    so = StructuredOutputsParams(json=LONG, disable_any_whitespace=True) if constrained else None
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=output_len, ignore_eos=True, structured_outputs=so)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def mask_cost(llm: LLM, batch: int, reps: int) -> dict:
    """Per step, measured alone (robust on a loaded machine): the engine filling ``batch``
    bitmasks and accepting a token per row, and rank 0 masking the logits rows."""
    import torch

    from radixserve.engine.structured.xgrammar_backend import import_xgrammar
    xgr = import_xgrammar()
    compiled = llm.engine.structured.prepare(StructuredOutputsParams(json=LONG, disable_any_whitespace=True)).result()
    vocab = llm.engine.arch.vocab_size
    so = SchedulerOutput(step_id=0, sample_rows=[SampleRow(i, i) for i in range(batch)])
    fill, apply, accept = [], [], []
    for _ in range(reps):
        mgr = llm.engine.structured
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        mgr._matchers = {i: (None, m) for i, m in enumerate(matchers)}
        logits = torch.randn(batch, vocab)
        for _ in range(8):  # a few tokens into the array, as in decoding
            t0 = time.perf_counter()
            mask = mgr.fill_mask(so)
            t1 = time.perf_counter()
            apply_grammar_mask(logits, mask)
            t2 = time.perf_counter()
            tokens = logits.argmax(dim=-1).tolist()
            t3 = time.perf_counter()
            for m, t in zip(matchers, tokens):
                m.accept_token(t)
            t4 = time.perf_counter()
            fill.append(t1 - t0)
            apply.append(t2 - t1)
            accept.append(t4 - t3)
    llm.engine.structured._matchers = {}
    us = lambda xs: median(xs) * 1e6  # noqa: E731
    return {"fill_us": us(fill), "apply_us": us(apply), "accept_us": us(accept),
            "total_us": us(fill) + us(apply) + us(accept)}


def compile_times(llm: LLM) -> dict:
    mgr = llm.engine.structured
    mgr.prepare(StructuredOutputsParams(regex="warm-up")).result()  # imports xgrammar, builds the tokenizer info
    first, repeat = [], []
    for schema in SCHEMAS:
        for out in (first, repeat):
            so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
            start = time.perf_counter()
            mgr.prepare(so).result()
            out.append(time.perf_counter() - start)
    ms = lambda xs: {"p50_ms": median(xs) * 1e3, "p99_ms": percentile(xs, 0.99) * 1e3}  # noqa: E731
    return {"first": ms(first), "repeat": ms(repeat), "first_s": first, "repeat_s": repeat}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else StructuredBenchConfig()
    rng = random.Random(cfg.seed)
    llm = LLM(str(resolve_model(cfg.model, args.cache_dir)), max_model_len=512, log_stats_interval_s=0)
    m: dict = {"compile": compile_times(llm)}
    for batch in cfg.batches:
        prompts = [[rng.randrange(10, 2000) for _ in range(cfg.prompt_len)] for _ in range(batch)]
        decode_rate(llm, prompts[:1], 4, True)  # warm-up (and the LONG grammar compiled)
        rates: dict[str, list[float]] = {"plain": [], "json": []}
        for _ in range(cfg.rounds):  # interleaved, so drift hits both alike
            rates["plain"].append(decode_rate(llm, prompts, cfg.output_len, False))
            rates["json"].append(decode_rate(llm, prompts, cfg.output_len, True))
        m[f"batch{batch}"] = rates
        m[f"batch{batch}"]["mask"] = mask_cost(llm, batch, cfg.rounds * 5)
        step_s = batch / median(rates["plain"])  # one plain decode step
        m[f"batch{batch}"]["mask_over_step_pct"] = 100 * m[f"batch{batch}"]["mask"]["total_us"] * 1e-6 / step_s
    llm.shutdown()
    summary = {f"batch{b}_overhead_pct": 100 * (1 - median(m[f"batch{b}"]["json"]) / median(m[f"batch{b}"]["plain"]))
               for b in cfg.batches}
    summary |= {f"batch{b}_plain_tok_per_s": median(m[f"batch{b}"]["plain"]) for b in cfg.batches}
    summary |= {f"batch{b}_mask_us_per_step": m[f"batch{b}"]["mask"]["total_us"] for b in cfg.batches}
    summary |= {f"batch{b}_mask_over_plain_step_pct": m[f"batch{b}"]["mask_over_step_pct"] for b in cfg.batches}
    summary |= {"compile_p50_ms": m["compile"]["first"]["p50_ms"], "compile_p99_ms": m["compile"]["first"]["p99_ms"],
                "cache_hit_p50_ms": m["compile"]["repeat"]["p50_ms"]}
    path = write_result("structured-quick" if args.quick else "structured", asdict(cfg), m, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_structured", argv))
    bar_plot(path.with_suffix(".png"), f"JSON-constrained decode overhead ({cfg.model})",
             [(f"batch {b} overhead %", summary[f"batch{b}_overhead_pct"], None) for b in cfg.batches]
             + [(f"batch {b} mask cost / step %", summary[f"batch{b}_mask_over_plain_step_pct"], None)
                for b in cfg.batches], "%")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
