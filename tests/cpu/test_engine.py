"""End-to-end engine behaviour on the embedded tiny model (real model code, no mocks)."""
from __future__ import annotations

import pytest
import torch

from radixserve.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), max_model_len=1024)


@pytest.fixture(scope="module")
def llm_nocache(tiny_dir):
    return LLM(str(tiny_dir), max_model_len=1024, enable_prefix_caching=False)


def texts(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


SYSTEM = ("You are a careful assistant. Answer briefly and cite the relevant section of the manual "
          "whenever you can. Never invent facts. ")
QUESTIONS = ["How do I reset the device?", "What is the warranty period?", "Where is the serial number?",
             "Can I use it outdoors?", "How long does charging take?"]


def test_prefix_cache_on_equals_off_shared_system_prompt(llm, llm_nocache):
    prompts = [SYSTEM + q for q in QUESTIONS]
    first_on = llm.generate(prompts[:1], GREEDY)  # caches the system prompt
    rest_on = llm.generate(prompts[1:], GREEDY)
    off = llm_nocache.generate(prompts, GREEDY)
    assert texts(first_on + rest_on) == texts(off)
    cached_ids = first_on[0].prompt_token_ids
    for out in rest_on:  # admitted in one step, so only the first prompt's blocks can hit
        shared = next(i for i, (a, b) in enumerate(zip(out.prompt_token_ids + [-1], cached_ids + [-2]))
                      if a != b)
        # exact: every full block of the common prefix, and never the whole prompt
        assert out.num_cached_tokens == (shared // 16) * 16
        assert out.num_cached_tokens < len(out.prompt_token_ids)
    assert all(o.num_cached_tokens == 0 for o in off)


def test_prefix_cache_on_equals_off_multi_turn(llm, llm_nocache):
    def converse(engine):
        history, outs = [], []
        for turn in ("Hi there, who are you?", "Tell me about the weather today.", "And tomorrow?"):
            history.append({"role": "user", "content": turn})
            out = engine.chat(history, GREEDY)[0]
            history.append({"role": "assistant", "content": out.outputs[0].text})
            outs.append(out)
        return outs
    on, off = converse(llm), converse(llm_nocache)
    assert texts(on) == texts(off)
    for prev, cur in zip(on, on[1:]):
        assert cur.num_cached_tokens % 16 == 0
        assert (len(prev.prompt_token_ids) // 16) * 16 <= cur.num_cached_tokens < len(cur.prompt_token_ids)


def test_preemption_gives_same_tokens(tiny_dir, llm_nocache):
    prompts = [f"Request number {i}: " + "words " * (5 + 3 * i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = LLM(str(tiny_dir), num_gpu_blocks=14, max_num_seqs=6)  # forces preemption
    assert texts(small.generate(prompts, params)) == texts(llm_nocache.generate(prompts, params))
    assert small.engine.metrics.snapshot()["num_preemptions"] > 0
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks


def test_bad_inputs_raise_and_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 2000], GREEDY)
    for bad in (dict(max_tokens=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1),
                dict(top_k=-5), dict(n=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10**7]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    out = llm.generate(["still serving"], GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 10


def test_unknown_model_name():
    with pytest.raises(ValueError, match="no-such-model"):
        LLM("no-such-model")


def test_n_best_of_and_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate(["Once upon a time"], params)[0]
    b = llm.generate(["Once upon a time", "unrelated neighbour"], params)[0]  # other batch
    assert len(a.outputs) == 3
    assert texts([a]) == texts([b])  # seeded: independent of batch composition
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # children differ
    best = llm.generate(["Once upon a time"], SamplingParams(n=1, best_of=4, temperature=1.0, seed=3,
                                                             max_tokens=8, ignore_eos=True))[0]
    all4 = llm.generate(["Once upon a time"], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8,
                                                             ignore_eos=True))[0]
    top = max(all4.outputs, key=lambda c: c.cumulative_logprob)
    assert len(best.outputs) == 1 and best.outputs[0].token_ids == top.token_ids


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate(["The meaning of life is"], SamplingParams(temperature=0, max_tokens=20,
                                                                   ignore_eos=True))[0].outputs[0]
    stop = base.text[5:9]
    cut = llm.generate(["The meaning of life is"], SamplingParams(temperature=0, max_tokens=20,
                                                                  ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[:base.text.index(stop)]
    incl = llm.generate(["The meaning of life is"], SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))[0]
    assert incl.outputs[0].text == base.text[:base.text.index(stop) + len(stop)]
    stop_id = base.token_ids[3]
    by_id = llm.generate(["The meaning of life is"], SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]))[0].outputs[0]
    assert by_id.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id


def test_prompt_logprobs_match_hf(llm, hf_tiny):
    prompt = [5, 99, 431, 17, 250, 64, 1000, 12, 7, 300, 42, 8, 19, 77, 120, 3, 9, 55, 600, 71]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(hf_tiny(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 2e-4
        assert len(entry) >= 2


def test_token_id_prompts_and_chat(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("token id prompt")
    a = llm.generate([{"prompt_token_ids": ids}], GREEDY)[0]
    b = llm.generate("token id prompt", GREEDY)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    chat = llm.chat([{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hello"}], GREEDY)[0]
    assert chat.prompt_token_ids[0] == tok.bos_token_id
    assert chat.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat.metrics.ttft is not None and chat.metrics.e2e >= chat.metrics.ttft
