"""Benchmark the attention kernels; write JSON and a PNG plot to benchmarks/results/.

On a CUDA GPU:
  * paged decode attention (batch 64, context 4096, 32 heads / 8 kv heads, head_dim 128,
    bf16): time and achieved memory bandwidth (K/V bytes read / time) as a fraction of
    (a) the datasheet peak looked up by device name and (b) the practical peak measured
    by a large device-to-device copy;
  * prefix prefill vs torch SDPA on the same data unpaged (and flash-attn / FlashInfer
    when importable).
On every machine (the only numbers without a GPU): the CPU fp32 torch references,
which are the engine's CPU path, against plain SDPA on the same unpaged data, i.e. the
cost of paging on CPU. Without CUDA the JSON records ``"gpu": null`` and the reason;
no GPU number is ever estimated.

    python -m radixserve.benchmarks.bench_kernels            # run, write JSON + PNG
    python -m radixserve.benchmarks.bench_kernels --plot-only benchmarks/results/kernels-cpu-2026-01-01.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from radixserve.benchmarks.common import RESULTS_DIR, command_line, cpu_model, env_info
from radixserve.kernels.paged_decode import paged_decode_attention_ref
from radixserve.kernels.prefix_prefill import prefix_prefill_attention_ref

# Datasheet peak DRAM bandwidth in GB/s, matched against torch.cuda.get_device_name().
PEAK_BANDWIDTH_GBPS = [
    (r"H200", 4800.0),
    (r"H100.*(SXM|HBM3)", 3350.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),
    (r"A100.*80GB", 2039.0),
    (r"A100", 1555.0),
    (r"L40S", 864.0),
    (r"L4", 300.0),
    (r"A10G", 600.0),
    (r"RTX 4090", 1008.0),
    (r"V100", 900.0),
    (r"T4", 320.0),
]


# ------------------------------------------------------------------------- common

def make_paged(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: str, gen: torch.Generator):
    """Random paged K/V with shuffled block ids, plus the same data dense.

    Returns k_cache, v_cache [num_blocks, block_size, Hkv, D], block_tables [S, max_blocks]
    int32 (-1 padded), and dense k, v lists of [seq_len, Hkv, D].
    """
    blocks = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(seq_lens), max(blocks)), -1, dtype=torch.int32)
    dense_k, dense_v, used = [], [], 0
    for s, n in enumerate(seq_lens):
        ids = order[used:used + blocks[s]]
        used += blocks[s]
        table[s, :blocks[s]] = ids.int()
        ids = ids.to(device)
        dense_k.append(k_cache[ids].flatten(0, 1)[:n])
        dense_v.append(v_cache[ids].flatten(0, 1)[:n])
    return k_cache, v_cache, table.to(device), dense_k, dense_v


def time_cpu_pair(paged: Callable[[], object], dense: Callable[[], object], repeat: int) -> tuple[dict, dict]:
    """Time two functions interleaved, so background load affects both alike."""
    paged(), dense()
    times = {"paged": [], "dense": []}
    for _ in range(repeat):
        for name, fn in (("paged", paged), ("dense", dense)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return tuple({"median_ms": statistics.median(t), "min_ms": min(t)} for t in times.values())


def bottom_right_causal_mask(new_len: int, total_len: int, device) -> torch.Tensor:
    rows = torch.arange(total_len - new_len, total_len, device=device)
    return torch.arange(total_len, device=device)[None, :] <= rows[:, None]  # [new, total]


# ------------------------------------------------------------------ CPU references

def cpu_reference_cases(repeat: int, gen: torch.Generator) -> list[dict]:
    """fp32 CPU: the paged references vs one plain SDPA call on the same unpaged data."""
    results = []
    heads, kv_heads, head_dim, block_size = 16, 4, 64, 16
    scale = head_dim ** -0.5
    cases = [
        ("decode 32 seqs x 1024 ctx", "decode", [1024] * 32, None),
        ("prefill 2048 tokens, no prefix", "prefill", [2048], 0),
        ("prefill 32 new tokens over a 2048 prefix", "prefill", [2048 + 32], 2048),
    ]
    for name, kind, seq_lens, prefix in tqdm(cases, desc="cpu reference"):
        k_cache, v_cache, table, dense_k, dense_v = make_paged(seq_lens, kv_heads, head_dim, block_size,
                                                               torch.float32, "cpu", gen)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        k = torch.stack(dense_k).transpose(1, 2).contiguous()  # [S, Hkv, T, D] unpaged
        v = torch.stack(dense_v).transpose(1, 2).contiguous()
        if kind == "decode":
            q = torch.randn(len(seq_lens), heads, head_dim, generator=gen)

            def paged():
                return paged_decode_attention_ref(q, k_cache, v_cache, table, lens, scale)

            def dense():
                return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
        else:
            new_len = seq_lens[0] - prefix
            q = torch.randn(new_len, heads, head_dim, generator=gen)
            new_k, new_v = dense_k[0][prefix:], dense_v[0][prefix:]
            starts = torch.tensor([0, new_len], dtype=torch.int32)
            mask = bottom_right_causal_mask(new_len, seq_lens[0], "cpu")
            qh = q.transpose(0, 1)[None]  # [1, H, new, D]

            def paged():
                return prefix_prefill_attention_ref(q, new_k, new_v, k_cache, v_cache, table, starts, lens, scale)

            def dense():
                if prefix == 0:
                    return F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
                return F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        paged_t, dense_t = time_cpu_pair(paged, dense, repeat)
        results.append({
            "name": name, "seq_lens": f"{len(seq_lens)} x {seq_lens[0]}", "prefix_len": prefix,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "block_size": block_size,
            "dtype": "float32", "paged_reference": paged_t, "dense_sdpa": dense_t,
            "paging_overhead": paged_t["median_ms"] / dense_t["median_ms"],
        })
    return results


# --------------------------------------------------------------------------- GPU

def peak_bandwidth_from_table(name: str) -> float | None:
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(pattern, name):
            return gbps
    return None


def measured_copy_bandwidth(device: str) -> float:
    """Practical peak: a 1 GiB device-to-device copy (reads + writes), GB/s."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def gpu_decode(device: str, gen: torch.Generator, batch: int = 64, ctx: int = 4096) -> dict:
    from triton.testing import do_bench

    from radixserve.kernels.paged_decode import default_num_splits, paged_decode_attention

    heads, kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    scale = head_dim ** -0.5
    k_cache, v_cache, table, dense_k, dense_v = make_paged([ctx] * batch, kv_heads, head_dim, block_size, dtype,
                                                           device, gen)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype).to(device)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * k_cache.element_size()
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    result = {"batch": batch, "context": ctx, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "block_size": block_size, "dtype": "bfloat16", "kv_bytes": kv_bytes,
              "heuristic_num_splits": default_num_splits(batch, kv_heads, table.shape[1] * block_size, num_sms),
              "triton": {}}
    for splits in tqdm([None, 1, 2, 4, 8], desc="gpu decode"):
        ms = do_bench(lambda: paged_decode_attention(q, k_cache, v_cache, table, lens, scale, num_splits=splits))
        result["triton"][str(splits or "heuristic")] = {"ms": ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9}
    k = torch.stack(dense_k).transpose(1, 2).contiguous()  # [S, Hkv, T, D]
    v = torch.stack(dense_v).transpose(1, 2).contiguous()
    ms = do_bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True))
    result["dense_sdpa"] = {"ms": ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9}
    result["flash_attn"] = optional(lambda: flash_attn_decode(q, k, v, scale, kv_bytes))
    result["flashinfer"] = optional(lambda: flashinfer_decode(q, k_cache, v_cache, table, lens, scale, kv_bytes))
    return result


def flash_attn_decode(q, k, v, scale, kv_bytes) -> dict:
    from flash_attn import flash_attn_with_kvcache
    from triton.testing import do_bench

    k_bshd, v_bshd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [S, T, Hkv, D]
    ms = do_bench(lambda: flash_attn_with_kvcache(q[:, None], k_bshd, v_bshd, softmax_scale=scale))
    return {"ms": ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9, "note": "unpaged KV"}


def flashinfer_decode(q, k_cache, v_cache, table, lens, scale, kv_bytes) -> dict:
    import flashinfer
    from triton.testing import do_bench

    batch, block_size = table.shape[0], k_cache.shape[1]
    pages = lens.long().add(block_size - 1).div(block_size, rounding_mode="floor")
    indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)]).int()
    indices = torch.cat([table[s, :pages[s]] for s in range(batch)]).int()
    last_len = (lens - 1) % block_size + 1
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(indptr, indices, last_len.int(), q.shape[1], k_cache.shape[2], k_cache.shape[3], block_size,
                 sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
    ms = do_bench(lambda: wrapper.run(q, (k_cache, v_cache)))
    return {"ms": ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9, "note": "same paged cache"}


PREFILL_CASES = [("4 x 2048 new, no prefix", 4, 0, 2048), ("4 x 512 new over a 2048 prefix", 4, 2048, 512)]


def gpu_prefill(device: str, gen: torch.Generator, cases=PREFILL_CASES) -> list[dict]:
    from triton.testing import do_bench

    from radixserve.kernels.prefix_prefill import prefix_prefill_attention

    heads, kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    scale = head_dim ** -0.5
    results = []
    for name, num_seqs, prefix, new in tqdm(cases, desc="gpu prefill"):
        seq_lens = [prefix + new] * num_seqs
        k_cache, v_cache, table, dense_k, dense_v = make_paged(seq_lens, kv_heads, head_dim, block_size, dtype,
                                                               device, gen)
        q = torch.randn(num_seqs * new, heads, head_dim, generator=gen).to(dtype).to(device)
        k_new = torch.cat([d[prefix:] for d in dense_k])  # [num_tokens, Hkv, D]
        v_new = torch.cat([d[prefix:] for d in dense_v])
        starts = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=device) * new
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        flops = 4 * num_seqs * heads * head_dim * (new * prefix + new * (new + 1) / 2)  # causal QK^T + PV
        entry = {"name": name, "num_seqs": num_seqs, "prefix_len": prefix, "new_len": new, "heads": heads,
                 "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16", "flops": flops}
        ms = do_bench(lambda: prefix_prefill_attention(q, k_new, v_new, k_cache, v_cache, table, starts, lens, scale))
        entry["triton"] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
        # SDPA on the same data unpaged; K/V pre-expanded for GQA so the fused kernels apply.
        qh = q.view(num_seqs, new, heads, head_dim).transpose(1, 2)  # [S, H, new, D]
        group = heads // kv_heads
        kh = torch.stack(dense_k).transpose(1, 2).repeat_interleave(group, 1)  # [S, H, T, D]
        vh = torch.stack(dense_v).transpose(1, 2).repeat_interleave(group, 1)
        if prefix == 0:
            sdpa = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)  # noqa: E731
        else:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(new, prefix + new)
            sdpa = lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)  # noqa: E731
        ms = do_bench(sdpa)
        entry["dense_sdpa"] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
        entry["flash_attn"] = optional(lambda: flash_attn_prefill(q, dense_k, dense_v, new, scale, flops))
        results.append(entry)
    return results


def flash_attn_prefill(q, dense_k, dense_v, new, scale, flops) -> dict:
    from flash_attn import flash_attn_varlen_func
    from triton.testing import do_bench

    num_seqs, total = len(dense_k), dense_k[0].shape[0]
    cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device) * new
    cu_k = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device) * total
    k, v = torch.cat(dense_k), torch.cat(dense_v)
    # flash-attn >= 2.1 aligns causal masks bottom-right when seqlen_q < seqlen_k.
    ms = do_bench(lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, new, total, softmax_scale=scale, causal=True))
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "note": "unpaged KV"}


def optional(fn: Callable[[], dict]) -> dict | None:
    """Run a comparison against an optional library; record why it did not run."""
    try:
        return fn()
    except ImportError as e:
        return {"skipped": f"not importable: {e}"}
    except Exception as e:  # a third-party API mismatch must not lose the other numbers
        return {"skipped": f"{type(e).__name__}: {e}"}


def gpu_section(gen: torch.Generator) -> dict:
    device = "cuda"
    name = torch.cuda.get_device_name(device)
    table_peak = peak_bandwidth_from_table(name)
    measured_peak = measured_copy_bandwidth(device)
    decode = gpu_decode(device, gen)
    for entry in decode["triton"].values():
        entry["fraction_of_datasheet_peak"] = entry["gbps"] / table_peak if table_peak else None
        entry["fraction_of_measured_copy_peak"] = entry["gbps"] / measured_peak
    return {
        "name": name,
        "peak_bandwidth_gbps": {"datasheet": table_peak, "measured_d2d_copy": measured_peak,
                                "note": "datasheet: table in bench_kernels.py by device name (null if unknown); "
                                        "measured: 1 GiB device-to-device copy, bytes read + written"},
        "decode": decode,
        "prefill": gpu_prefill(device, gen),
    }


# --------------------------------------------------------------------------- plot

def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    panels = ["cpu"] + (["decode", "prefill"] if data["gpu"] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "cpu":
            runs = data["cpu_reference"]["runs"]
            names = [c["name"] for c in runs[0]["cases"]]
            width = 0.8 / (2 * len(runs))
            for r, run in enumerate(runs):
                for j, (key, label) in enumerate([("paged_reference", "paged reference"),
                                                  ("dense_sdpa", "dense SDPA")]):
                    offset = (2 * r + j + 0.5) * width - 0.4
                    ax.bar([i + offset for i in range(len(names))], [c[key]["median_ms"] for c in run["cases"]], width,
                           label=f"{label}, {run['threads']} thread(s)")
            ax.set_xticks(range(len(names)), [n.replace(", ", ",\n").replace(" over", "\nover") for n in names],
                          fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms (median, log scale)")
            ax.set_title("CPU fp32 reference timings (not GPU numbers)")
        elif panel == "decode":
            decode = data["gpu"]["decode"]
            labels = list(decode["triton"]) + ["dense SDPA"]
            gbps = [e["gbps"] for e in decode["triton"].values()] + [decode["dense_sdpa"]["gbps"]]
            ax.bar(labels, gbps)
            peaks = data["gpu"]["peak_bandwidth_gbps"]
            if peaks["datasheet"]:
                ax.axhline(peaks["datasheet"], color="r", ls="--", label="datasheet peak")
            ax.axhline(peaks["measured_d2d_copy"], color="g", ls=":", label="measured copy peak")
            ax.set_xlabel("num_splits")
            ax.set_ylabel("GB/s of K/V read")
            ax.set_title(f"paged decode, {decode['batch']} x {decode['context']} ({data['gpu']['name']})")
        else:
            entries = data["gpu"]["prefill"]
            x = range(len(entries))
            impls = ["triton", "dense_sdpa", "flash_attn"]
            for j, impl in enumerate(impls):
                ms = [e[impl]["ms"] if e.get(impl) and "ms" in e[impl] else 0 for e in entries]
                ax.bar([i + (j - 1) * 0.27 for i in x], ms, 0.27, label=impl)
            ax.set_xticks(list(x), [e["name"] for e in entries], fontsize=7)
            ax.set_ylabel("ms")
            ax.set_title("prefix prefill")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per CPU case")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 timed repeat, default thread count only, kernels-quick-* result")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cache-dir", help="accepted for a uniform suite interface; no model is loaded")
    parser.add_argument("--plot-only", type=Path, help="re-plot an existing JSON result")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads for the CPU timings, besides 1 (default: torch's default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.plot_only:
        print(plot(args.plot_only))
        return

    gen = torch.Generator().manual_seed(0)
    has_cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if has_cuda else "cpu"
    result = {
        "device": device_name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": command_line("radixserve.benchmarks.bench_kernels", argv),
        "env": env_info(),
        "gpu": gpu_section(gen) if has_cuda else None,
    }
    if not has_cuda:
        result["gpu_null_reason"] = "no CUDA device on this machine; GPU kernel numbers need one and are not estimated"
    result["cpu_reference"] = {
        "note": "CPU fp32 timings of the torch references (the engine's CPU path) vs one plain SDPA call on the "
                "same unpaged data; these are NOT GPU kernel numbers. Load averages are recorded because a "
                "shared machine skews multi-threaded timings.",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "runs": [],
    }
    default_threads = torch.get_num_threads()
    for threads in sorted({args.threads or default_threads} if args.quick else {1, args.threads or default_threads}):
        torch.set_num_threads(threads)
        run = {"threads": threads, "load_average_before": os.getloadavg(),
               "cases": cpu_reference_cases(args.repeat, gen)}
        run["load_average_after"] = os.getloadavg()
        result["cpu_reference"]["runs"].append(run)
    torch.set_num_threads(default_threads)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    suite = "kernels-quick" if args.quick else "kernels"
    result["suite"] = suite
    path = args.out_dir / f"{suite}-{slug}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2))
    print(path)
    print(plot(path))
    for run in result["cpu_reference"]["runs"]:
        for case in run["cases"]:
            print(f"{run['threads']} thread(s)  {case['name']:42s} paged {case['paged_reference']['median_ms']:8.2f} ms"
                  f"  dense {case['dense_sdpa']['median_ms']:8.2f} ms  x{case['paging_overhead']:.2f}")


if __name__ == "__main__":
    main()
