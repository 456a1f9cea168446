"""Sampling parameters: the user-facing request knob set (vLLM field names and defaults).

Plain data with its validation and the stop-token check, importable without
torch, so the cache, scheduler and HTTP layers can carry it. It crosses
processes as itself through the typed wire codec (engine/executor/wire.py),
which rebuilds it field by field, so ``__post_init__`` validates every decoded
copy. The torch ``Sampler`` that acts on it lives in
``radixserve.engine.worker.sampler``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from radixserve.engine.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20  # cap on logprobs / prompt_logprobs, as OpenAI's API does
_U64 = (1 << 64) - 1
_GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
# Far above any useful temperature (at 100 the distribution is already near uniform), and
# low enough that logits / temperature stays a normal float32 number (1e308 is inf there).
MAX_TEMPERATURE = 100.0


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    """A finite number: JSON's Infinity and NaN parse as floats, and reach us as such."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and not (isinstance(x, float) and not math.isfinite(x)))


@dataclass
class SamplingParams:
    """How to sample one request (vLLM-compatible names and defaults).

    ``best_of`` > ``n`` makes the engine generate ``best_of`` sequences and
    return the ``n`` with the highest cumulative logprob. ``max_tokens=None``
    means "up to max_model_len". ``top_k=-1`` is normalised to 0 (disabled),
    ``stop`` to a list of strings and ``stop_token_ids`` to a list of ints.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        _require(_is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _require(self.best_of is None or (_is_int(self.best_of) and self.best_of >= self.n),
                 f"best_of must be an int >= n ({self.n}), got {self.best_of!r}")
        _require(_is_num(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
                 f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy), "
                 f"got {self.temperature!r}")
        _require(_is_num(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p!r}")
        _require(_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1),
                 f"top_k must be 0 or -1 (disabled) or an int >= 1, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        _require(_is_num(self.min_p) and 0 <= self.min_p <= 1,
                 f"min_p must be in [0, 1], got {self.min_p!r}")
        _require(self.seed is None or (_is_int(self.seed) and -(1 << 63) <= self.seed <= _U64),
                 f"seed must be None or a 64-bit int, got {self.seed!r}")
        _require(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _require(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                 f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _require(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                 f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            setattr(self, name, float(getattr(self, name)))
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "detokenize"):
            _require(isinstance(getattr(self, name), bool),
                     f"{name} must be a bool, got {getattr(self, name)!r}")
        _require(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
                 f"max_tokens must be None or an int >= 1, got {self.max_tokens!r}")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0,
                 f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens,
                 f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _require(v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS),
                     f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {v!r}")
        _require(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
                 f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        # Stop strings are matched on the decoded text, so they need it.
        _require(self.detokenize or not self.stop,
                 "stop strings need detokenize=True")

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        _require(isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop),
                 f"stop must be a str or a list of str, got {stop!r}")
        _require(all(stop), "stop must not contain empty strings")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        _require(isinstance(ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in ids),
                 f"stop_token_ids must be a list of ints >= 0, got {ids!r}")
        return list(ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine generates (best_of, else n)."""
        return self.best_of if self.best_of is not None else self.n

    def over_seq_limit(self, max_num_seqs: int) -> tuple[str, str] | None:
        """(field, message) when these sequences can never run at once, else None."""
        if self.num_sequences <= max_num_seqs:
            return None
        field_name = "best_of" if self.best_of is not None else "n"
        return field_name, (f"{field_name}={self.num_sequences} asks for more sequences than can run at once: "
                            f"max_num_seqs is {max_num_seqs}")


def check_stop_token(token_id: int, params: SamplingParams, eos_token_ids: frozenset[int],
                     num_output_tokens: int) -> str | None:
    """Finish reason after sampling ``token_id``, or None to go on.

    ``num_output_tokens`` counts the output tokens including ``token_id``.
    "stop" when the token is in ``stop_token_ids`` or is EOS (unless
    ``ignore_eos``), but only once more than ``min_tokens`` tokens exist (the
    sampler masks them before that, so this only matters for callers that
    bypass it). "length" when ``num_output_tokens >= max_tokens``; a stop
    token on the last allowed position reports "stop", as it explains the end
    better. ``max_tokens=None`` never gives "length" here: the engine caps
    the sequence at max_model_len itself.

    The text of a stop token is left out of the output (pass
    ``is_stop_token=True`` to ``IncrementalDetokenizer.add_token``) unless
    ``include_stop_str_in_output``; EOS is usually a special token, which
    ``skip_special_tokens`` drops from the text anyway. Stop strings are
    matched on the text, by the detokenizer.
    """
    if num_output_tokens > params.min_tokens:
        if token_id in (params.stop_token_ids or ()):  # a list after __post_init__; `or` for mypy
            return "stop"
        if not params.ignore_eos and token_id in eos_token_ids:
            return "stop"
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return "length"
    return None
