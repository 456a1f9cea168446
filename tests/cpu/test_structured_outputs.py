"""Structured outputs in the engine: every constrained output obeys its grammar.

tiny-llama has random weights, so only the grammar makes its output valid: an
output that finished with "stop" must parse and validate; one cut by
max_tokens must be a prefix the grammar accepts (checked token by token with a
fresh matcher).
"""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")  # the `structured` extra (in `test`)
jsonschema = pytest.importorskip("jsonschema")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from radixserve import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from radixserve.engine.structured import xgrammar_backend as xgb  # noqa: E402


@pytest.fixture(scope="module")
def llm(tiny_dir):
    llm = LLM(str(tiny_dir), max_model_len=512, log_stats_interval_s=0)
    yield llm
    llm.engine.shutdown()


def accepted_prefix(llm: LLM, so: StructuredOutputsParams, token_ids: list[int]) -> bool:
    """Whether a fresh matcher of ``so`` accepts every token (the engine's compiled grammar)."""
    xgr = xgb.import_xgrammar()
    matcher = xgr.GrammarMatcher(llm.engine.structured.prepare(so).result())
    return all(matcher.accept_token(t) for t in token_ids)


def check_json(llm: LLM, so: StructuredOutputsParams, schema: dict, c) -> bool:
    """True when ``c`` finished and validates; a cut one must be an accepted prefix."""
    tok = llm.engine.tokenizer
    assert not set(c.token_ids) & (tok.special_token_ids - llm.engine.eos_token_ids)  # special tokens are no text
    if c.finish_reason == "stop":
        jsonschema.validate(json.loads(c.text), schema)
        return True
    assert c.finish_reason == "length"
    assert accepted_prefix(llm, so, c.token_ids), c.text
    return False


# -- random JSON schemas ---------------------------------------------------------------------------

_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 100}),
    st.lists(st.sampled_from(["red", "green", "blue", "a b", 'q"x']), min_size=1, max_size=3, unique=True)
      .map(lambda v: {"enum": v}),
    st.integers(0, 4).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "null"}),
)
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=2).map(lambda items: {"type": "array", "items": items[0], "maxItems": 2}
                                    if items else {"type": "array", "maxItems": 0}),
    st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, min_size=1, max_size=2).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False})), max_leaves=4)
_schema = st.dictionaries(st.sampled_from(["id", "name", "ok", "tags"]), _value, min_size=1, max_size=3).map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


def test_random_json_schemas_validate(llm):
    finished = []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(schema=_schema, seed=st.integers(0, 1000))
    def run(schema, seed):
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        params = SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=80, structured_outputs=so)
        for c in llm.generate(["Reply in JSON:"], params)[0].outputs:
            finished.append(check_json(llm, so, schema, c))
    run()
    assert sum(finished) >= len(finished) // 2, finished  # most close within max_tokens


def test_regex_choice_grammar_and_json_object(llm):
    cases = [
        (StructuredOutputsParams(regex=r"[a-z]{2,4}-\d{1,3}"), lambda t: re.fullmatch(r"[a-z]{2,4}-\d{1,3}", t)),
        (StructuredOutputsParams(choice=["yes", "no", 'say "hi"']), lambda t: t in ("yes", "no", 'say "hi"')),
        (StructuredOutputsParams(grammar='root ::= "A" [0-9] [0-9]? "B"'), lambda t: re.fullmatch(r"A\d\d?B", t)),
        (StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
         lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs=so)
              for so, _ in cases for s in range(3)]
    outs = llm.generate(["x"] * len(params), params)
    for i, out in enumerate(outs):
        c = out.outputs[0]
        _, ok = cases[i // 3]
        if i // 3 < 3:  # the finite grammars always end
            assert c.finish_reason == "stop" and c.stop_reason is None, c
        if c.finish_reason == "stop":
            assert ok(c.text), c.text


def test_unconstrained_rows_unchanged_by_constrained_neighbours(llm):
    plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True, logprobs=2)]
    prompts = ["the cat", "a dog ran"]
    alone = llm.generate(prompts, plain)
    so = StructuredOutputsParams(json={"type": "object", "properties": {"k": {"type": "integer"}}})
    mixed_params = [plain[0], SamplingParams(max_tokens=12, structured_outputs=so), plain[1],
                    SamplingParams(max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))]
    mixed = llm.generate(["the cat", "the cat", "a dog ran", "zz"], mixed_params)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert [p.logprob for p in mixed[2].outputs[0].logprobs[0].values()] == \
        [p.logprob for p in alone[1].outputs[0].logprobs[0].values()]


def test_n_stop_strings_logprobs_and_cached_prefix(llm):
    schema = {"type": "object", "properties": {"a": {"enum": ["p", "q"]}, "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    prompt = "a shared system prompt that is long enough to fill a block or two of cache " * 2
    for _ in range(2):  # the second run hits the prefix cache
        params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=60, logprobs=1, stop=["}"],
                                include_stop_str_in_output=True, structured_outputs=so)
        out = llm.generate([prompt], params)[0]
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), schema)
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp.logprob > -1e9 for pos in c.logprobs for lp in pos.values() if lp.rank == 1)
    assert out.num_cached_tokens > 0


def test_bad_grammars_are_value_errors_naming_the_problem(llm):
    for so, words in [(StructuredOutputsParams(json={"type": "bogus"}), "bogus"),
                      (StructuredOutputsParams(regex="[a-"), "regex"),
                      (StructuredOutputsParams(grammar="root ::= nothere"), "nothere")]:
        with pytest.raises(ValueError, match=words):
            llm.generate(["x"], SamplingParams(structured_outputs=so))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    assert llm.engine.scheduler.requests == {}  # nothing was queued


def test_compiled_grammar_cache_hits(llm):
    m = llm.engine.metrics
    so = StructuredOutputsParams(regex=r"cache-[0-9]{3}")
    before = m.snapshot()
    llm.generate(["x", "y"], [SamplingParams(max_tokens=20, structured_outputs=so)] * 2)
    after = m.snapshot()
    assert after["grammar_compiles"] - before["grammar_compiles"] == 1
    assert after["grammar_cache_hits"] - before["grammar_cache_hits"] >= 1


def test_preemption_keeps_outputs_valid(tiny_dir):
    # 12 blocks of 16 tokens for 4 sequences that each want 5 or more: the scheduler must preempt.
    llm = LLM(str(tiny_dir), max_model_len=256, num_gpu_blocks=12, block_size=16, log_stats_interval_s=0)
    try:
        schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                  "minItems": 25, "maxItems": 30}
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=80, structured_outputs=so) for s in range(4)]
        outs = llm.generate([f"count {i}: " * 4 for i in range(4)], params)
        assert llm.engine.metrics.snapshot()["num_preemptions"] > 0
        for out in outs:
            check_json(llm, so, schema, out.outputs[0])
    finally:
        llm.engine.shutdown()


def test_tensor_parallel_masks_on_rank0(tiny_dir):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, engine_worker_queue_port=0, max_model_len=256,
              log_stats_interval_s=0)
    try:
        so = StructuredOutputsParams(regex=r"(ab|cd){2,5}!")
        outs = llm.generate(["x", "y"], [SamplingParams(temperature=1.0, seed=s, max_tokens=40,
                                                        structured_outputs=so) for s in (1, 2)])
        for out in outs:
            assert out.outputs[0].finish_reason == "stop"
            assert re.fullmatch(r"(ab|cd){2,5}!", out.outputs[0].text), out.outputs[0].text
    finally:
        llm.engine.shutdown()


def _run(eng, done: dict, steps: int | None = None) -> None:
    n = 0
    while eng.has_unfinished_requests() and (steps is None or n < steps):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        n += 1


def test_a_request_waits_for_its_grammar_without_blocking_others(llm):
    from concurrent.futures import Future
    eng, done = llm.engine, {}
    so, bad = StructuredOutputsParams(regex="wait-[0-9]"), StructuredOutputsParams(regex="never-[0-9]")
    gates = {so.key: Future(), bad.key: Future()}  # their compiles "are still running"
    eng.structured._cache.update(gates)
    eng.add_request("c", "x", SamplingParams(max_tokens=10, structured_outputs=so))
    eng.add_request("f", "x", SamplingParams(max_tokens=10, structured_outputs=bad))
    eng.add_request("u", "y", SamplingParams(max_tokens=5, ignore_eos=True))
    _run(eng, done, steps=20)
    assert set(done) == {"u"} and len(done["u"].outputs[0].token_ids) == 5
    assert eng.scheduler.requests["c"].seqs[0].num_computed_tokens == 0  # never scheduled
    del eng.structured._cache[so.key]
    gates[so.key].set_result(eng.structured.prepare(so).result())
    gates[bad.key].set_exception(RuntimeError("out of memory"))
    _run(eng, done)
    assert re.fullmatch(r"wait-[0-9]", done["c"].outputs[0].text)
    assert done["f"].outputs[0].finish_reason == "error" and "out of memory" in done["f"].error
    eng.structured._cache.pop(bad.key, None)
    assert eng.structured._matchers == {}


def test_special_tokens_are_never_text(llm):
    """A free-text position (a JSON string, ``.*``) allows no special token but the stop token."""
    import numpy as np
    import torch
    xgr = xgb.import_xgrammar()
    tok, eos = llm.engine.tokenizer, llm.engine.eos_token_ids
    for so, prefix in [(StructuredOutputsParams(json={"type": "string"}), '"'),
                       (StructuredOutputsParams(regex=".*"), "")]:
        matcher = xgr.GrammarMatcher(llm.engine.structured.prepare(so).result())
        for t in tok.encode(prefix, add_special_tokens=False):
            assert matcher.accept_token(t)
        bitmask = torch.empty((1, llm.engine.structured.num_words), dtype=torch.int32)
        matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
        assert allowed.sum() > 100  # free text
        assert {i for i in tok.special_token_ids if allowed[i]} <= set(eos)
