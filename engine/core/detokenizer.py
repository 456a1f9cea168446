"""Incremental detokenization with stop strings.

One ``IncrementalDetokenizer`` per output sequence turns sampled token ids
into text as they arrive. It decodes only a small window of recent tokens per
step (vLLM's prefix_offset / read_offset scheme), so a token costs O(1) in
the sequence length, and it hands out only text that is final:

* a byte-level BPE token can end inside a multi-byte UTF-8 character; the
  window then decodes to a trailing U+FFFD and the text waits for the
  token that completes the character;
* a tail of the text that could still grow into a stop string is held back,
  so a stop string never leaks into the stream, even partly.

Stop tokens (EOS, ``stop_token_ids``) and the length limit are decided by the
scheduler with ``sampling_params.check_stop_token``; stop strings are found
here, on the text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from radixserve.engine.sampling_params import SamplingParams

# Prompt tokens decoded with the first output token: byte-level BPE needs none,
# but SentencePiece-style decoders drop the leading space of the first token of
# a decode, so the window starts a few tokens back in the prompt (vLLM's value).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class DetokenizerOutput:
    """What one ``add_token`` / ``finish`` call adds to the stream."""

    new_text: str  # text safe to send to a streaming client now, not sent before
    stop_str: str | None = None  # the stop string that ended the sequence at this token
    finished: bool = False  # no more text will come (stop string matched or flushed)


class IncrementalDetokenizer:
    """Text of one output sequence, token by token, cut at the first stop string.

    ``output_text`` is everything decoded so far, truncated at a matched stop
    string (which is kept only with ``include_stop_str_in_output``);
    ``streamable_text()`` is its prefix that is final. ``add_token`` and
    ``finish`` return the newly streamable part, so concatenating their
    ``new_text`` gives the final ``output_text``.

    The text is the continuation of the prompt: it equals
    ``tokenizer.decode(output_token_ids)`` for byte-level BPE, and keeps the
    leading space of the first token for SentencePiece-style tokenizers.
    With ``params.detokenize=False`` it only counts tokens and yields no text.
    """

    def __init__(self, tokenizer: _Decoder, params: SamplingParams, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Decoding window: _ids[prefix_offset:read_offset] was decoded before
        # (context), _ids[read_offset:] is not yet in the text.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self._ids)
        self.num_output_tokens = 0
        self.output_text = ""
        self.stop_str: str | None = None
        self.finished = False
        self._num_streamed = 0  # chars of output_text already handed out

    def add_token(self, token_id: int, *, is_stop_token: bool = False,
                  is_last: bool = False) -> DetokenizerOutput:
        """Append one sampled token; return the text that became streamable.

        ``is_stop_token``: the token is EOS / a stop token id that ends the
        sequence; its text is kept only with ``include_stop_str_in_output``.
        ``is_last``: the sequence ends after this token for another reason
        (length); held-back text is flushed. Either way the result is
        ``finished``.
        """
        if self.finished:
            raise RuntimeError("add_token after the sequence finished")
        self.num_output_tokens += 1
        if self.params.detokenize and (not is_stop_token
                                       or self.params.include_stop_str_in_output):
            self._ids.append(token_id)
            self._decode_new(flush=False)
            if self.finished:  # a stop string matched
                return self._emit()
        if is_stop_token or is_last:
            return self.finish()
        return self._emit()

    def finish(self) -> DetokenizerOutput:
        """End the sequence: decode what was held back (a trailing incomplete
        character becomes U+FFFD, as a full decode gives) and release it."""
        if not self.finished and self.params.detokenize:
            self._decode_new(flush=True)
        self.finished = True
        return self._emit()

    def streamable_text(self) -> str:
        """The prefix of ``output_text`` that is final and may be sent now."""
        return self.output_text[:self._streamable_len()]

    def _decode_new(self, flush: bool) -> None:
        """Move newly decodable text from the window into ``output_text``."""
        prefix_text = self.tokenizer.decode(self._ids[self.prefix_offset:self.read_offset],
                                            skip_special_tokens=self.skip_special_tokens)
        new_text = self.tokenizer.decode(self._ids[self.prefix_offset:],
                                         skip_special_tokens=self.skip_special_tokens)
        # A trailing U+FFFD is (nearly always) a character whose remaining
        # bytes are in the next token: wait for it rather than emit garbage.
        if not flush and (len(new_text) <= len(prefix_text)
                          or new_text.endswith(_REPLACEMENT_CHAR)):
            return
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        # Keep the window short: only the last decoded tokens are context.
        if self.prefix_offset > 64:
            drop = self.prefix_offset
            self._ids = self._ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        if delta:
            self._append_text(delta)

    def _append_text(self, delta: str) -> None:
        old_len = len(self.output_text)
        self.output_text += delta
        match = self._find_stop(old_len)
        if match is None:
            return
        start, stop = match
        end = start + len(stop) if self.params.include_stop_str_in_output else start
        self.output_text = self.output_text[:end]
        self.stop_str = stop
        self.finished = True

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """The stop string that completes first in text grown from ``old_len`` chars.

        Earliest end wins (the text is cut where streaming char by char would
        first see a stop string, whatever the token boundaries), then the
        longest. Only occurrences ending in the new text are new: older ones
        would have stopped the sequence already.
        """
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        text = self.output_text
        for stop in self.stop:
            i = text.find(stop, max(0, old_len - len(stop) + 1))
            if i >= 0:
                key = (i + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _streamable_len(self) -> int:
        if self.finished or not self.stop:
            return len(self.output_text)
        # Hold back the longest tail that is a proper prefix of a stop string.
        text = self.output_text
        for n in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return len(text) - n
        return len(text)

    def _emit(self) -> DetokenizerOutput:
        end = self._streamable_len()
        new_text = self.output_text[self._num_streamed:end]
        self._num_streamed = max(self._num_streamed, end)
        return DetokenizerOutput(new_text=new_text, stop_str=self.stop_str,
                                 finished=self.finished)
