"""Peer KV end to end, two real engines in one process: B pulls a prefix from A."""
from __future__ import annotations

import pytest

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.peer import KVExport, PeerHint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
DOC = "The quarterly report covers revenue, costs, staffing and the outlook for next year. " * 4


def engine(tiny_dir, fetcher=None, tp=1) -> LLM:
    llm = LLM(str(tiny_dir), num_gpu_blocks=48, num_cpu_blocks=64, max_model_len=256, tensor_parallel_size=tp,
              engine_worker_queue_port=0, cache_queue_port=0)
    if fetcher is not None:  # LLM builds its engine; plug the fetcher in as the cluster would at start
        from radixserve.engine.core.peer_driver import PeerDriver
        llm.engine.peer = PeerDriver(llm.engine, fetcher)
    return llm


def run(llm: LLM, prompt: str, hint: PeerHint | None = None, rid: str = "r"):
    eng = llm.engine
    eng.add_request(rid, prompt, GREEDY, peer_hint=hint)
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final = out
    eng.kv.check_invariants([])
    return final


def logprobs(out):
    return [max(d.values(), key=lambda lp: lp.logprob).logprob if hasattr(next(iter(d.values())), "logprob")
            else max(d.values()) for d in out.outputs[0].logprobs]


@pytest.mark.parametrize("tp", [1, 2])
def test_miss_local_remote_hit_agree(tiny_dir, tp):
    a = engine(tiny_dir, tp=tp)
    calls = []

    def fetch(hint: PeerHint, hashes: list[int]) -> KVExport:
        calls.append(len(hashes))
        return a.engine.export_kv(hashes)

    b = engine(tiny_dir, fetch, tp=tp)
    miss = run(a, DOC + "Question one?")
    local = run(a, DOC + "Question two?", rid="r2")
    blocks = local.num_cached_tokens // 16  # what A holds of this prompt (the router's figure)
    remote = run(b, DOC + "Question two?", PeerHint("a", blocks))
    assert miss.num_cached_tokens == 0 and local.num_cached_tokens > 0
    assert calls and remote.num_cached_tokens == local.num_cached_tokens
    assert remote.outputs[0].token_ids == local.outputs[0].token_ids
    assert logprobs(remote) == pytest.approx(logprobs(local), abs=1e-5)
    m = b.engine.metrics.snapshot()
    assert m["prefix_cache_remote_hits_tokens"] == remote.num_cached_tokens and m["peer_pulls_ok"] == 1
    assert "prefix_cache_remote_hits_tokens" in b.engine.metrics.render()
    again = run(b, DOC + "Question three?", PeerHint("a", blocks), rid="r3")  # now a local hit on B
    assert again.num_cached_tokens == local.num_cached_tokens and len(calls) == 1
    a.shutdown()
    b.shutdown()


def test_failed_or_short_pull_falls_back(tiny_dir):
    a = engine(tiny_dir)
    ref = run(a, DOC + "Question two?")
    mode = {"v": "raise"}

    def fetch(hint: PeerHint, hashes: list[int]) -> KVExport:
        if mode["v"] == "raise":
            raise ConnectionError("holder died")
        full = a.engine.export_kv(hashes)
        return KVExport(full.block_hashes[:2], full.ranks)  # fewer hashes than blocks sent: only 2 used

    b = engine(tiny_dir, fetch)
    blocks = ref.num_cached_tokens // 16 + 6  # more than A has: only what the export brings counts
    failed = run(b, DOC + "Question two?", PeerHint("a", blocks))
    assert failed.outputs[0].token_ids == ref.outputs[0].token_ids and failed.num_cached_tokens == 0
    assert b.engine.metrics.snapshot()["peer_pulls_failed"] == 1
    b.engine.kv.reset_prefix_cache()
    mode["v"] = "short"
    short = run(b, DOC + "Question two?", PeerHint("a", blocks), rid="r2")
    assert short.num_cached_tokens == 32 and short.outputs[0].token_ids == ref.outputs[0].token_ids
    a.shutdown()
    b.shutdown()


def test_slow_pull_times_out_and_recomputes(tiny_dir):
    import threading
    release = threading.Event()

    def fetch(hint: PeerHint, hashes: list[int]) -> KVExport:
        release.wait(5)  # a holder that hangs
        raise TimeoutError("too late")

    b = LLM(str(tiny_dir), num_gpu_blocks=48, num_cpu_blocks=64, max_model_len=256, peer_pull_timeout_s=0.2,
            engine_worker_queue_port=0, cache_queue_port=0)
    from radixserve.engine.core.peer_driver import PeerDriver
    b.engine.peer = PeerDriver(b.engine, fetch)
    out = run(b, DOC + "Question two?", PeerHint("a", 6))
    release.set()
    assert out.error is None and out.num_cached_tokens == 0
    assert b.engine.metrics.snapshot()["peer_pulls_failed"] == 1
    b.shutdown()


def test_remote_hit_without_a_cpu_tier(tiny_dir):
    """Peer KV needs no swap space: an engine given a fetcher starts the cache queue itself."""
    from types import SimpleNamespace

    from radixserve.engine.core.llm_engine import LLMEngine
    from radixserve.engine.entrypoints.llm import engine_config

    def build(fetch):
        cfg = engine_config(str(tiny_dir), num_gpu_blocks=48, max_model_len=256, engine_worker_queue_port=0,
                            cache_queue_port=0)
        return SimpleNamespace(engine=LLMEngine(cfg, peer_fetcher=fetch))

    def refuse(hint: PeerHint, hashes: list[int]) -> KVExport:
        raise ConnectionError("A pulls from nobody")

    a = build(refuse)
    b = build(lambda hint, hashes: a.engine.export_kv(hashes))
    assert a.engine.kv.cpu is None and b.engine.transfers is not None
    local = run(a, DOC + "Question two?")
    remote = run(b, DOC + "Question two?", PeerHint("a", 6))
    assert remote.num_cached_tokens == 6 * 16 and remote.outputs[0].token_ids == local.outputs[0].token_ids
    assert logprobs(remote) == pytest.approx(logprobs(local), abs=1e-5)
    a.engine.shutdown()
    b.engine.shutdown()
