"""Shared benchmark plumbing: environment record, result files, timing, plots.

Every suite writes ``benchmarks/results/<suite>-<device>-<date>.json`` holding
its config, the environment and every raw measurement, then draws a PNG from
that JSON alone (so a plot can be redrawn from a committed result).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Relative, so results land under the directory the user runs from (the checkout root
# gives the committed benchmarks/results/), never inside an installed package.
RESULTS_DIR = Path("benchmarks") / "results"


def device_label() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def env_info() -> dict[str, Any]:
    import torch
    # Tracked files that differ from the commit: a result from a modified tree says so.
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = [line.split(maxsplit=1)[-1] for line in status.splitlines()]
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device_label(), "git_commit": _git("rev-parse", "--short", "HEAD"), "git_dirty": dirty,
            "load_average": load_average(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: a shared machine skews timings, so every result records it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def print_summary(path: Path, summary: dict[str, float]) -> None:
    """Where a run's JSON went, and its headline ratios."""
    print(f"wrote {path}")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, recorded in its JSON (argv None: this process's).

    Values of secret flags (``--api-key``) are replaced by ``***``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "--api-key" and i + 1 < len(args):
            args[i + 1] = "***"
        elif a.startswith("--api-key="):
            args[i] = "--api-key=***"
    return shlex.join(["python", "-m", module, *args])


def json_safe(value):
    """NaN/inf -> None, so result files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def result_path(suite: str, out_dir: Path | None = None, device: str | None = None) -> Path:
    day = datetime.date.today().isoformat()
    return (out_dir or RESULTS_DIR) / f"{suite}-{device or device_label()}-{day}.json"


def write_result(suite: str, config: dict, measurements: dict, summary: dict,
                 out_dir: Path | None = None, command: str | None = None, device: str | None = None) -> Path:
    """``device`` labels results measured elsewhere (a remote cluster); default: this machine's."""
    path = result_path(suite, out_dir, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"suite": suite, "command": command, "config": config, "env": env_info(), "summary": summary,
           "measurements": measurements}
    path.write_text(json.dumps(json_safe(doc), indent=2, default=float) + "\n")
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> dict[str, float]:
    """Median with its spread: the figure a result reports, and how far repeats strayed from it."""
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    m = median(xs)
    return {"median": m, "min": min(xs), "max": max(xs), "n": len(xs),
            "rel_spread": (max(xs) - min(xs)) / m if m else float("nan")}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def bar_plot(path: Path, title: str, rows: list[tuple[str, float, float | None]], ylabel: str) -> Path:
    """One bar per (label, value, target); the target is drawn as a tick when given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.2))
    labels = [r[0] for r in rows]
    values = [r[1] for r in rows]
    bars = ax.bar(labels, values, color="#4878a8")
    for i, (_, value, target) in enumerate(rows):
        ax.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=9)
        if target is not None:
            ax.plot([i - 0.4, i + 0.4], [target, target], color="#c0392b", lw=2,
                    label="target" if i == next(j for j, r in enumerate(rows) if r[2] is not None) else None)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if any(r[2] is not None for r in rows):
        ax.legend()
    ax.tick_params(axis="x", labelsize=8)
    del bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bar_plot(ax, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str,
                     title: str, log: bool = False, legend: bool = True) -> None:
    """Bars of every series side by side within each group (missing values left out)."""
    width = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(len(groups))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v)]
        ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name)
        for x, v in pts:
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=25 if len(groups) > 5 else 0,
                  ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    if legend:
        ax.legend(fontsize=7)


WORKLOAD_PANELS = (("ttft_p50", "seconds (log)", "TTFT p50", True),
                   ("ttft_p99", "seconds (log)", "TTFT p99", True),
                   ("output_tok_per_s", "output tokens/s", "throughput", False),
                   ("goodput_req_per_s", "requests/s", "goodput", False),
                   ("tpot_p50", "seconds", "time per output token p50", False))


def workload_panels_plot(json_path: Path, title: str) -> Path:
    """TTFT p50/p99, throughput, goodput, TPOT and hit rate by tier per workload, one bar per variant.

    Reads ``measurements.aggregate`` (workload -> variant -> field -> value)
    and ``config.slo`` of a workloads or cluster result.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doc = json.loads(Path(json_path).read_text())
    agg = doc["measurements"]["aggregate"]
    workloads = list(agg)
    seen = [v for w in workloads for v in agg[w]]
    variants = [v for v in doc["config"].get("variants", []) if v in seen] + seen  # the configured order first
    variants = list(dict.fromkeys(variants))
    fig, axes = plt.subplots(3, 2, figsize=(12, 12))
    tier_hits_panel(axes.flat[-1], agg, workloads, variants)
    for ax, (key, ylabel, name, log) in zip(axes.flat, WORKLOAD_PANELS):
        if key == "goodput_req_per_s":
            name += f" (TTFT <= {doc['config']['slo']['ttft_s']:g} s)"
        series = {v: [agg[w].get(v, {}).get(key) for w in workloads] for v in variants}
        grouped_bar_plot(ax, workloads, series, ylabel, name, log=log, legend=False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.972))
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def tier_hits_panel(ax, agg: dict, workloads: Sequence[str], variants: Sequence[str]) -> None:
    """Prompt tokens served from the device tier (solid) and the CPU tier (hatched, stacked)."""
    width = 0.8 / max(len(variants), 1)
    colors = [f"C{i}" for i in range(len(variants))]
    for j, v in enumerate(variants):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(len(workloads))]
        # Over HTTP there are no engine counters: the hit rate the responses reported stands in for the pool's.
        gpu = [_finite(_first_finite(agg[w].get(v, {}).get("hit_rate_gpu"), agg[w].get(v, {}).get("hit_rate_client")))
               for w in workloads]
        cpu = [_finite(agg[w].get(v, {}).get("hit_rate_cpu")) for w in workloads]
        ax.bar(xs, gpu, width, color=colors[j])
        ax.bar(xs, cpu, width, bottom=gpu, color=colors[j], hatch="//", edgecolor="white")
    ax.set_xticks(range(len(workloads)), workloads, fontsize=8, rotation=25 if len(workloads) > 5 else 0,
                  ha="right" if len(workloads) > 5 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of prompt tokens")
    ax.set_title("prefix hit rate by tier (solid: device pool, hatched: CPU tier)", fontsize=9)


def _first_finite(*xs: float | None) -> float | None:
    return next((x for x in xs if x is not None and math.isfinite(x)), None)


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0
