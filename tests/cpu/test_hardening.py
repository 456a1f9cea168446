"""Requests that used to freeze a replica or crash a handler (issue: hardening)."""
from __future__ import annotations

import pytest

from radixserve.engine import LLM, SamplingParams
from tests.cpu.openai_harness import MODEL, assert_error, wait_idle

LONE_SURROGATE = '{"model": "%s", "prompt": "hi \\ud800 there", "max_tokens": 1}' % MODEL


def test_more_sequences_than_a_replica_runs_is_a_400(http, url, engine):
    limit = engine.engine.config.scheduler.max_num_seqs
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert_error(http.post(f"{url}/v1/completions", json={**body, "n": limit + 1}), 400, param="n",
                 contains=f"max_num_seqs is {limit}")
    assert_error(http.post(f"{url}/v1/completions", json={**body, "n": 1, "best_of": 10**6}), 400, param="best_of")
    assert_error(http.post(f"{url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "n": limit + 1,
                                                               "messages": [{"role": "user", "content": "x"}]}),
                 400, param="n")
    assert http.post(f"{url}/v1/completions", json=body).status_code == 200  # nothing waits behind it
    assert wait_idle(engine)[2] == 0


def test_lone_surrogates_are_a_400(http, url):
    headers = {"content-type": "application/json"}
    assert_error(http.post(f"{url}/v1/completions", content=LONE_SURROGATE, headers=headers), 400,
                 param="prompt", contains="lone surrogate")
    chat = '{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "a \\udfff b"}]}' % MODEL
    assert_error(http.post(f"{url}/v1/chat/completions", content=chat, headers=headers), 400, param="messages")
    assert_error(http.post(f"{url}/tokenize", content='{"prompt": "\\ud83d"}', headers=headers), 400,
                 param="prompt")


def test_offline_requests_that_cannot_fit_are_refused(tiny_dir):
    llm = LLM(str(tiny_dir), max_num_seqs=4, max_model_len=256)
    with pytest.raises(ValueError, match="max_num_seqs is 4"):
        llm.generate("hi", SamplingParams(n=5, max_tokens=2))
    assert llm.generate("hi", SamplingParams(n=4, max_tokens=2))[0].outputs  # the engine still serves


def test_aborting_a_request_with_many_sequences_finishes_each_once(tiny_dir):
    llm = LLM(str(tiny_dir), max_num_seqs=2048, max_model_len=128, num_gpu_blocks=4096)
    engine = llm.engine
    engine.add_request("wide", None, SamplingParams(n=2000, max_tokens=50, ignore_eos=True),
                       prompt_token_ids=list(range(5, 40)))
    engine.step()
    request = engine.scheduler.requests["wide"]
    engine.abort_request("wide")
    assert request.is_finished and request.num_finished == 2000
    assert all(s.finish_reason == "abort" for s in request.seqs)
