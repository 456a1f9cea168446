"""Incremental detokenization and stop strings (the stop-token check is in test_sampling.py)."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from radixserve.engine.core.detokenizer import IncrementalDetokenizer
from radixserve.engine.sampling_params import SamplingParams
from radixserve.engine.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "café 東京 🎉 naïve résumé",
    "Hello world! Hello there. STOP here.",
    "日本語のテキスト、東京タワー。",
    "Ünïcödé façade — “quotes” … ",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="session")
def hf_tokenizer() -> HFTokenizer:
    """A small byte-level BPE (Llama-3 / GPT-2 style) trained on CORPUS."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS * 10, trainer)
    return hf


def _save(hf: HFTokenizer, path) -> Tokenizer:
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return Tokenizer(path)


@pytest.fixture(scope="session")
def tokenizer(hf_tokenizer, tmp_path_factory) -> Tokenizer:
    return _save(hf_tokenizer, tmp_path_factory.mktemp("bpe_tokenizer"))


@pytest.fixture(scope="session")
def byte_ids(hf_tokenizer) -> dict[int, int]:
    """Token id of every single byte, to split characters wherever a test likes."""
    table = _bytes_to_unicode()
    ids = {b: hf_tokenizer.token_to_id(c) for b, c in table.items()}
    assert all(i is not None for i in ids.values())
    return ids


def _bytes_tokens(byte_ids: dict[int, int], text: str) -> list[int]:
    return [byte_ids[b] for b in text.encode("utf-8")]


def _run(tokenizer, params: SamplingParams, ids: list[int], prompt: str = "Say:",
         stop_token_at_end: bool = False):
    """Feed ``ids``; return the detokenizer, the streamed chunks and the streamable
    prefix seen after every token."""
    detok = IncrementalDetokenizer(tokenizer, params, tokenizer.encode(prompt))
    chunks: list[str] = []
    prefixes: list[str] = []
    for j, t in enumerate(ids):
        last = j == len(ids) - 1
        out = detok.add_token(t, is_stop_token=last and stop_token_at_end, is_last=last)
        chunks.append(out.new_text)
        prefixes.append(detok.streamable_text())
        if out.finished:
            break
    return detok, chunks, prefixes


def test_tokenizer_fixture_splits_characters(tokenizer, hf_tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) >= 2  # one emoji, several tokens: the case the detokenizer must handle
    assert tokenizer.decode(ids[:1]).endswith("\ufffd")
    assert tokenizer.eos_token_ids == frozenset({hf_tokenizer.token_to_id("<|eot_id|>")})


def test_stream_concatenation_equals_output_text(tokenizer):
    text = "café 東京 🎉 naïve résumé. The quick brown fox!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, chunks, _ = _run(tokenizer, SamplingParams(max_tokens=None), ids)
    assert detok.finished and detok.stop_str is None
    assert "".join(chunks) == detok.output_text == text
    assert all("\ufffd" not in c for c in chunks)


def test_multibyte_characters_never_emitted_halfway(tokenizer, byte_ids):
    text = "a東京🎉é"
    ids = _bytes_tokens(byte_ids, text)  # one token per byte: every character split
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), tokenizer.encode("x"))
    streamed = ""
    for t in ids:
        out = detok.add_token(t)
        assert "\ufffd" not in out.new_text
        streamed += out.new_text
        assert text.startswith(streamed)
    # The last byte completed "é", so nothing is held back any more.
    assert streamed == text
    assert detok.finish().new_text == ""


def test_incomplete_character_flushed_on_finish(tokenizer, byte_ids):
    ids = _bytes_tokens(byte_ids, "ok東")[:-1]  # the sequence ends inside "東"
    detok, chunks, _ = _run(tokenizer, SamplingParams(), ids)
    assert "".join(chunks) == detok.output_text == tokenizer.decode(ids)
    assert detok.output_text.startswith("ok") and detok.output_text.endswith("\ufffd")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, include):
    ids = tokenizer.encode("Hello world! Hello there. STOP here.", add_special_tokens=False)
    stop = "ere. ST"
    pieces = [tokenizer.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces)  # "Ġthere" "." "ĠSTOP": spans three tokens
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include, max_tokens=None)
    detok, chunks, prefixes = _run(tokenizer, params, ids)
    expected = "Hello world! Hello th" + (stop if include else "")
    assert detok.finished and detok.stop_str == stop
    assert detok.output_text == expected == "".join(chunks)
    assert detok.num_output_tokens == pieces.index(" STOP") + 1  # stopped on that token
    # Before the stop, no part of it ever reached the stream.
    for p in prefixes[:-1]:
        assert "Hello world! Hello th".startswith(p)
    assert prefixes[pieces.index(" there")] == "Hello world! Hello th"


def test_stop_string_inside_one_token_truncates_rest(tokenizer):
    ids = tokenizer.encode("Hello world! Hello there.", add_special_tokens=False)
    params = SamplingParams(stop=["lo w"], max_tokens=None)
    detok, chunks, _ = _run(tokenizer, params, ids)
    assert detok.output_text == "Hel" == "".join(chunks)
    assert detok.stop_str == "lo w"


def test_partial_stop_prefix_released_when_it_diverges(tokenizer, byte_ids):
    params = SamplingParams(stop=["abc"], max_tokens=None)
    detok = IncrementalDetokenizer(tokenizer, params, tokenizer.encode("x"))
    assert detok.add_token(byte_ids[ord("x")]).new_text == "x"
    assert detok.add_token(byte_ids[ord("a")]).new_text == ""  # could become "abc"
    assert detok.add_token(byte_ids[ord("b")]).new_text == ""
    assert detok.streamable_text() == "x" and detok.output_text == "xab"
    out = detok.add_token(byte_ids[ord("d")])  # "xabd": no longer a stop prefix
    assert out.new_text == "abd" and not out.finished
    # A held prefix at the end of the sequence is released by finish().
    detok.add_token(byte_ids[ord("a")])
    assert detok.finish().new_text == "a"
    assert detok.output_text == "xabda"


def test_earliest_completed_stop_wins(tokenizer, byte_ids):
    params = SamplingParams(stop=["cd", "bcd", "zz"], max_tokens=None)
    ids = _bytes_tokens(byte_ids, "abcdzz")
    detok, chunks, _ = _run(tokenizer, params, ids)
    # "cd" and "bcd" complete on the same character: the longer one (earlier start) wins.
    assert detok.stop_str == "bcd" and detok.output_text == "a" == "".join(chunks)


def test_multibyte_stop_string(tokenizer, byte_ids):
    params = SamplingParams(stop=["東京"], max_tokens=None)
    ids = _bytes_tokens(byte_ids, "go 東京 now")
    detok, chunks, prefixes = _run(tokenizer, params, ids)
    assert detok.output_text == "go " == "".join(chunks)
    assert all("東" not in p and "\ufffd" not in p for p in prefixes)


def test_stop_token_text_excluded_unless_include(tokenizer):
    (eot,) = tokenizer.eos_token_ids
    hi = tokenizer.encode("Hello", add_special_tokens=False)
    for skip, include, expected in [(True, False, "Hello"), (False, False, "Hello"),
                                    (True, True, "Hello"), (False, True, "Hello<|eot_id|>")]:
        params = SamplingParams(skip_special_tokens=skip, include_stop_str_in_output=include)
        detok, chunks, _ = _run(tokenizer, params, hi + [eot], stop_token_at_end=True)
        assert detok.finished and detok.output_text == expected == "".join(chunks)
        assert detok.num_output_tokens == len(hi) + 1


def test_skip_special_tokens(tokenizer):
    (eot,) = tokenizer.eos_token_ids
    ids = tokenizer.encode("Hello", add_special_tokens=False) + [eot] + \
        tokenizer.encode(" world", add_special_tokens=False)
    kept, _, _ = _run(tokenizer, SamplingParams(skip_special_tokens=False), ids)
    skipped, _, _ = _run(tokenizer, SamplingParams(skip_special_tokens=True), ids)
    assert kept.output_text == "Hello<|eot_id|> world"
    assert skipped.output_text == "Hello world"


def test_detokenize_false_yields_no_text(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    detok, chunks, _ = _run(tokenizer, SamplingParams(detokenize=False), ids)
    assert detok.output_text == "" and chunks == [""] * len(ids)
    assert detok.num_output_tokens == len(ids)


def test_add_after_finish_raises(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), [])
    detok.add_token(5, is_last=True)
    with pytest.raises(RuntimeError):
        detok.add_token(6)


def test_decode_window_stays_short(tokenizer):
    """O(1) per token: the decoded window must not grow with the sequence."""
    calls: list[int] = []

    class Counting:
        def encode(self, text, add_special_tokens=True):
            return tokenizer.encode(text, add_special_tokens)

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20,
                           add_special_tokens=False)
    detok, chunks, _ = _run(Counting(), SamplingParams(max_tokens=None), ids)
    assert "".join(chunks) == tokenizer.decode(ids)
    assert max(calls) <= 8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_equals_full_decode(tokenizer, data):
    vocab = tokenizer.vocab_size
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40))
    skip = data.draw(st.booleans())
    params = SamplingParams(skip_special_tokens=skip, max_tokens=None)
    detok, chunks, prefixes = _run(tokenizer, params, ids, prompt="Hi there")
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert detok.output_text == full
    assert "".join(chunks) == full
    for p in prefixes:  # every streamed prefix is a prefix of the final text
        assert full.startswith(p)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stop_result_independent_of_tokenization(tokenizer, byte_ids, data):
    """Stopping on the text is the same whether it came in BPE tokens or byte by byte."""
    alphabet = "ab東🎉 "
    text = data.draw(st.text(alphabet=alphabet, min_size=1, max_size=12))
    stops = data.draw(st.lists(st.text(alphabet=alphabet, min_size=1, max_size=3),
                               min_size=1, max_size=3))
    include = data.draw(st.booleans())
    params = SamplingParams(stop=stops, include_stop_str_in_output=include, max_tokens=None)
    bpe, bpe_chunks, bpe_prefixes = _run(tokenizer, params,
                                         tokenizer.encode(text, add_special_tokens=False))
    byte, byte_chunks, _ = _run(tokenizer, params, _bytes_tokens(byte_ids, text))
    assert bpe.output_text == byte.output_text
    assert bpe.stop_str == byte.stop_str
    assert "".join(bpe_chunks) == bpe.output_text == "".join(byte_chunks)
    # Reference: the first position where a stop string is complete.
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if ends:
        end, neg, s = min(ends)
        assert bpe.stop_str == s
        assert bpe.output_text == text[:end if include else end + neg]
    else:
        assert bpe.stop_str is None and bpe.output_text == text
    for p in bpe_prefixes[:-1]:  # nothing of a stop string streamed before the stop
        assert not any(s in p for s in stops)


def test_sentencepiece_style_keeps_leading_space(tmp_path):
    """Metaspace decoders drop the first token's leading space; prompt context keeps it."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok = _save(hf, tmp_path)
    prompt = tok.encode("Hello", add_special_tokens=False)
    ids = tok.encode("Hello world! Hello there.", add_special_tokens=False)
    detok, chunks, _ = _run(tok, SamplingParams(max_tokens=None), ids, prompt="Hello")
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert expected.startswith(" Hello")
    assert detok.output_text == expected == "".join(chunks)
    # With no prompt there is nothing before the first token: a plain decode.
    bare = IncrementalDetokenizer(tok, SamplingParams(max_tokens=None), [])
    text = "".join(bare.add_token(t, is_last=j == len(ids) - 1).new_text for j, t in enumerate(ids))
    assert text == tok.decode(ids) == "Hello world! Hello there."
