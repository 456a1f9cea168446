"""The CPU tier end to end: miss == device hit == CPU hit, faults, events, config."""
from __future__ import annotations

import pytest

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.events import BlockIndex
from radixserve.engine.cache.transfer import CacheTransferServer

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
DOC = "The quarterly report covers revenue, costs, staffing and the outlook for next year. " * 4


def fillers(n: int) -> list[str]:
    return [f"Unrelated document number {i} about a different topic entirely. " * 3 for i in range(n)]


def tier_engine(tiny_dir, **kw) -> LLM:
    # 24 device blocks of 16 tokens: a few long prompts push the document out.
    return LLM(str(tiny_dir), num_gpu_blocks=24, num_cpu_blocks=256, max_model_len=256,
               engine_worker_queue_port=0, cache_queue_port=0, **kw)


def miss_gpu_cpu(llm: LLM):
    miss = llm.generate([DOC + "Question one?"], GREEDY)[0]
    gpu = llm.generate([DOC + "Question two?"], GREEDY)[0]
    for f in fillers(4):
        llm.generate([f], GREEDY)
    cpu = llm.generate([DOC + "Question two?"], GREEDY)[0]
    return miss, gpu, cpu


@pytest.mark.parametrize("tp", [1, 2])
def test_miss_gpu_hit_cpu_hit_agree(tiny_dir, tp):
    llm = tier_engine(tiny_dir, tensor_parallel_size=tp)
    ref = LLM(str(tiny_dir), enable_prefix_caching=False, max_model_len=256)
    miss, gpu, cpu = miss_gpu_cpu(llm)
    assert miss.num_cached_tokens == 0
    assert gpu.num_cached_tokens > 0 and gpu.num_cpu_cached_tokens == 0
    assert cpu.num_cpu_cached_tokens > 0, "the document should have come back from the CPU tier"
    expect = ref.generate([DOC + "Question one?", DOC + "Question two?"], GREEDY)
    assert miss.outputs[0].token_ids == expect[0].outputs[0].token_ids
    assert gpu.outputs[0].token_ids == cpu.outputs[0].token_ids == expect[1].outputs[0].token_ids
    m = llm.engine.metrics.snapshot()
    assert m["swap_out_blocks"] > 0 and m["swap_in_blocks"] > 0 and m["prefix_cache_cpu_hits_tokens"] > 0
    assert m["swap_in_bytes"] > 0
    llm.engine.kv.check_invariants([])
    llm.shutdown()


def test_event_stream_replays_to_the_tree(tiny_dir):
    llm = tier_engine(tiny_dir)
    index = BlockIndex()
    miss_gpu_cpu(llm)
    assert index.apply(llm.engine.events.drain())
    snap = llm.engine.snapshot()
    assert index.tiers == {e.block_hash: set(e.tiers) for e in snap.blocks}
    assert any(t == {"cpu"} for t in index.tiers.values())
    assert index.last_seq == snap.seq
    llm.shutdown()


def test_failed_swap_in_fails_request_cleanly(tiny_dir, monkeypatch):
    llm = tier_engine(tiny_dir)
    llm.generate([DOC + "Question one?"], GREEDY)
    for f in fillers(4):
        llm.generate([f], GREEDY)
    real = CacheTransferServer._copy

    def broken(self, task):
        if task.kind == "swap_in":
            raise OSError("simulated DMA failure")
        return real(self, task)
    monkeypatch.setattr(CacheTransferServer, "_copy", broken)
    out = llm.generate([DOC + "Question two?"], GREEDY)[0]
    assert out.outputs[0].finish_reason == "error" and "simulated DMA failure" in out.error
    monkeypatch.setattr(CacheTransferServer, "_copy", real)
    llm.engine.kv.check_invariants([])
    again = llm.generate([DOC + "Question two?"], GREEDY)[0]  # the CPU copies were kept
    assert again.outputs[0].finish_reason == "length" and again.num_cpu_cached_tokens > 0
    llm.shutdown()


def test_bad_swap_space_config(tiny_dir):
    with pytest.raises(ValueError, match="swap_space must be >= 0"):
        LLM(str(tiny_dir), swap_space=-1)
    with pytest.raises(ValueError, match="exceeds the .* GiB of host memory available"):
        LLM(str(tiny_dir), swap_space=10**6)
    with pytest.raises(ValueError, match="needs enable_prefix_caching"):
        LLM(str(tiny_dir), swap_space=0.01, enable_prefix_caching=False)


def test_swap_space_sizes_the_cpu_pool(tiny_dir):
    llm = LLM(str(tiny_dir), swap_space=0.01, cache_queue_port=0)
    block_bytes = llm.engine.executor.block_bytes
    assert llm.engine.kv.num_cpu_blocks == int(0.01 * 2**30) // block_bytes
    # tiny-llama: 2 layers x (K, V) x 16 tokens x 2 kv heads x 16 dims x 4 bytes (fp32)
    assert block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    llm.shutdown()


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_modes_give_the_same_tokens(tiny_dir, mode):
    prompts = [f"Request number {i}: " + "words " * (5 + 3 * i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = LLM(str(tiny_dir), enable_prefix_caching=False, max_model_len=256)  # roomy pool: no preemption
    expect = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    llm = LLM(str(tiny_dir), num_gpu_blocks=14, num_cpu_blocks=64, max_num_seqs=6, max_model_len=256,
              preemption_mode=mode, engine_worker_queue_port=0, cache_queue_port=0)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expect
    m = llm.engine.metrics.snapshot()
    assert ref.engine.metrics.snapshot().get("num_preemptions", 0) == 0
    assert m["num_preemptions"] > 0
    if mode == "swap":  # preempted blocks went to the CPU tier and came back from it
        assert m["num_preemptions_swap"] == m["num_preemptions"] and m.get("swap_in_blocks", 0) > 0
    else:  # distinct prompts: nothing but a preempted sequence could have hit the CPU tier
        assert m["num_preemptions_recompute"] == m["num_preemptions"] and m.get("swap_in_blocks", 0) == 0
    llm.engine.kv.check_invariants([])
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    llm.shutdown()
    ref.shutdown()


def test_swap_preemption_needs_a_cpu_tier(tiny_dir):
    with pytest.raises(ValueError, match="preemption_mode='swap'.*swap_space > 0"):
        LLM(str(tiny_dir), preemption_mode="swap")
    with pytest.raises(ValueError, match="holds no .*-byte block"):  # a CPU tier too small for one block
        LLM(str(tiny_dir), preemption_mode="swap", swap_space=1e-9, cache_queue_port=0)
