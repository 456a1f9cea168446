"""Shared benchmark plumbing: environment record, result files, timing, plots.

Every suite writes ``benchmarks/results/<suite>-<device>-<date>.json`` holding
its config, the environment and every raw measurement, then draws a PNG from
that JSON alone (so a plot can be redrawn from a committed result).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


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


def env_info() -> dict[str, Any]:
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device_label(), "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def result_path(suite: str, out_dir: Path | None = None) -> Path:
    day = datetime.date.today().isoformat()
    return (out_dir or RESULTS_DIR) / f"{suite}-{device_label()}-{day}.json"


def write_result(suite: str, config: dict, measurements: dict, summary: dict,
                 out_dir: Path | None = None) -> Path:
    path = result_path(suite, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"suite": suite, "config": config, "env": env_info(), "summary": summary,
           "measurements": measurements}
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return path


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


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
