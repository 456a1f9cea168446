"""Regenerate benchmarks/README.md from the newest result of each suite and device.

Reads ``benchmarks/results/*.json`` (smoke ``*-quick-*`` results are left out),
keeps the newest file per (suite, device), and writes a page with a table of
headline ratios, each naming the JSON ``summary`` key it is read from, the
file, and the command that produced the file; then one section per result
with its plot. When the project README holds the markers
``<!-- benchmarks:headline:begin -->`` and ``<!-- benchmarks:headline:end -->``,
the lines between them are replaced by the headline table too.

    python -m radixserve.benchmarks.report                   # rewrite benchmarks/README.md (+ README.md block)
    python -m radixserve.benchmarks.report --results-dir /tmp/r --output /tmp/r/README.md --readme ''
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from radixserve.benchmarks.common import RESULTS_DIR

BEGIN, END = "<!-- benchmarks:headline:begin -->", "<!-- benchmarks:headline:end -->"
_NAME = re.compile(r"^(?P<stem>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.json$")


@dataclass(frozen=True)
class Result:
    path: Path
    suite: str
    device: str
    date: str
    doc: dict

    @property
    def command(self) -> str:
        if self.doc.get("command"):
            # Files from before the package rename name the modules by their old top-level path.
            return re.sub(r"^python -m benchmarks\.", "python -m radixserve.benchmarks.", self.doc["command"])
        # Files from before commands were recorded: the suite's default invocation.
        return f"python -m radixserve.benchmarks.bench_{self.suite}  (inferred: this file predates recorded commands)"

    @property
    def commit(self) -> str:
        return (self.doc.get("env") or {}).get("git_commit") or "not recorded"


def load_results(results_dir: Path, include_quick: bool = False) -> list[Result]:
    """The newest result per (suite, device)."""
    newest: dict[tuple[str, str], Result] = {}
    for path in sorted(results_dir.glob("*.json")):
        r = _read(path)
        if r is None or (r.suite.endswith("-quick") and not include_quick):
            continue
        key = (r.suite, r.device)
        if key not in newest or (r.date, path.stat().st_mtime) > (newest[key].date, newest[key].path.stat().st_mtime):
            newest[key] = r
    return sorted(newest.values(), key=lambda r: (SUITE_ORDER.get(r.suite, SUITE_ORDER.get(r.suite.split("-")[0], 99)),
                                                  r.suite, r.device))


def _read(path: Path) -> Result | None:
    m = _NAME.match(path.name)
    if not m:
        return None
    doc = json.loads(path.read_text())
    suite = doc.get("suite") or _suite_from_stem(m["stem"])
    device = m["stem"][len(suite) + 1:] if m["stem"].startswith(suite + "-") else m["stem"]
    return Result(path, suite, device, m["date"], doc)


def _suite_from_stem(stem: str) -> str:
    """bench_kernels writes no "suite" field: its name is the first part, "-quick" included."""
    parts = stem.split("-")
    return "-".join(parts[:2]) if len(parts) > 2 and parts[1] == "quick" else parts[0]


# -- which figures each suite headlines ---------------------------------------------------------

SUITE_ORDER = {"workloads": 0, "peer": 1, "cluster": 1, "prefix": 2, "tier": 3, "tp": 4, "kernels": 5}


def _summary_table(result: Result, pattern: str = ".") -> list[str]:
    """Rows of ``summary`` key -> value."""
    rows = [(k, v) for k, v in (result.doc.get("summary") or {}).items()
            if isinstance(v, (int, float)) and re.search(pattern, k)]
    return ["| JSON `summary` key | value |", "|---|---|", *(f"| `{k}` | {_fmt(v)} |" for k, v in rows)]


def _matrix_table(result: Result, pattern: str) -> list[str]:
    """``summary`` keys named ``<workload>/<figure>`` as a workload x figure matrix."""
    summary = {k: v for k, v in (result.doc.get("summary") or {}).items() if "/" in k and re.search(pattern, k)}
    listed = (result.doc.get("config") or {}).get("workloads") or []
    rows = list(dict.fromkeys([w for w in listed if any(k.startswith(w + "/") for k in summary)] +
                              [k.split("/", 1)[0] for k in summary]))
    cols = list(dict.fromkeys(k.split("/", 1)[1] for k in summary))
    lines = ["| workload | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for w in rows:
        lines.append(f"| {w} | " + " | ".join(_fmt(summary.get(f"{w}/{c}")) for c in cols) + " |")
    return lines + ["", "Each cell is `summary['<workload>/<column>']` of the source file."]


def _kernels_table(result: Result) -> list[str]:
    lines = ["| JSON key | case | threads | paged reference / dense SDPA |", "|---|---|---|---|"]
    for i, run in enumerate((result.doc.get("cpu_reference") or {}).get("runs", [])):
        for j, case in enumerate(run["cases"]):
            lines.append(f"| `cpu_reference.runs[{i}].cases[{j}].paging_overhead` | {case['name']} | "
                         f"{run['threads']} | {_fmt(case['paging_overhead'])} |")
    return lines


_RATIOS = r"/(ttft_p50_speedup_vs_|throughput_gain_vs_|hit_rate_)"
HEADLINES: dict[str, Callable[[Result], list[str]]] = {
    "workloads": lambda r: _matrix_table(r, _RATIOS),
    "cluster": lambda r: _matrix_table(r, _RATIOS),
    "peer": lambda r: _matrix_table(r, _RATIOS),
    "kernels": _kernels_table,
}


# The figures the issues set targets for: (suite, summary key, what it measures, target).
KEY_FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("prefix", "prefill_ttft_engine_over_hf", "prefill TTFT, 2048 tokens: engine / HF forward", "<= 1"),
    ("prefix", "prefix_hit_speedup", "TTFT miss / full prefix hit (2048 cached + 32 new)", ">= 30"),
    ("prefix", "hit_ttft_engine_over_hf_reuse", "prefix-hit TTFT: engine / HF reusing past_key_values", "<= 0.8"),
    ("prefix", "hit_ttft_over_linears_alone", "prefix-hit TTFT / the same step's linear layers alone", "<= 1.5"),
    ("prefix", "decode_tpot_b1_over_bandwidth_floor", "decode TPOT, batch 1 / weight bytes over measured read "
     "bandwidth", "<= 1.5"),
    ("prefix", "batch32_tok_per_s_over_hf_best", "decode at batch 32: engine / HF generate's best static batch, "
     "tok/s", ">= 1.5"),
    ("prefix", "shared_prefix_throughput_on_over_off", "shared-prefix workload time, cache off / on", ">= 3"),
    ("prefix", "no_sharing_overhead", "all prompts distinct: cache on / off - 1", "<= 0.02"),
    ("prefix", "continuous_batching_over_hf_static", "mixed lengths: engine / HF static batches, tok/s", ">= 1.5"),
    ("peer", "shared_prefix@8u/ttft_p50_speedup_vs_transformers", "shared prefix over HTTP, 8 users: TTFT p50 "
     "transformers serve / radixserve", ">= 5"),
    ("peer", "shared_prefix@8u/throughput_gain_vs_transformers", "the same, output tok/s radixserve / "
     "transformers serve", ">= 2"),
    ("peer", "no_sharing@8u/ttft_p50_speedup_vs_transformers", "no sharing, 8 users: TTFT p50 transformers serve "
     "/ radixserve", ">= 1"),
    ("peer", "no_sharing@8u/throughput_gain_vs_transformers", "no sharing, 8 users: output tok/s radixserve / "
     "transformers serve", ">= 1"),
    ("tier", "sequential_gpu_cpu_over_gpu_only_speedup", "doc QA, working set 4x pool: GPU-only / GPU+CPU time, "
     "one request at a time", ">= 2"),
    ("tier", "batched_gpu_cpu_over_gpu_only_speedup", "the same, each round's questions submitted together", ">= 2"),
    ("tier", "cpu_hit_ttft_speedup_vs_miss", "TTFT miss / CPU-tier hit, 2048-token prefix", ">= 5"),
    ("tp", "tp2_over_tp1_tok_per_s", "TP=2 / TP=1 tokens/s (2 cores: reported, no target)", ""),
    ("tp", "queue_empty_step_p50_us", "engine-worker queue cost of a step, microseconds", ""),
    ("router-small-llama", "affinity_hit_over_oracle", "2 replicas over HTTP: prefix-affinity hit rate / oracle",
     ">= 0.95"),
    ("router-small-llama", "affinity_load_max_over_mean", "max / mean requests per replica", "<= 1.25"),
    ("router-small-llama", "affinity_ttft_p50_over_pow2", "TTFT p50: prefix affinity / pow2", "< 1"),
    ("router-trace", "trace_n8_hit_over_oracle", "simulator, Mooncake trace, 8 replicas: affinity hit rate / "
     "one-cache oracle", ">= 0.9"),
    ("router-trace", "trace_n8_load_max_over_mean", "the same: max / mean requests per replica", "<= 1.2"),
    ("router-trace", "trace_n8_hit_over_consistent_hash", "the same: hit rate affinity / consistent hashing", ">= 1"),
    ("router-trace", "trace_n8_ttft_p99_over_pow2", "the same: TTFT p99 affinity / pow2", "<= 1"),
    ("router-trace", "trace_n32_hit_over_oracle", "simulator, 32 replicas: hit rate / oracle", ">= 0.9"),
    ("router-trace", "trace_n32_load_max_over_mean", "the same: max / mean requests per replica", "<= 1.2"),
    ("router-trace", "trace_n32_hit_over_consistent_hash", "the same: hit rate affinity / consistent hashing",
     ">= 1"),
    ("router-trace", "trace_n32_ttft_p99_over_pow2", "the same: TTFT p99 affinity / pow2", "<= 1"),
    ("router-trace-tiny-llama", "c16_affinity_hit_over_oracle", "live Mooncake replay, 2 replicas, 16 clients: "
     "affinity hit rate / one-cache oracle", ">= 0.95"),
    ("router-trace-tiny-llama", "c16_affinity_hit_over_pow2", "the same: hit rate affinity / pow2", ">= 1.3"),
    ("router-trace-tiny-llama", "c16_affinity_load_max_over_mean", "the same: max / mean requests per replica",
     "<= 1.15"),
    ("router-trace-tiny-llama", "c4_affinity_hit_over_oracle", "the same, 4 clients: hit rate / oracle", ">= 0.95"),
    ("router-trace-tiny-llama", "c1_affinity_ttft_p50_over_pow2", "the same, 1 client: TTFT p50 affinity / pow2",
     "< 1"),
    ("peer_kv-cluster", "pull_speedup_vs_recompute", "hot-prefix spill over Ray Serve, small-llama, 2048-token "
     "prefix: spilled request's TTFT recomputing / pulling it from the replica that has it", ">= 5"),
    ("peer_kv", "pull_speedup_vs_recompute", "the same, both engines in one process (engine side only)", ">= 5"),
    ("router-trace-pull", "trace_n4_pull_hit_over_nopull", "simulator, Mooncake trace, 4 replicas of 256 blocks, "
     "3.5 req/s each: hit rate with peer pulls / without", ""),
    ("router-trace-pull", "trace_n4_hit_over_oracle", "the same, with pulls: hit rate / one-cache oracle", ""),
    ("router-trace-pull", "trace_n4_nopull_hit_over_oracle", "the same, without pulls: hit rate / oracle", ""),
    ("lora", "lora_overhead", "LoRA path (1 adapter) / base model time - 1, cache off", ""),
    ("lora", "k16_cache_speedup", "16 adapters: time cache off / on", ""),
)


def key_figures_table(results: Sequence[Result], base: Path) -> list[str]:
    by_suite = {r.suite: r for r in results}
    lines = ["| figure | value | target | source |", "|---|---|---|---|"]
    for suite, key, what, target in KEY_FIGURES:
        r = by_suite.get(suite)
        value = (r.doc.get("summary") or {}).get(key) if r else None
        source = f"[{r.path.name}]({_rel(r.path, base)}) `{key}`" if r else "no result yet"
        lines.append(f"| {what} | {_fmt(value)} | {target or 'n/a'} | {source} |")
    return lines


def headline(result: Result) -> list[str]:
    # "workloads-smollm2" (a suite run on another model than its default) is headlined as "workloads".
    return HEADLINES.get(result.suite, HEADLINES.get(result.suite.split("-")[0], _summary_table))(result)


# -- rendering ---------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def headline_tables(results: Sequence[Result], base: Path) -> list[str]:
    lines: list[str] = []
    for r in results:
        lines += [f"**{r.suite}** on {r.device}, from [{r.path.name}]({_rel(r.path, base)}) "
                  f"(`{r.command}`):", "", *headline(r), ""]
    return lines


def sources_table(results: Sequence[Result], base: Path) -> list[str]:
    lines = ["| source | command | commit | date | load average |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| [{r.path.name}]({_rel(r.path, base)}) | `{r.command}` | {r.commit} | {r.date} | "
                     f"{_load(r)} |")
    return lines


def aggregate_table(result: Result) -> list[str]:
    """workloads/cluster results: every measured metric per workload and variant (medians over rounds)."""
    agg = (result.doc.get("measurements") or {}).get("aggregate")
    if not agg:
        return []
    cols = [("ttft_p50", "TTFT p50 s"), ("ttft_p90", "p90"), ("ttft_p99", "p99"), ("tpot_p50", "TPOT p50 s"),
            ("requests_per_s", "req/s"), ("output_tok_per_s", "out tok/s"), ("goodput_req_per_s", "goodput req/s"),
            ("hit_rate_client", "hit rate"), ("hit_rate_gpu", "GPU-tier hits"), ("hit_rate_cpu", "CPU-tier hits")]
    lines = ["| workload | variant | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for w, vs in agg.items():
        for v, m in vs.items():
            lines.append(f"| {w} | {v} | " + " | ".join(_fmt(m.get(k)) for k, _ in cols) + " |")
    return lines


def _machine(result: Result) -> str:
    env = result.doc.get("env") or {}
    cpu = env.get("cpu") or (result.doc.get("cpu_reference") or {}).get("cpu") or "cpu not recorded"
    gpu = env.get("gpu") or (result.doc.get("gpu") or {}).get("name")
    threads = f", {env['torch_threads']} torch threads" if "torch_threads" in env else ""
    return f"{cpu}{threads}" + (f", {gpu}" if gpu else "") + f", load average {_load(result)}"


def _load(result: Result) -> str:
    load = (result.doc.get("env") or {}).get("load_average")
    return ", ".join(f"{x:g}" for x in load) if load else "not recorded"


def workloads_table(result: Result) -> list[str]:
    """What each workload was: its definition, size and generator config, from the JSON."""
    shapes = (result.doc.get("measurements") or {}).get("workloads")
    if not shapes:
        return []
    lines = ["| workload | definition | requests | prompt tokens | output tokens | config |", "|---|---|---|---|---|---|"]
    for w, d in shapes.items():
        extra = "; ".join(f"{k} {d[k]}" for k in ("working_set_tokens", "kv_pool_tokens") if k in d)
        cfg = ", ".join(f"{k}={v}" for k, v in d["config"].items())
        lines.append(f"| {w} | {d['description']}{' (' + extra + ')' if extra else ''} | {d['shape']['requests']} | "
                     f"{d['shape']['prompt_tokens']} | {d['shape']['output_tokens']} | {cfg} |")
    return ["Workloads (generated by `benchmarks/workloads.py` from the config shown):", "", *lines, ""]


def section(result: Result, base: Path) -> list[str]:
    lines = [f"## {result.suite} — {result.device}, {result.date}", "",
             f"Source: [{result.path.name}]({_rel(result.path, base)}), written by `{result.command}` "
             f"(commit {result.commit}; {_machine(result)}).", ""]
    png = result.path.with_suffix(".png")
    if png.exists():
        lines += [f"![{result.suite} on {result.device}]({_rel(png, base)})", ""]
    lines += workloads_table(result)
    table = aggregate_table(result)
    if table:
        lines += ["Medians over rounds (absolute numbers: this device only):", "", *table, ""]
    return lines


def render(results: Sequence[Result], base: Path) -> str:
    lines = ["# radixserve benchmark results", "",
             "<!-- Generated by `python -m radixserve.benchmarks.report`; edit benchmarks/report.py, not this file. -->", "",
             "Every figure on this page is read from the committed JSON file named beside it "
             "(`benchmarks/results/<suite>-<device>-<date>.json`), which holds the configuration, the "
             "environment and every raw measurement, and was written by the command listed for it. "
             "Ratios are measured side by side in the same run on the same machine; absolute numbers "
             "hold only for the device in the file name. A `*_speedup_vs_X` or `*_gain_vs_X` ratio says "
             "how many times better the reference (for the workloads suite: radixserve with its prefix "
             "cache, device pool only; for the peer suite: radixserve's HTTP server, prefix cache on, against "
             "`transformers serve --continuous-batching`, rows `<workload>@<N>u` at N concurrent users) is than X; "
             "below 1, X is better (as the CPU tier is on rag).", "",
             "Run everything again: `radixserve bench bench_workloads` (or any suite in `radixserve bench "
             "--list`), then `python -m radixserve.benchmarks.report`.", "",
             "## Against the targets", "", *key_figures_table(results, base), "",
             "## Headline figures", "", *headline_tables(results, base),
             "## Sources", "", *sources_table(results, base), ""]
    for r in results:
        lines += section(r, base)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, results: Sequence[Result]) -> bool:
    """Replace the marked block of the project README; False when it has no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = ["", "Headline figures, from `benchmarks/README.md` (regenerate: `python -m radixserve.benchmarks.report`):", "",
             *key_figures_table(results, readme.parent), "",
             *headline_tables([r for r in results if r.suite == "workloads"] or results, readme.parent)]
    readme.write_text(head + BEGIN + "\n".join(block) + "\n" + END + tail)
    return True


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="report", description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--output", type=Path, default=RESULTS_DIR.parent / "README.md")
    p.add_argument("--readme", default=str(RESULTS_DIR.parent.parent / "README.md"),
                   help="project README whose marked block gets the headline table ('' for none)")
    p.add_argument("--include-quick", action="store_true", help="also report *-quick smoke results")
    args = p.parse_args(argv)
    results = load_results(args.results_dir, args.include_quick)
    text = render(results, args.output.parent)
    args.output.write_text(text)
    print(f"wrote {args.output} from {len(results)} result(s)")
    if args.readme:
        done = update_readme(Path(args.readme), results)
        print(f"updated the headline block of {args.readme}" if done else
              f"{args.readme}: no {BEGIN} ... {END} markers; left unchanged")
    return text


if __name__ == "__main__":
    main()
