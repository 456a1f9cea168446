"""Where a full prefix hit's time goes (and a decode step's), by stage.

Runs the engine in-process on a cached prefix and times N hits (and decode steps)
under torch.profiler, with ranges placed around the engine's stages by wrapping
methods of this run's objects only (nothing in the engine is changed). Prints per
stage: linears (every F.linear but the LM head), attention (SDPA), KV gather
(index_select / cat / copies inside the attention backend), KV write, other model
ops (norms, RoPE, SiLU, residuals), LM head, sampling, input preparation, scheduling
+ output processing, and Python (wall time no torch op accounts for). Also times the
step's linears alone on the same weights, the compute floor the hit is measured
against.

    python -m radixserve.benchmarks.profile_hit                     # small-llama, 2048 cached + 32 new
    python -m radixserve.benchmarks.profile_hit --model smollm2 --prefix 1024
    python -m radixserve.benchmarks.profile_hit --cprofile          # plus the top Python functions
    python -m radixserve.benchmarks.profile_hit --threads 1         # steadier on a loaded machine
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from radixserve.benchmarks.common import load_average, median
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.default_models import resolve_model

# Profiler ranges, innermost wins; ops outside every range count as "engine/other".
_RANGES = ("schedule+outputs", "prepare_inputs", "model", "attention", "kv_write", "lm_head", "sampling")
_LINEAR_OPS = ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::_weight_int8pack_mm",
               "mkldnn::_linear_pointwise")
_KV_WRITE_OPS = ("aten::index_copy_", "aten::index_put_")
_SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")


def _wrap(obj, name: str, label: str) -> None:
    """Put ``obj.name`` (a bound method) inside a profiler range, on this object only."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def ranged(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    setattr(obj, name, ranged)


def instrument(llm: LLM) -> None:
    engine = llm.engine
    runner = engine.executor.worker.runner
    _wrap(engine.scheduler, "schedule", "schedule+outputs")
    _wrap(engine.scheduler, "update", "schedule+outputs")
    _wrap(engine.outputs, "process", "schedule+outputs")
    _wrap(runner, "_prepare", "prepare_inputs")
    _wrap(runner.model, "forward", "model")  # nn.Module.__call__ finds the instance attribute
    _wrap(runner.model, "compute_logits", "lm_head")
    _wrap(runner, "_sample", "sampling")
    for m in ("attend", "decode", "prefill"):
        _wrap(runner.backend, m, "attention")
    _wrap(runner.backend, "write_kv", "kv_write")


def _stage(rng: str, op: str) -> str:
    if rng == "model" and op in _LINEAR_OPS:
        return "linears"
    if rng == "attention":
        if op in _KV_WRITE_OPS:
            return "KV write"
        return "attention (SDPA)" if op in _SDPA_OPS else "KV gather / masks"
    return {"model": "other model ops", "kv_write": "KV write", "lm_head": "LM head", "sampling": "sampling",
            "prepare_inputs": "prepare inputs", "schedule+outputs": "schedule + outputs"}.get(rng, "engine/other")


def breakdown(prof) -> dict[str, float]:
    """Seconds per stage: each top-level op (no op above it) goes to its innermost range."""
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name in _RANGES:
            continue
        parent, rng = ev.cpu_parent, ""
        while parent is not None and parent.name not in _RANGES:
            parent = parent.cpu_parent
        if parent is not None:
            rng = parent.name
        above = ev.cpu_parent
        if above is not None and above.name not in _RANGES:
            continue  # counted inside the op that called it
        out[_stage(rng, ev.name)] += ev.cpu_time_total / 1e6
    return dict(out)


def linears_alone(llm: LLM, rows: int, repeats: int = 3) -> float:
    """Seconds for one step's linear layers alone (``rows`` tokens, one LM-head row): the same
    modules and weights the engine multiplies with, nothing else. Median of ``repeats``."""
    model = llm.engine.executor.worker.runner.model
    lins = [lin for layer in model.layers for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    dtype = model.lm_head.weight.dtype
    xs = [torch.randn(rows, lin.weight.shape[1], dtype=dtype) for lin in lins]
    h = torch.randn(1, model.lm_head.weight.shape[1], dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for lin, x in zip(lins, xs):
                lin(x)
            model.lm_head(h)
            times.append(time.perf_counter() - start)
    return median(times[1:])


def _fmt(stages: dict[str, float], wall: float, n: int) -> str:
    lines = [f"  {'stage':<22}{'ms/step':>9}{'share':>8}"]
    accounted = sum(stages.values())
    rows = sorted(stages.items(), key=lambda kv: -kv[1]) + [("Python (unaccounted)", max(0.0, wall - accounted))]
    for name, s in rows:
        lines.append(f"  {name:<22}{1e3 * s / n:>9.2f}{s / wall:>8.1%}")
    lines.append(f"  {'total (profiled wall)':<22}{1e3 * wall / n:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small-llama")
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-batch", type=int, default=8, help="sequences decoding together in the decode profile")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--cprofile", action="store_true", help="also print the top functions by own time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 keeps a loaded shared machine's noise down")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    model_dir = resolve_model(args.model, args.cache_dir)
    llm = LLM(str(model_dir), enable_prefix_caching=True, max_model_len=args.prefix + args.suffix + 64 + args.decode_steps)
    vocab = llm.engine.arch.vocab_size

    def toks(n: int) -> list[int]:
        return [rng.randrange(10, vocab - 32) for _ in range(n)]

    prefix = toks(args.prefix)
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([{"prompt_token_ids": prefix + toks(args.suffix)}], one)  # caches the prefix, warms up

    def hits(n: int) -> list[float]:
        return [llm.generate([{"prompt_token_ids": prefix + toks(args.suffix)}], one)[0].metrics.ttft
                for _ in range(n)]

    plain = hits(args.repeats)  # unprofiled TTFT: the figure to compare with the breakdown
    floor = linears_alone(llm, args.suffix, args.repeats)
    instrument(llm)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        hits(args.repeats)
        wall = time.perf_counter() - start
    result = {"hit_ttft_s": plain, "linears_alone_s": floor, "hit_stages_s": breakdown(prof),
              "load_average": load_average()}
    print(f"full hit: {args.prefix} cached + {args.suffix} new tokens on {args.model}, "
          f"{torch.get_num_threads()} threads, load {load_average()}")
    print(f"  unprofiled TTFT median {1e3 * median(plain):.1f} ms (min {1e3 * min(plain):.1f}, max "
          f"{1e3 * max(plain):.1f}); linears alone {1e3 * floor:.1f} ms -> hit / linears = "
          f"{median(plain) / floor:.2f}x")
    print(_fmt(result["hit_stages_s"], wall, args.repeats))

    # Decode: a batch of sequences past their prefill, steps profiled together.
    decode = SamplingParams(temperature=0, max_tokens=args.decode_steps, ignore_eos=True)
    prompts = [{"prompt_token_ids": toks(args.suffix)} for _ in range(args.decode_batch)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        outs = llm.generate(prompts, decode)
        wall = time.perf_counter() - start
    steps = args.decode_steps
    result["decode_stages_s"] = breakdown(prof)
    print(f"decode: batch {args.decode_batch}, {steps} tokens each (the first step is the prefill); "
          f"e2e {1e3 * median([o.metrics.e2e for o in outs]):.0f} ms")
    print(_fmt(result["decode_stages_s"], wall, steps))

    if args.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        hits(args.repeats)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue())
    return result


if __name__ == "__main__":
    main()
