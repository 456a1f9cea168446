"""The benchmark harness: workload generators, metrics math, HTTP driver, and every suite at smoke size.

The smoke tests run each ``benchmarks/bench_*.py`` with ``--quick`` into a
temporary directory, so the harness cannot rot unnoticed; the HTTP driver and
the cluster suite run against a small stub OpenAI server started here.
"""
from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import StreamingResponse

from radixserve.benchmarks import drivers, workloads
from radixserve.benchmarks.common import percentile
from radixserve.benchmarks.metrics import RequestRecord, Run, Slo, TierHits, goodput, headline, round_ratios, summarize
from radixserve.benchmarks.workloads import (
    MultiTurnConfig,
    NoSharingConfig,
    RAGConfig,
    SharedPrefixConfig,
    TokenSpace,
    assemble_ids,
    assemble_messages,
    assemble_text,
    sessions,
)

TOKENS = TokenSpace(10, 2000)
BENCH_DIR = Path(workloads.__file__).parent
SUITES = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


# -- workload generators ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_generators_are_deterministic_and_seeded(name):
    kind = workloads.WORKLOADS[name]
    cfg = kind.config_type()
    a, b = kind.generate(cfg, TOKENS), kind.generate(cfg, TOKENS)
    assert a == b and a
    other = kind.generate(workloads.override(cfg, "seed", "7"), TOKENS)
    assert [s.prompt_token_ids for s in other] != [s.prompt_token_ids for s in a]
    assert all(TOKENS.low <= t < TOKENS.high for s in a for t in s.prompt_token_ids)
    assert len({s.request_id for s in a}) == len(a)


def test_workloads_with_equal_seeds_share_no_prompt_start():
    # One server gets every workload in the cluster suite: they must not hit each other's blocks.
    firsts = [kind.generate(kind.config_type(), TOKENS)[0].prompt_token_ids[:16]
              for kind in workloads.WORKLOADS.values()]
    assert len(set(firsts)) == len(firsts)


def test_shared_prefix_groups_really_share_their_prefix():
    cfg = SharedPrefixConfig(groups=3, questions=4, prefix_len=40, suffix_len=7, output_len=5)
    reqs = workloads.shared_prefix(cfg, TOKENS)
    assert len(reqs) == 12 and all(r.prompt_len == 47 and r.output_len == 5 for r in reqs)
    by_group: dict[str, list] = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r.prompt_token_ids)
    assert len(by_group) == 3
    prefixes = set()
    for prompts in by_group.values():
        assert len({p[:40] for p in prompts}) == 1  # one prefix per group
        assert len({p[40:] for p in prompts}) == 4  # distinct questions
        prefixes.add(prompts[0][:40])
    assert len(prefixes) == 3
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # groups interleave


def test_multi_turn_prompts_extend_previous_prompt_and_answer():
    cfg = MultiTurnConfig(sessions=3, turns=4, system_len=20, user_len=6, output_len=5, think_s=0.5)
    reqs = workloads.multi_turn(cfg, TOKENS)
    groups = sessions(reqs)
    assert len(groups) == 3 and all(len(g) == 4 for g in groups)
    systems = {g[0].prompt_token_ids[:20] for g in groups}
    assert len(systems) == 1  # one system prompt shared by every session
    for turns in groups:
        assert turns[0].think_s == 0 and all(t.think_s > 0 for t in turns[1:])
        for prev, cur in zip(turns, turns[1:]):
            scripted_answer = cur.segments[len(prev.segments)]
            assert scripted_answer.role == "assistant" and len(scripted_answer.token_ids) == cfg.output_len
            assert cur.prompt_token_ids[:prev.prompt_len] == prev.prompt_token_ids
            assert cur.prompt_len == prev.prompt_len + cfg.output_len + cfg.user_len
        # With the answers actually generated, turn k is turn k-1's prompt + its answer + a new message.
        answers = [[1000 + 10 * k + i for i in range(cfg.output_len)] for k in range(3)]
        for k in range(1, 4):
            prev = assemble_ids(turns[k - 1], answers[:k - 1])
            cur = assemble_ids(turns[k], answers[:k])
            assert cur[:len(prev)] == prev and cur[len(prev):len(prev) + 5] == answers[k - 1]
            assert len(cur) == len(prev) + cfg.output_len + cfg.user_len


def test_rag_working_set_is_as_configured():
    cfg = RAGConfig(documents=5, doc_len=32, questions=20, question_len=4, output_len=3, docs_per_question=2)
    reqs = workloads.rag(cfg, TOKENS)
    assert len(reqs) == 20 and cfg.working_set_tokens == 160
    docs = {seg.token_ids for r in reqs for seg in r.segments if seg.role == "system"}
    assert len(docs) == 5 and all(len(d) == 32 for d in docs)
    assert sum(len(d) for d in docs) == cfg.working_set_tokens
    assert all(r.prompt_len == 2 * 32 + 4 for r in reqs)
    with pytest.raises(ValueError, match="questions"):
        RAGConfig(documents=10, questions=5)


def test_rag_popularity_is_skewed():
    cfg = RAGConfig(documents=8, doc_len=16, questions=400, question_len=2, output_len=1, zipf_s=1.2)
    counts: dict[str, int] = {}
    for r in workloads.rag(cfg, TOKENS):
        counts[r.group] = counts.get(r.group, 0) + 1
    assert counts["d0"] > 3 * counts["d7"] and len(counts) == 8


def test_no_sharing_prompts_share_no_block():
    reqs = workloads.no_sharing(NoSharingConfig(requests=20, prompt_len=64, output_len=2), TOKENS)
    assert len({r.prompt_token_ids[:16] for r in reqs}) == 20


def test_text_and_chat_variants():
    reqs = workloads.multi_turn(MultiTurnConfig(sessions=1, turns=2, system_len=3, user_len=2, output_len=2),
                                TOKENS)
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    second = reqs[1]
    msgs = assemble_messages(second, decode, ["ANSWER"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "ANSWER"
    assert assemble_text(second, decode, ["ANSWER"]) == "".join(m["content"] for m in msgs)
    assert "ANSWER" not in assemble_text(second, decode)  # no answer given: the scripted one


def test_poisson_arrivals():
    t = workloads.poisson_arrivals(4000, 5.0, seed=3)
    assert t == workloads.poisson_arrivals(4000, 5.0, seed=3) and t[0] == 0 and t == sorted(t)
    assert abs(t[-1] / 3999 - 0.2) < 0.02  # mean gap 1/rate
    assert workloads.poisson_arrivals(3, math.inf, 0) == [0.0, 0.0, 0.0]
    reqs = workloads.with_poisson_arrivals(workloads.multi_turn(MultiTurnConfig(sessions=3, turns=2), TOKENS), 2.0, 0)
    assert all(r.arrival_s == 0 for r in reqs if r.turn > 0)
    assert len({r.arrival_s for r in reqs if r.turn == 0}) == 3


def test_overrides_are_typed_and_validated():
    cfg = workloads.apply_overrides(drivers_free_suite(), ["rag.documents=9", "multi_turn.think_s=0.25"])
    assert cfg.rag.documents == 9 and cfg.multi_turn.think_s == 0.25
    with pytest.raises(ValueError, match="no field"):
        workloads.apply_overrides(cfg, ["rag.nope=1"])
    with pytest.raises(ValueError, match="must be >= 1"):
        workloads.apply_overrides(cfg, ["shared_prefix.groups=0"])


def drivers_free_suite():
    from radixserve.benchmarks.bench_workloads import WorkloadsBenchConfig
    return WorkloadsBenchConfig()


# -- metrics math -------------------------------------------------------------------------


def rec(i: int, submit: float, first: float, step: float, n: int, *, cached=0, error=None, prompt=100):
    times = tuple(first + k * step for k in range(n))
    return RequestRecord(f"r{i}", f"s{i}", 0, submit, times, times[-1] if times else submit, prompt, n, cached,
                         error=error)


def test_percentiles_interpolate():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 0.5) == 3.0 and percentile(xs, 0.0) == 1.0 and percentile(xs, 1.0) == 5.0
    assert percentile(xs, 0.9) == pytest.approx(4.6) and math.isnan(percentile([], 0.5))


def test_request_record_latencies():
    r = rec(0, 1.0, 1.5, 0.1, 5)
    assert r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(0.9)
    assert r.tpot == pytest.approx(0.1) and r.itl == pytest.approx([0.1] * 4)
    assert math.isnan(rec(1, 0.0, 0.2, 0.1, 1).tpot)


def test_summary_and_goodput_on_hand_made_runs():
    records = [rec(0, 0.0, 0.5, 0.1, 3, cached=50), rec(1, 0.0, 1.5, 0.1, 3),
               rec(2, 1.0, 1.2, 0.3, 3, cached=100), rec(3, 2.0, 0, 0, 0, error="boom")]
    slo = Slo(ttft_s=1.0, tpot_s=0.2)
    s = summarize(records, slo, TierHits(queries_tokens=300, gpu_hits_tokens=120, cpu_hits_tokens=30))
    # duration: first submit 0.0 -> last finish max(0.7, 1.7, 1.8, 2.0 for the failed one) = 2.0
    assert s.duration_s == pytest.approx(2.0) and s.requests == 4 and s.failed == 1
    # TTFTs of the finished ones: 0.5, 1.5, 0.2 -> p50 0.5; p99 interpolates 0.5 + 0.98 * (1.5 - 0.5).
    assert s.ttft_p50 == pytest.approx(0.5) and s.ttft_p99 == pytest.approx(1.48)
    assert s.output_tokens == 9 and s.output_tok_per_s == pytest.approx(4.5)
    assert s.requests_per_s == pytest.approx(1.5)
    assert s.hit_rate_client == pytest.approx(150 / 300)
    assert s.hit_rate_gpu == pytest.approx(0.4) and s.hit_rate_cpu == pytest.approx(0.1)
    # SLO: r0 meets it; r1 misses TTFT; r2 misses TPOT (0.3 > 0.2); r3 failed.
    assert s.slo_attainment == pytest.approx(0.25) and s.goodput_req_per_s == pytest.approx(0.5)
    assert goodput(records, Slo(ttft_s=2.0)) == pytest.approx(1.5)


def test_ratios_are_taken_within_each_round():
    runs = [Run(0, "w", "on", _summary(1.0, 10.0)), Run(0, "w", "off", _summary(4.0, 5.0)),
            Run(1, "w", "on", _summary(2.0, 10.0)), Run(1, "w", "off", _summary(4.0, 2.5))]
    ratios = round_ratios(runs, "on")
    assert ratios["w"]["off"]["ttft_p50_speedup"] == [4.0, 2.0]
    assert ratios["w"]["off"]["throughput_gain"] == [2.0, 4.0]
    from radixserve.benchmarks.metrics import aggregate
    s = headline(ratios, aggregate(runs), "on")
    assert s["w/ttft_p50_speedup_vs_off"] == 3.0 and s["w/throughput_gain_vs_off"] == 3.0


def _summary(ttft: float, tok_s: float):
    from dataclasses import replace
    base = summarize([rec(0, 0.0, ttft, 0.1, 2)], Slo(10.0))
    return replace(base, ttft_p50=ttft, ttft_p99=ttft, output_tok_per_s=tok_s)


# -- HTTP driver against a stub OpenAI server -------------------------------------------------


def make_stub_app(log: list[dict]):
    """/v1/completions and /v1/chat/completions, SSE only; 4 characters count as a token and
    cached tokens are the longest common prefix with any earlier prompt."""
    app = FastAPI()
    seen: list[str] = []
    replicas = itertools.cycle(["stub-a", "stub-b"])

    def respond(chat: bool, text: str, body: dict) -> StreamingResponse:
        cached = max((len(os.path.commonprefix([text, s])) for s in seen), default=0) // 4
        seen.append(text)
        n = body["max_tokens"]

        async def events():
            if chat:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            for i in range(n):
                await asyncio.sleep(0.002)
                piece = f" t{i}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield "data: " + json.dumps({"choices": [choice]}) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(text) // 4, "completion_tokens": n,
                         "prompt_tokens_details": {"cached_tokens": cached}}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-radixserve-replica": next(replicas)})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        log.append(body)
        return respond(False, body["prompt"], body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        log.append(body)
        return respond(True, "".join(m["content"] for m in body["messages"]), body)

    return app


@pytest.fixture(scope="module")
def stub_server():
    import uvicorn
    log: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_stub_app(log), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", log
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_http_driver_reads_stream_usage_and_replica(stub_server, api):
    url, log = stub_server
    reqs = workloads.multi_turn(MultiTurnConfig(sessions=2, turns=2, system_len=8, user_len=3, output_len=4,
                                                think_s=0.01), TOKENS)
    decode = lambda ids: "".join(f"[{i}]" for i in ids)  # noqa: E731
    target = drivers.HttpTarget(url, "stub-model", decode, api=api)
    log.clear()
    records = drivers.run(target, reqs, drivers.Load("closed", users=2))
    assert len(records) == 4 and all(r.ok for r in records)
    assert all(r.output_tokens == 4 and len(r.token_times_s) == 4 and r.ttft > 0 for r in records)
    assert {r.replica for r in records} == {"stub-a", "stub-b"}
    second_turns = [r for r in records if r.turn == 1]
    assert all(r.cached_tokens > 0 for r in second_turns)  # turn 2 starts with turn 1's prompt
    bodies = [b for b in log if "t3" in json.dumps(b)]  # the answer of turn 1 went into turn 2
    assert len(bodies) == 2 and all(b["stream_options"] == {"include_usage": True} for b in log)


def test_open_loop_follows_arrival_times(stub_server):
    url, _ = stub_server
    reqs = workloads.with_poisson_arrivals(
        workloads.no_sharing(NoSharingConfig(requests=5, prompt_len=8, output_len=2), TOKENS), 20.0, seed=1)
    target = drivers.HttpTarget(url, "stub-model", lambda ids: " ".join(map(str, ids)))
    records = drivers.run(target, reqs, drivers.Load("open", rate=20.0))
    starts = {r.request_id: r.submit_s for r in records}
    for spec in reqs:
        assert starts[spec.request_id] >= spec.arrival_s - 1e-3


def test_http_errors_are_recorded_not_raised(stub_server):
    url, _ = stub_server
    target = drivers.HttpTarget(url + "/nowhere", "m", str)
    reqs = workloads.no_sharing(NoSharingConfig(requests=2, prompt_len=4, output_len=1), TOKENS)
    records = drivers.run(target, reqs, drivers.Load("closed", users=1))
    assert all(not r.ok and "404" in r.error for r in records)


# -- every suite at smoke size ---------------------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """Smoke tests check the harness, not speed: one thread keeps them quick on a shared 2-core box,
    where a two-thread op stalls a scheduler tick whenever another process holds the other core."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def suite_argv(suite: str, out: Path, cache_dir: str, stub_url: str) -> list[str]:
    argv = ["--quick", "--out-dir", str(out), "--cache-dir", cache_dir]
    if suite == "bench_cluster":
        argv += ["--endpoint", f"stub={stub_url}"]
    if suite == "bench_peer":  # our server only: transformers serve takes too long to start for a smoke test
        argv += ["--peer", "none", "--servers", "radixserve", "--users", "2"]
    return argv


@pytest.mark.parametrize("suite", SUITES)
def test_suite_quick(suite, tmp_path, model_cache_dir, tiny_dir, stub_server, one_torch_thread):
    module = importlib.import_module(f"radixserve.benchmarks.{suite}")
    module.main(suite_argv(suite, tmp_path, model_cache_dir, stub_server[0]))
    results = list(tmp_path.glob("*-quick-*.json"))
    assert len(results) == 1, results
    doc = json.loads(results[0].read_text())
    assert results[0].with_suffix(".png").stat().st_size > 0
    if suite == "bench_kernels":
        assert {"cpu_reference", "env", "command", "suite"} <= set(doc)
        return
    assert {"suite", "command", "config", "env", "summary", "measurements"} <= set(doc)
    assert "load_average" in doc["env"] and doc["summary"]
    if suite in ("bench_workloads", "bench_cluster", "bench_peer"):
        m = doc["measurements"]
        assert {"workloads", "aggregate", "round_ratios", "runs"} <= set(m)
        assert set(m["aggregate"]) == (set(workloads.WORKLOADS) if suite != "bench_peer" else
                                       {f"{w}@2u" for w in workloads.WORKLOADS})
        run = m["runs"][0]
        assert run["records"] and {"ttft_p50", "ttft_p99", "tpot_p50", "goodput_req_per_s",
                                   "hit_rate_gpu"} <= set(run["summary"])
        assert all(r["error"] is None for run in m["runs"] for r in run["records"])
    if suite == "bench_workloads":
        assert "shared_prefix/ttft_p50_speedup_vs_cache_off" in doc["summary"]
        assert doc["summary"]["shared_prefix/hit_rate_cache_on"] > 0.3
    if suite == "bench_cluster":
        assert doc["measurements"]["runs"][0]["summary"]["replicas"]
    if suite == "bench_peer":
        assert doc["summary"]["shared_prefix@2u/hit_rate_radixserve"] > 0.2 and doc["summary"]["errors"] == 0
        # The TTFT parts: every request joined to its server stamps, parts summing to the client's TTFT
        sp = doc["measurements"]["ttft_breakdown"]["shared_prefix@2u"]["radixserve"]
        rows = sp["rounds"][0]["requests"]
        assert sp["summary"]["n"] == len(rows) == len(m["runs"][0]["records"]) and sp["rounds"][0]["steps"]
        for row in rows:
            assert all(row[p] >= -1e-3 for p in sp_parts(doc)), row
            assert abs(sum(row[p] for p in sp_parts(doc)) - row["ttft"]) < 1e-3, row


def sp_parts(doc: dict) -> list[str]:
    return doc["measurements"]["ttft_breakdown"]["parts"]


def test_token_space_skips_special_tokens_at_either_end():
    class Tok:
        def __init__(self, special, vocab):
            self.special_token_ids, self.vocab_size = frozenset(special), vocab
    assert TokenSpace.from_tokenizer(Tok(range(2032, 2048), 2048)) == TokenSpace(10, 2032)  # embedded models
    assert TokenSpace.from_tokenizer(Tok(range(17), 49152)) == TokenSpace(17, 49152)  # SmolLM2
    assert TokenSpace.from_tokenizer(Tok((), 100)) == TokenSpace(10, 100)


def test_peer_suite_pure_parts():
    from radixserve.benchmarks import bench_peer
    body = bench_peer.peer_body({"model": "m", "ignore_eos": True, "max_tokens": 3, "temperature": 0.0})
    assert "ignore_eos" not in body and json.loads(body["generation_config"]) == {"eos_token_id": -1,
                                                                                  "do_sample": False}
    cfg = bench_peer.parse_config(bench_peer.build_parser().parse_args(["--quick", "--peer", "none"]))
    assert cfg.servers == ("radixserve", "radixserve_nocache") and cfg.reference == "radixserve"
    full = bench_peer.PeerBenchConfig()
    seeds = {bench_peer.request_seed(full, r, i) for r in range(3) for i in range(len(full.users))}
    assert len(seeds) == 3 * len(full.users)  # no run reuses another's prompts
    argv = bench_peer.transformers_argv(full, "/models/x", 1234)
    assert argv[-1] == "/models/x" and "--continuous-batching" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--cb-num-blocks") + 1] == str(full.kv_tokens // full.peer_block_size)
    spec = bench_peer.ours_spec(full, "/models/x", prefix_cache=False)
    assert spec["engine"]["num_gpu_blocks"] * full.block_size == full.kv_tokens
    assert not spec["engine"]["enable_prefix_caching"]
    recs = [rec(0, 0.0, 0.1, 0.1, 2, prompt=10), rec(1, 0.0, 0.1, 0.1, 2, prompt=12)]
    other = [rec(0, 0.0, 0.1, 0.1, 2, prompt=10), rec(1, 0.0, 0.1, 0.1, 2, prompt=13)]
    runs = [Run(0, "w@1u", "radixserve", _summary(1.0, 1.0), recs), Run(0, "w@1u", "transformers", _summary(1.0, 1.0), other)]
    assert bench_peer.prompt_mismatches(runs) == {"w@1u": 1}
    with pytest.raises(ValueError, match="servers"):
        bench_peer.PeerBenchConfig(servers=("vllm",))


def test_report_and_cli(tmp_path, model_cache_dir, one_torch_thread):
    from radixserve.benchmarks import bench_workloads, report
    # A tiny results directory: one workloads result, rendered to a page with its table and plot.
    bench_workloads.main(["--quick", "--out-dir", str(tmp_path), "--cache-dir", model_cache_dir,
                          "--workloads", "shared_prefix", "--variants", "cache_on,cache_off"])
    readme = tmp_path / "README.md"
    (tmp_path / "PROJECT.md").write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    text = report.main(["--results-dir", str(tmp_path), "--output", str(readme), "--include-quick",
                        "--readme", str(tmp_path / "PROJECT.md")])
    name = next(tmp_path.glob("workloads-quick-*.json")).name
    assert name in text and name.replace(".json", ".png") in text and "ttft_p50_speedup_vs_cache_off" in text
    project = (tmp_path / "PROJECT.md").read_text()
    assert "old" not in project and name in project and project.endswith("rest\n")
    r = subprocess.run([sys.executable, "-m", "radixserve.cli", "bench", "--list"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and all(s in r.stdout for s in SUITES + ["report"])
    r = subprocess.run([sys.executable, "-m", "radixserve.cli", "bench", "no_such_suite"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown benchmark suite" in r.stderr
