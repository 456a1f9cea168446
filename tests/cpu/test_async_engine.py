"""AsyncLLMEngine: streaming, concurrency, abort and error paths."""
from __future__ import annotations

import asyncio

import pytest

from radixserve.engine import LLM, AsyncLLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=512)
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_streaming_is_cumulative_and_matches_offline(engine, tiny_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def go():
        outs = [o async for o in engine.generate("streaming test", params)]
        return outs
    outs = run(go())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    lens = [len(o.outputs[0].token_ids) for o in outs]
    assert lens == sorted(lens) and lens[-1] == 12
    for a, b in zip(outs, outs[1:]):
        assert b.outputs[0].text.startswith(a.outputs[0].text)
    offline = LLM(str(tiny_dir), max_model_len=512).generate("streaming test", params)[0]
    assert outs[-1].outputs[0].token_ids == offline.outputs[0].token_ids


def test_concurrent_requests(engine):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def one(i):
        last = None
        async for o in engine.generate(f"request {i}", params, request_id=f"c{i}"):
            last = o
        return last
    async def go():
        return await asyncio.gather(*(one(i) for i in range(8)))
    outs = run(go())
    assert [o.request_id for o in outs] == [f"c{i}" for i in range(8)]
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)


def test_disconnect_aborts_and_frees_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def go():
        agen = engine.generate("a long generation " * 10, params, request_id="gone")
        async for o in agen:
            if len(o.outputs[0].token_ids) >= 3:
                break  # the client went away
        await agen.aclose()
        for _ in range(100):  # the abort is applied between two steps
            state = await engine.call(lambda e: (e.scheduler.requests.get("gone"),
                                                 e.kv.num_free_blocks, e.kv.num_blocks))
            if state[0] is None and state[1] == state[2]:
                return state
            await asyncio.sleep(0.05)
        return state
    req, free, total = run(go())
    assert req is None and free == total


def test_invalid_request_raises_before_streaming(engine):
    async def go():
        async for _ in engine.generate(prompt_token_ids=[5] * 600):
            pass
    with pytest.raises(ValueError, match="max_model_len"):
        run(go())
    assert engine.is_healthy()


def test_explicit_abort(engine):
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)

    async def go():
        outs = []
        async for o in engine.generate("abort me", params, request_id="ab"):
            outs.append(o)
            if len(outs) == 2:
                await engine.abort("ab")
        return outs
    outs = run(go())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def test_construction_error_reaches_the_caller(tiny_dir):
    # The engine is built on its own thread (where it steps): what that raises must surface here.
    with pytest.raises(ValueError, match="max_model_len"):
        AsyncLLMEngine.from_kwargs(str(tiny_dir), max_model_len=0)
