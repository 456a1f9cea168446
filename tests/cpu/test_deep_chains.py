"""A long cached prefix is a deep chain of blocks: every walk of the tree must be iterative.

At block size 16 a 24k-token prompt is 1,500 levels, past Python's recursion limit (1,000).
"""
from __future__ import annotations

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.kv_manager import KVCacheManager
from tests.cpu.helpers import make_seq, settle

DEPTH = 5000


def cached_chain(kv: KVCacheManager, namespace: tuple[str, ...] = ()) -> None:
    seq = make_seq(list(range(DEPTH * kv.block_size + 1)), namespace, block_size=kv.block_size)
    hit = kv.lookup(seq)
    assert kv.allocate(seq, seq.num_tokens - hit.num_tokens(kv.block_size), hit)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit(seq)
    kv.free(seq)


def test_walks_of_a_5000_block_chain():
    kv = KVCacheManager(DEPTH + 8, 4, True)
    cached_chain(kv, ("adapter-a",))
    first = next(n for n in kv.tree.nodes() if n.parent is None)
    assert len(list(first.subtree())) == DEPTH
    assert kv.drop_namespace("adapter-a") == DEPTH  # what unloading a LoRA adapter does
    cached_chain(kv)
    cached_chain(kv, ("other",))  # evicts the first chain block by block
    assert kv.reset_prefix_cache() and kv.num_cached_blocks == 0
    kv.check_invariants([])


def test_deep_chain_through_the_cpu_tier():
    kv = KVCacheManager(DEPTH + 8, 4, True, num_cpu_blocks=DEPTH + 8, demote_window=DEPTH)
    cached_chain(kv, ("adapter-a",))
    settle(kv)  # write the chain back to the CPU tier
    cached_chain(kv, ("other",))  # the device copies go; the CPU copies stay
    settle(kv)
    cached_chain(kv, ("third",))  # now the CPU tier evicts the first chain
    settle(kv)
    assert kv.drop_namespace("other") > 0
    kv.check_invariants([])


def test_engine_with_a_long_context_and_one_token_blocks(tiny_dir):
    # block_size 1: a 1,900-token prompt caches a 1,900-deep chain in a real engine.
    llm = LLM(str(tiny_dir), block_size=1, max_model_len=2048, num_gpu_blocks=4200)
    prompt = [5 + i % 2000 for i in range(1900)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    again = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    assert again.num_cached_tokens == 1899 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.kv.reset_prefix_cache()
