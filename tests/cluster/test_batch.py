"""The batch job: prefix-grouped shards over Ray actors, interrupted and resumed."""
from __future__ import annotations

import json
import subprocess
import sys

from radixserve.cluster.batch import Row, shard_by_prefix
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.default_models import resolve_model

PREFIXES = ["Summarize the following policy for a new employee in two sentences. " * 2,
            "Translate the next sentence into plain English for a customer. " * 2,
            "Classify the sentiment of this product review as positive or negative. " * 2]


def write_input(path, n=18):
    rows = [{"id": f"row-{i}", "prompt": PREFIXES[i % 3] + f"Item number {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_batch(inp, out, cache, *extra):
    cmd = [sys.executable, "-m", "radixserve.cluster.batch", str(inp), str(out), "--model", "tiny-llama",
           "--cache-dir", cache, "--num-engines", "2", "--cpus-per-engine", "0.5", "--max-tokens", "6",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_interrupted_job_resumes_without_loss_or_duplicates(tmp_path):
    cache = str(tmp_path / "models")
    model_dir = resolve_model("tiny-llama", cache)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = write_input(inp)
    first = run_batch(inp, out, cache, "--stop-after", "5")
    assert first.returncode == 3, first.stderr[-2000:]  # killed itself after 5 rows
    assert len(out.read_text().splitlines()) == 5
    with out.open("a") as f:
        f.write('{"id": "row-torn", "te')  # a write torn by the crash
    second = run_batch(inp, out, cache)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert report["rows_written"] == len(rows) - 5 and report["prefix_hit_rate"] > 0.3
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # each exactly once
    llm = LLM(str(model_dir))
    ref = llm.generate([r["prompt"] for r in rows], SamplingParams(temperature=0, max_tokens=6))
    by_id = {r["id"]: r for r in got}
    for row, expect in zip(rows, ref):
        assert by_id[row["id"]]["token_ids"] == expect.outputs[0].token_ids


def test_shards_keep_prefix_groups_together():
    rows = [Row(f"r{i}", [i % 3] * 64 + [i], SamplingParams()) for i in range(30)]
    shards = shard_by_prefix(rows, 2, 16)
    for shard in shards:
        groups = {r.prompt_token_ids[0] for r in shard}
        for g in groups:
            assert all(r.prompt_token_ids[0] != g for other in shards if other is not shard for r in other)
