"""Batch inference as a Ray job, sharded by prefix affinity, resumable.

    ray job submit --address http://127.0.0.1:8265 -- \
        python -m radixserve.cluster.batch /data/in.jsonl /data/out.jsonl --model smollm2   # on a cluster
    python -m radixserve.cluster.batch in.jsonl out.jsonl --num-engines 2        # a new local Ray

On a cluster every node needs radixserve installed (no working_dir upload is
needed), and the output path is a path on the node the job's driver runs on
(the head): relative paths resolve against the driver's directory, and inside
an uploaded working_dir they are refused, since Ray deletes that copy.

Input rows: {"id": ..., "prompt": "..."} or {"messages": [...]} or
{"prompt_token_ids": [...]}, optionally with sampling fields ("max_tokens",
"temperature", "top_p", "seed", "stop", ...). Rows without an id get their
line number. Prompts that share their first blocks go to the same engine
actor, so each engine's prefix cache serves the whole group. Results are
appended to the output as they finish (one JSON line each, flushed); a rerun
skips ids already written, so an interrupted job resumes without losing or
duplicating rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixserve.cluster.ray_reaper import start_reaper
from radixserve.engine.config import EngineConfig
from radixserve.engine.executor import wire
from radixserve.engine.sampling_params import SamplingParams

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n",
                    "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty")
_GROUP_BLOCKS = 4  # prompts sharing this many leading blocks form one affinity group


@dataclass(frozen=True)
class Row:
    id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Shard:
    """The rows one engine actor runs; they reach it msgpack-encoded, validated on decode."""

    rows: list[Row]


def read_done(out_path: Path) -> set[str]:
    """Ids already written. A torn last line (the job died mid-write) is cut off."""
    if not out_path.exists():
        return set()
    done, good_bytes = set(), 0
    with out_path.open("rb") as f:
        for line in f:
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n"):
                break
            good_bytes += len(line)
    if good_bytes != out_path.stat().st_size:
        with out_path.open("r+b") as f:
            f.truncate(good_bytes)
    return done


def load_rows(in_path: Path, tokenizer, defaults: dict[str, Any], done: set[str]) -> list[Row]:
    rows, seen = [], set()
    for lineno, line in enumerate(in_path.read_text().splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        rid = str(obj.get("id", lineno))
        if rid in seen:
            raise ValueError(f"{in_path}:{lineno + 1}: duplicate id {rid!r}")
        seen.add(rid)
        if rid in done:
            continue
        if "prompt_token_ids" in obj:
            ids = list(obj["prompt_token_ids"])
        elif "messages" in obj:
            ids = tokenizer.encode_chat(obj["messages"])
        elif "prompt" in obj:
            ids = tokenizer.encode(obj["prompt"])
        else:
            raise ValueError(f"{in_path}:{lineno + 1}: a row needs prompt, messages or prompt_token_ids")
        params = {**defaults, **{k: obj[k] for k in _SAMPLING_FIELDS if k in obj}}
        rows.append(Row(rid, ids, SamplingParams(**params)))
    return rows


def shard_by_prefix(rows: list[Row], num_shards: int, block_size: int) -> list[list[Row]]:
    """Group rows by their first blocks, then deal groups to shards, biggest
    first onto the lightest shard, so shards hold similar token counts."""
    groups: dict[bytes, list[Row]] = {}
    for row in rows:
        head = row.prompt_token_ids[:block_size * _GROUP_BLOCKS]
        key = hashlib.blake2b(json.dumps(head).encode(), digest_size=8).digest()
        groups.setdefault(key, []).append(row)
    shards: list[list[Row]] = [[] for _ in range(num_shards)]
    load = [0] * num_shards
    for group in sorted(groups.values(), key=lambda g: -sum(len(r.prompt_token_ids) for r in g)):
        i = load.index(min(load))
        shards[i].extend(group)
        load[i] += sum(len(r.prompt_token_ids) for r in group)
    return [s for s in shards if s]


def make_engine_actor():
    import ray

    @ray.remote
    class BatchEngine:
        def __init__(self, engine_kwargs: dict):
            from radixserve.engine.core.llm_engine import LLMEngine
            from radixserve.engine.entrypoints.llm import engine_config
            self.engine = LLMEngine(engine_config(**engine_kwargs))

        def run(self, shard: bytes):
            """Yield one JSON result line per row of a ``wire.encode("shard", Shard)``, as rows finish."""
            # By package name: under ``python -m`` this module is __main__, whose
            # names the decoder could not resolve in the actor's process.
            from radixserve.cluster.batch import Shard
            pending = {}
            for row in wire.decode(shard, {"shard": Shard})[1].rows:
                self.engine.add_request(row.id, None, row.params, prompt_token_ids=row.prompt_token_ids)
                pending[row.id] = len(row.prompt_token_ids)
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        del pending[out.request_id]
                        yield json.dumps(result_row(out)) + "\n"

    return BatchEngine


def result_row(out) -> dict:
    comp = out.outputs
    row = {"id": out.request_id, "text": comp[0].text, "token_ids": comp[0].token_ids,
           "finish_reason": comp[0].finish_reason, "prompt_tokens": len(out.prompt_token_ids),
           "num_cached_tokens": out.num_cached_tokens}
    if len(comp) > 1:
        row["texts"] = [c.text for c in comp]
    if out.error:
        row["error"] = out.error
    return row


def output_path(given: str) -> Path:
    """The output file, absolute. A relative path inside a Ray job's uploaded working
    directory would land in Ray's temporary copy of it and vanish with the job: refused."""
    path = Path(given).expanduser()
    if not path.is_absolute() and "runtime_resources" in Path.cwd().parts:
        raise ValueError(f"output {given!r} is relative, and this runs in a Ray job's temporary working "
                         f"directory ({Path.cwd()}), which is deleted after the job: give an absolute path "
                         "on the node, or a directory every node shares")
    return path.resolve()


def connect_ray(address: str | None, num_cpus: int) -> subprocess.Popen | None:
    """Join the cluster this job belongs to, else start a fresh local Ray of our own.

    ``ray job submit`` sets RAY_ADDRESS for its entrypoint; ``--ray-address`` names a
    cluster by hand. With neither, ``address="local"`` always starts a new local Ray, even
    when another one runs on this machine (a plain ``ray.init()`` would join that one
    and then refuse ``num_cpus``), in a temp dir of its own, watched by a reaper
    (cluster/ray_reaper.py) so that every process it starts dies with this job, even
    when the job is SIGKILLed. Returns the reaper; keep it while Ray runs.
    """
    import ray
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return None
    temp_dir = tempfile.mkdtemp(prefix="rs-batch-", dir="/tmp")  # short: Ray's socket paths are limited
    reaper = start_reaper(temp_dir)  # first, so it sees every process Ray starts
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir)
    return reaper


def run(args: argparse.Namespace, engine_kwargs: dict) -> dict:
    import ray
    from tqdm import tqdm

    from radixserve.engine.model.default_models import resolve_model
    from radixserve.engine.tokenizer import load_tokenizer
    in_path, out_path = Path(args.input), output_path(args.output)
    print(f"batch: writing {out_path}", file=sys.stderr, flush=True)
    done = read_done(out_path)
    engine = EngineConfig.from_flat(**engine_kwargs)  # a bad flag fails before Ray starts
    model_dir = resolve_model(engine.model.model, engine.model.cache_dir, engine.model.revision)
    tokenizer = load_tokenizer(engine.model, model_dir)
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    rows = load_rows(in_path, tokenizer, defaults, done)
    shards = shard_by_prefix(rows, args.num_engines, engine.cache.block_size)
    reaper = connect_ray(args.ray_address, max(2, args.num_engines))  # noqa: F841 -- held while Ray runs
    Engine = make_engine_actor()
    actors = [Engine.options(num_cpus=args.cpus_per_engine).remote(engine_kwargs) for _ in shards]
    streams = [a.run.options(num_returns="streaming").remote(
        wire.encode("shard", Shard(shard))) for a, shard in zip(actors, shards)]
    prompt_tokens = cached = written = 0
    with out_path.open("a") as out, tqdm(total=len(rows), desc="batch") as bar:
        active = list(streams)
        while active:
            ready, _ = ray.wait(active, num_returns=1)  # whichever engine has a row first
            gen = ready[0]
            try:
                line = ray.get(next(gen))
            except StopIteration:
                active.remove(gen)
                continue
            row = json.loads(line)
            if row["id"] in done:
                continue  # never write a row twice
            out.write(line)
            out.flush()
            done.add(row["id"])
            written += 1
            prompt_tokens += row["prompt_tokens"]
            cached += row["num_cached_tokens"]
            bar.update(1)
        os.fsync(out.fileno())
    hit_rate = cached / prompt_tokens if prompt_tokens else 0.0
    report = {"rows_written": written, "rows_skipped": len(done) - written, "prompt_tokens": prompt_tokens,
              "cached_tokens": cached, "prefix_hit_rate": hit_rate, "engines": len(shards)}
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    from radixserve.cli import add_engine_flags, engine_kwargs
    p = argparse.ArgumentParser(prog="python -m radixserve.cluster.batch", description=__doc__.split("\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--num-engines", type=int, default=2)
    p.add_argument("--cpus-per-engine", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster to use (default: $RAY_ADDRESS inside `ray job submit`, "
                        "else a new local Ray)")
    add_engine_flags(p)
    args = p.parse_args(argv)
    kwargs = {"model": args.model, **engine_kwargs(args)}
    run(args, kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
