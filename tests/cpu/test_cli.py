"""The ``radixserve`` command line, run as a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys


def radixserve(*args: str, stdin: str | None = None, cache_dir: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "radixserve.cli", *args, "--cache-dir", cache_dir]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_json(model_cache_dir, tiny_dir):
    r = radixserve("generate", "Hello there", "--model", "tiny-llama", "--max-tokens", "5", "--json",
                   "--ignore-eos", "--block-size", "8", "--enable-prefix-caching", "false",
                   cache_dir=model_cache_dir)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "Hello there" and len(row["token_ids"]) == 5 and row["finish_reason"] == "length"


def test_generate_from_hf_path(model_cache_dir, tiny_dir):
    r = radixserve("generate", "path model", "--model", str(tiny_dir), "--max-tokens", "3",
                   cache_dir=model_cache_dir)
    assert r.returncode == 0, r.stderr
    assert "'path model' ->" in r.stdout


def test_chat_keeps_history_and_reports_cache(model_cache_dir, tiny_dir):
    r = radixserve("chat", "--model", "tiny-llama", "--max-tokens", "6", "--system",
                   "You are a helpful assistant that answers in one short sentence.",
                   stdin="first question about the weather\nsecond question please\n/exit\n",
                   cache_dir=model_cache_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant:") == 2
    stats = [line for line in r.stderr.splitlines() if "cached" in line]
    assert len(stats) == 2
    cached = [int(s.split("cached ")[1].split(",")[0]) for s in stats]
    assert cached[0] == 0 and cached[1] > 0  # the second turn reuses the first turn's blocks


def test_bad_flag_value_is_a_clear_error(model_cache_dir):
    r = radixserve("generate", "x", "--max-model-len", "100000000", cache_dir=model_cache_dir)
    assert r.returncode == 2 and "max_model_len" in r.stderr
    r = radixserve("generate", "x", "--top-p", "2", cache_dir=model_cache_dir)
    assert r.returncode == 2 and "top_p" in r.stderr
