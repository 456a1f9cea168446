"""SamplingParams validation, wire format and stop-token check, and the batched Sampler."""
from __future__ import annotations

import math

import msgpack
import pytest
import torch

from radixserve.engine.core.scheduler_output import NewSampler, SchedulerOutput
from radixserve.engine.executor import wire
from radixserve.engine.executor.protocol import ENGINE_TO_WORKER
from radixserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams, check_stop_token
from radixserve.engine.worker.sampler import Sampler, SeqSamplingState, derive_seed

EOS = 2


def _states(params: list[SamplingParams], prompt: list[int] | None = None,
            outputs: list[list[int]] | None = None) -> list[SeqSamplingState]:
    states = [SeqSamplingState.create(p, prompt or [0]) for p in params]
    for s, out in zip(states, outputs or [[] for _ in params]):
        s.output_token_ids.extend(out)
    return states


def _sample_many(logits_row: torch.Tensor, params: SamplingParams, n: int,
                 seed: int = 0) -> torch.Tensor:
    """``n`` draws for one logits row, as one batch of n identical rows."""
    sampler = Sampler(frozenset({EOS}), seed=seed)
    out = sampler(logits_row.expand(n, -1).contiguous(), _states([params] * n))
    return torch.tensor(out.token_ids)


# -- SamplingParams ------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("best_of", 0),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("seed", 1.5), ("seed", 1 << 65),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 2.1), ("frequency_penalty", -3.0),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", ["a", 1]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"),
    ("skip_special_tokens", None), ("detokenize", 0),
    ("max_tokens", 0), ("max_tokens", 2.0),
    ("min_tokens", -1), ("min_tokens", 17),  # > max_tokens=16
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.0),
    ("prompt_logprobs", -1), ("prompt_logprobs", MAX_LOGPROBS + 1),
])
def test_invalid_field_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_best_of_must_cover_n():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    assert SamplingParams(n=2, best_of=4).num_sequences == 4
    assert SamplingParams(n=3).num_sequences == 3


def test_stop_needs_detokenize():
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_normalisation_and_defaults():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert p.max_tokens == 16 and p.stop == [] and p.stop_token_ids == [] and not p.is_greedy
    q = SamplingParams(top_k=-1, stop="END", stop_token_ids=(5, 6), temperature=0, max_tokens=None,
                       min_tokens=100)
    assert q.top_k == 0 and q.stop == ["END"] and q.stop_token_ids == [5, 6]
    assert q.is_greedy and isinstance(q.temperature, float)
    assert SamplingParams(temperature=1e-6).is_greedy and not SamplingParams(temperature=0.01).is_greedy


def _raw(body: dict) -> bytes:
    return msgpack.packb({"v": wire.WIRE_VERSION, "kind": "params", "body": body})


def test_wire_round_trip_through_the_codec():
    p = SamplingParams(n=2, best_of=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                       seed=(1 << 64) - 1, repetition_penalty=1.1, presence_penalty=-0.5,
                       frequency_penalty=0.25, stop=["\n\n", "東京"], stop_token_ids=[7, 8],
                       ignore_eos=True, max_tokens=None, min_tokens=3, logprobs=5,
                       prompt_logprobs=0, include_stop_str_in_output=True,
                       skip_special_tokens=False, detokenize=True)
    back = wire.decode(wire.encode("params", p), {"params": SamplingParams})[1]
    assert back == p and back is not p and back.stop is not p.stop
    assert wire.decode(wire.encode("params", SamplingParams()), {"params": SamplingParams})[1] == SamplingParams()
    # Nested, as the scheduler sends it to the workers: rebuilt as SamplingParams, not a dict.
    so = SchedulerOutput(1, new_samplers=[NewSampler(4, p, [1, 2], [], child_index=1)])
    got = wire.decode(wire.encode("step", so), ENGINE_TO_WORKER)[1]
    assert got == so and isinstance(got.new_samplers[0].params, SamplingParams)
    # Missing fields take their defaults and are normalised as in a local call.
    q = wire.decode(_raw({"temperature": 0, "stop": "END", "top_k": -1}), {"params": SamplingParams})[1]
    assert q == SamplingParams(temperature=0, stop="END", top_k=-1) and q.stop == ["END"] and q.top_k == 0


@pytest.mark.parametrize("body, match", [
    ({"temperature": 1.0, "use_beam_search": True}, "unknown field"),
    ({"top_p": 0}, "top_p"),                       # type-correct, refused by __post_init__
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop_token_ids": ["7"]}, "stop_token_ids"),
    ({"seed": 1.5}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_codec_rejects_unknown_and_invalid(body, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(_raw(body), {"params": SamplingParams})


def test_step_with_invalid_params_is_rejected_not_executed():
    # A worker's decode of a step must fail as WireError (it answers "failure"), not crash it.
    body = wire.to_plain(SchedulerOutput(1, new_samplers=[NewSampler(4, SamplingParams(), [1], [])]))
    body["new_samplers"][0]["params"]["top_p"] = 2.0
    raw = msgpack.packb({"v": wire.WIRE_VERSION, "kind": "step", "body": body})
    with pytest.raises(wire.WireError, match="top_p"):
        wire.decode(raw, ENGINE_TO_WORKER)


def test_check_stop_token():
    eos = frozenset({2})
    p = SamplingParams(max_tokens=5, stop_token_ids=[7])
    assert check_stop_token(3, p, eos, 1) is None
    assert check_stop_token(2, p, eos, 1) == "stop"
    assert check_stop_token(7, p, eos, 1) == "stop"
    assert check_stop_token(3, p, eos, 5) == "length"
    assert check_stop_token(2, p, eos, 5) == "stop"  # a stop token on the last slot is "stop"
    ignore = SamplingParams(ignore_eos=True, stop_token_ids=[7], max_tokens=5)
    assert check_stop_token(2, ignore, eos, 1) is None
    assert check_stop_token(7, ignore, eos, 1) == "stop"  # ignore_eos leaves stop ids alone
    m = SamplingParams(min_tokens=2, max_tokens=10)
    assert check_stop_token(2, m, eos, 1) is None
    assert check_stop_token(2, m, eos, 2) is None
    assert check_stop_token(2, m, eos, 3) == "stop"
    unbounded = SamplingParams(max_tokens=None)
    assert check_stop_token(3, unbounded, eos, 10**6) is None


# -- seeds ---------------------------------------------------------------------------

def test_derive_seed():
    assert derive_seed(42, 0) == 42
    children = {derive_seed(42, i) for i in range(100)}
    assert len(children) == 100 and all(0 <= c < 1 << 64 for c in children)
    assert derive_seed(-1, 0) == (1 << 64) - 1
    s = SeqSamplingState.create(SamplingParams(seed=7), [1, 2], child_index=3)
    assert s.generator is not None and s.generator.initial_seed() == derive_seed(7, 3)
    assert SeqSamplingState.create(SamplingParams(), [1]).generator is None


# -- Sampler: greedy -----------------------------------------------------------------

def test_greedy_is_argmax_and_logprobs_are_raw():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    sampler = Sampler(frozenset({EOS}))
    out = sampler(logits, _states([SamplingParams(temperature=0)] * 6))
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    assert out.top_logprobs == [None] * 6


def test_greedy_ties_take_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0]])
    out = Sampler()(logits, _states([SamplingParams(temperature=0)]))
    assert out.token_ids == [1]


def test_input_logits_not_modified():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1),
              SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0),
              SamplingParams(min_tokens=4)]
    Sampler(frozenset({EOS}))(logits, _states(params, outputs=[[1, 2], [3, 3], []]))
    assert torch.equal(logits, before)


# -- Sampler: random -----------------------------------------------------------------

def _peaked_logits(vocab: int = 64, rows: int = 8, gap: float = 0.5) -> torch.Tensor:
    """Random logits whose argmax leads the runner-up by at least ``gap``."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, vocab, generator=g)
    best = torch.randint(vocab, (rows,), generator=g)
    logits[torch.arange(rows), best] = logits.max(-1).values + gap
    return logits


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-3),  # the random path, but nearly a point mass
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.5, top_p=1e-6),
    SamplingParams(temperature=1.0, min_p=1.0),
], ids=["tiny-temperature", "top_k=1", "tiny-top_p", "min_p=1"])
def test_degenerate_random_equals_greedy(params):
    logits = _peaked_logits()
    sampler = Sampler(frozenset({EOS}), seed=3)
    greedy = logits.argmax(-1).tolist()
    for _ in range(20):
        assert sampler(logits, _states([params] * len(logits))).token_ids == greedy


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, -3.0, 0.2])
    n = 20000
    tokens = _sample_many(logits, SamplingParams(temperature=temperature), n, seed=11)
    counts = torch.bincount(tokens, minlength=8).float()
    probs = (logits / temperature).softmax(-1)
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001; the seed is fixed, so not flaky.
    assert _chi_square(counts, probs) < 24.3
    # ... and it is not a vacuous test: the wrong temperature fails it.
    wrong = (logits / (1.5 * temperature)).softmax(-1)
    assert _chi_square(counts, wrong) > 100


def test_top_k_top_p_min_p_supports():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    n = 2000  # P(a 5% token never drawn) = 0.95**2000 ~ 1e-45

    def support(params):
        return set(_sample_many(logits, params, n).tolist())

    assert support(SamplingParams()) == {0, 1, 2, 3}
    assert support(SamplingParams(top_k=2)) == {0, 1}
    assert support(SamplingParams(top_k=3)) == {0, 1, 2}
    # vLLM's rule: drop the least likely tokens whose cumulative probability <= 1 - top_p.
    assert support(SamplingParams(top_p=0.75)) == {0, 1}  # drops 0.05 + 0.15 = 0.2 <= 0.25
    assert support(SamplingParams(top_p=0.85)) == {0, 1, 2}  # 0.2 > 0.15: only 0.05 goes
    assert support(SamplingParams(top_p=0.4)) == {0}
    # min_p is relative to the most likely token: 0.2 * 0.5 = 0.1 keeps 0.15, drops 0.05.
    assert support(SamplingParams(min_p=0.2)) == {0, 1, 2}
    assert support(SamplingParams(min_p=0.5)) == {0, 1}  # 0.3 >= 0.25 > 0.15
    assert support(SamplingParams(min_p=0.7)) == {0}
    assert support(SamplingParams(top_k=3, top_p=0.75)) == {0, 1}  # filters combine
    assert support(SamplingParams(top_k=2, min_p=0.7)) == {0}
    # The kept mass is renormalised: top_k=2 gives 0.5:0.3.
    tokens = _sample_many(logits, SamplingParams(top_k=2), 20000, seed=5)
    counts = torch.bincount(tokens, minlength=4).float()
    assert _chi_square(counts, torch.tensor([0.625, 0.375, 0.0, 0.0])) < 10.8  # 1 dof, p=0.001


def test_top_k_keeps_ties_at_the_cutoff():
    logits = torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0])
    assert set(_sample_many(logits, SamplingParams(top_k=1), 1000).tolist()) == {1, 2, 4}


def test_top_k_larger_than_vocab_is_disabled():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert set(_sample_many(logits, SamplingParams(top_k=100), 2000).tolist()) == {0, 1, 2}


def test_seeded_sampling_reproducible_and_batch_independent():
    torch.manual_seed(0)
    vocab = 1000
    target = SamplingParams(temperature=1.0, seed=1234)

    def run(neighbours: list[SamplingParams], position: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(frozenset({EOS}), seed=sampler_seed)
        params = neighbours[:position] + [target] + neighbours[position:]
        states = _states(params)
        logits_seq = [torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(s))
                      for s in range(10)]
        tokens = []
        for step, logits in enumerate(logits_seq):
            logits[position] = torch.linspace(-1, 1, vocab)  # the target sees the same logits
            out = sampler(logits, states)
            for s, t in zip(states, out.token_ids):
                s.output_token_ids.append(t)
            tokens.append(out.token_ids[position])
        return tokens

    alone = run([], 0, 0)
    assert run([SamplingParams(temperature=0.7)] * 3, 1, 99) == alone
    assert run([SamplingParams(temperature=0), SamplingParams(seed=5, top_k=3),
                SamplingParams(repetition_penalty=1.3)], 3, 7) == alone
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_and_children_differ():
    logits = torch.zeros(1, 1000)  # uniform: any two streams almost surely differ

    def stream(params, child_index=0):
        sampler = Sampler()
        state = SeqSamplingState.create(params, [0], child_index=child_index)
        return [sampler(logits, [state]).token_ids[0] for _ in range(8)]

    a = stream(SamplingParams(seed=1))
    assert a == stream(SamplingParams(seed=1))
    assert a != stream(SamplingParams(seed=2))
    assert a != stream(SamplingParams(seed=1), child_index=1)
    assert stream(SamplingParams(seed=1), 1) == stream(SamplingParams(seed=1), 1)


def test_duplicated_rows_sample_independently():
    """n > 1 children share one logits row; each row still gets its own noise."""
    logits = torch.zeros(1, 1000).expand(8, -1)
    out = Sampler(seed=0)(logits, _states([SamplingParams()] * 8))
    assert len(set(out.token_ids)) > 1


def test_unseeded_rows_follow_sampler_seed():
    logits = torch.zeros(4, 1000)
    a = Sampler(seed=3)(logits, _states([SamplingParams()] * 4)).token_ids
    b = Sampler(seed=3)(logits, _states([SamplingParams()] * 4)).token_ids
    c = Sampler(seed=4)(logits, _states([SamplingParams()] * 4)).token_ids
    assert a == b and a != c


# -- penalties and min_tokens --------------------------------------------------------

def test_penalties_match_hand_computed_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0],
                           [2.0, -1.0, 0.5, 0.0, 3.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams()]
    states = _states(params, prompt=[0, 1], outputs=[[2, 2, 3], [2, 2, 3]])
    got = Sampler().penalised_logits(logits, states)
    # repetition (prompt+output seen: 0,1,2,3): 2/2=1, -1*2=-2, 0.5/2=0.25, 0*2=0, 3 unseen
    # frequency (output counts 2:2, 3:1) and presence (2, 3 present):
    #   token 2: 0.25 - 0.5*2 - 0.25 = -1.0; token 3: 0 - 0.5*1 - 0.25 = -0.75
    expected = torch.tensor([[1.0, -2.0, -1.0, -0.75, 3.0],
                             [2.0, -1.0, 0.5, 0.0, 3.0]])  # no penalties: untouched
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_each_penalty_alone():
    logits = torch.tensor([[1.0, -2.0, 4.0, 0.5]])
    prompt, out = [3], [0, 0, 1]

    def pen(**kw):
        return Sampler().penalised_logits(logits, _states([SamplingParams(**kw)], prompt, [out]))[0]

    torch.testing.assert_close(pen(repetition_penalty=1.25),
                               torch.tensor([0.8, -2.5, 4.0, 0.4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(pen(repetition_penalty=0.5),  # < 1 encourages repeats
                               torch.tensor([2.0, -1.0, 4.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(pen(frequency_penalty=1.0),  # output only: prompt token 3 kept
                               torch.tensor([-1.0, -3.0, 4.0, 0.5]), rtol=0, atol=1e-6)
    torch.testing.assert_close(pen(presence_penalty=-0.5),  # negative encourages
                               torch.tensor([1.5, -1.5, 4.0, 0.5]), rtol=0, atol=1e-6)


def test_masked_logits_stay_masked():
    """-inf logits (padded vocab, grammar masks) survive every processing step without NaN."""
    logits = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf"), -0.5]]).expand(4, -1)
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5),
              SamplingParams(repetition_penalty=0.7, top_p=0.9, min_p=0.1),
              SamplingParams(temperature=0, repetition_penalty=1.5),
              SamplingParams(top_k=2, min_tokens=5)]
    states = _states(params, prompt=[1, 0], outputs=[[3, 3, 2]] * 4)
    sampler = Sampler(frozenset({EOS}))
    pen = sampler.penalised_logits(logits, states)
    assert not pen.isnan().any()
    assert pen[:, 1].eq(float("-inf")).all() and pen[:, 3].eq(float("-inf")).all()
    for _ in range(50):
        out = sampler(logits, states)
        assert not {1, 3} & set(out.token_ids)
        assert all(math.isfinite(lp) for lp in out.logprobs)


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert Sampler()(logits, _states([params], prompt=[0])).token_ids == [1]
    assert Sampler()(logits, _states([SamplingParams(temperature=0)], prompt=[0])).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 0.0, 10.0, 9.0, 1.0]])  # EOS=2 best, then stop token 3
    sampler = Sampler(frozenset({EOS}))
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3])
    for n_out, expected in [(0, 4), (2, 4), (3, 2)]:
        states = _states([params], outputs=[[4] * n_out])
        assert sampler(logits, states).token_ids == [expected]
    # ignore_eos: EOS is no stop, so it is not masked; stop_token_ids still are.
    ignore = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2, 3], ignore_eos=True)
    assert sampler(logits, _states([ignore])).token_ids == [4]
    ignore_only_eos = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sampler(logits, _states([ignore_only_eos])).token_ids == [2]
    # Random rows are masked too, and the logprob is still the raw one.
    rnd = SamplingParams(min_tokens=1, stop_token_ids=[3])
    out = sampler(logits.expand(200, -1), _states([rnd] * 200))
    assert not {2, 3} & set(out.token_ids)
    raw = logits.log_softmax(-1)[0]
    assert out.logprobs[0] == pytest.approx(raw[out.token_ids[0]].item(), abs=1e-5)


# -- logprobs ------------------------------------------------------------------------

def test_logprobs_are_raw_and_top_logprobs_sorted():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    params = [SamplingParams(temperature=0.3, top_k=5, repetition_penalty=1.5, logprobs=5),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(logprobs=MAX_LOGPROBS),
              SamplingParams(temperature=0)]
    out = Sampler(frozenset({EOS}))(logits, _states(params, prompt=list(range(20))))
    raw = logits.log_softmax(-1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-5)
    assert out.top_logprobs[1] == [] and out.top_logprobs[3] is None
    for i, k in [(0, 5), (2, MAX_LOGPROBS)]:
        top = out.top_logprobs[i]
        assert len(top) == k
        lps = [lp for _, lp in top]
        assert lps == sorted(lps, reverse=True)
        ref_vals, ref_ids = raw[i].topk(k)
        assert [t for t, _ in top] == ref_ids.tolist()
        assert lps == pytest.approx(ref_vals.tolist(), abs=1e-5)
        assert all(isinstance(t, int) and isinstance(lp, float) for t, lp in top)
    assert all(math.isfinite(lp) and lp <= 0 for lp in out.logprobs)


def test_mixed_batch():
    """Greedy rows stay argmax while random, seeded and penalised rows share the batch."""
    logits = _peaked_logits(vocab=128, rows=6, gap=2.0)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(temperature=0), SamplingParams(top_k=1, min_p=0.1, logprobs=2),
              SamplingParams(temperature=0, presence_penalty=0.1), SamplingParams(min_tokens=2)]
    out = Sampler(frozenset({EOS}))(logits, _states(params))
    greedy = logits.argmax(-1).tolist()
    for i in (0, 2, 3, 4):  # penalties of 0.1 cannot beat a gap of 2
        assert out.token_ids[i] == greedy[i]
    assert len(out.token_ids) == len(out.logprobs) == len(out.top_logprobs) == 6
    assert len(out.top_logprobs[3]) == 2


def test_rejects_misaligned_logits():
    with pytest.raises(ValueError, match="num_rows"):
        Sampler()(torch.zeros(2, 5), _states([SamplingParams()]))
