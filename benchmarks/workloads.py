"""Deterministic benchmark workloads: typed request specs generated from a seed.

The embedded models have random weights, so text content does not matter;
what matters is the *shape* of the traffic: which prompt tokens repeat across
requests, how long prompts and outputs are, when requests arrive. Prompts are
random ordinary token ids drawn from a seeded ``random.Random`` over a
:class:`TokenSpace` taken from the engine's tokenizer (special tokens excluded).
The same config and seed always give the same requests.

A prompt is a tuple of :class:`Segment` s (role + token ids), so one spec can be
sent three ways: as token ids (engine, transformers), as completion text or as
chat messages (HTTP; text is the tokenizer's decoding of each segment).

Workloads (one generator each, configured by a frozen dataclass whose defaults
are the engine suite's default size):

``shared_prefix``  ``groups`` x ``questions``: every group has one random prefix of
    ``prefix_len`` tokens (a system prompt / few-shot template), each question
    adds its own ``suffix_len`` tokens and asks for ``output_len`` tokens.
    Requests of all groups are interleaved in a seeded shuffle.
``multi_turn``  ``sessions`` chats of ``turns`` turns. Every session starts with the
    same ``system_len``-token system prompt; turn k's prompt is turn k-1's prompt,
    then turn k-1's answer, then a new ``user_len``-token user message. The
    spec holds a scripted answer of ``output_len`` tokens; drivers replace it by
    the answer actually generated (as a chat client does), which is what a
    server sees. Before turn k>0 the user "thinks" for an exponentially
    distributed time with mean ``think_s``.
``rag``  ``documents`` documents of ``doc_len`` tokens; ``questions`` questions of
    ``question_len`` tokens, each over ``docs_per_question`` documents (in
    document order) chosen with Zipf(``zipf_s``) popularity. Every document is
    used at least once, so the working set is exactly ``documents * doc_len``
    tokens; the suite sizes the KV pool below it (``working_set_over_pool``).
``no_sharing``  the control: ``requests`` prompts of ``prompt_len`` distinct random
    tokens; a prefix cache can only cost time here.

Arrival times: every spec is the start of a session (single-turn workloads
have sessions of one turn). :func:`with_poisson_arrivals` gives session starts
exponential gaps at a rate (open loop); closed-loop drivers ignore them.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        _require(getattr(obj, name) >= 1, f"{type(obj).__name__}.{name} must be >= 1, got {getattr(obj, name)}")


# -- request specs ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSpace:
    """Ordinary token ids ``[low, high)``: the vocabulary without special tokens."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _require(0 <= self.low < self.high, f"TokenSpace needs 0 <= low < high, got [{self.low}, {self.high})")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenSpace:
        # The longest run of ids without a special token: below them in the embedded vocabularies
        # (specials at the top), above them in SmolLM2's (ids 0-16).
        vocab = tokenizer.vocab_size
        special = sorted(t for t in getattr(tokenizer, "special_token_ids", frozenset()) if 0 <= t < vocab)
        bounds = [-1, *special, vocab]
        low, high = max(((a + 1, b) for a, b in zip(bounds, bounds[1:])), key=lambda r: r[1] - r[0])
        return cls(min(10, high - 1) if low == 0 else low, high)

    def draw(self, rng: random.Random, n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(self.low, self.high) for _ in range(n))


@dataclass(frozen=True)
class Segment:
    role: str  # "system", "user" or "assistant"
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        _require(self.role in ("system", "user", "assistant"), f"unknown segment role {self.role!r}")


@dataclass(frozen=True)
class RequestSpec:
    """One request: its prompt segments, output length, and place in a session."""

    request_id: str
    segments: tuple[Segment, ...]
    output_len: int
    session_id: str
    turn: int = 0
    think_s: float = 0.0  # pause after the previous turn's answer, before this turn is sent
    arrival_s: float = 0.0  # open loop: session start, seconds after the run starts (turn 0 only)
    group: str = ""  # the prefix group / documents this request reuses (for analysis)

    def __post_init__(self) -> None:
        _require(self.output_len >= 1, f"{self.request_id}: output_len must be >= 1")
        _require(bool(self.segments), f"{self.request_id}: a prompt needs at least one segment")

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        """The scripted prompt (scripted answers in place of generated ones)."""
        return tuple(itertools.chain.from_iterable(s.token_ids for s in self.segments))

    @property
    def prompt_len(self) -> int:
        return sum(len(s.token_ids) for s in self.segments)


def assemble_ids(spec: RequestSpec, answers: Sequence[Sequence[int]] = ()) -> list[int]:
    """Prompt token ids, the i-th assistant segment replaced by ``answers[i]`` when given."""
    out: list[int] = []
    for seg, answer in _with_answers(spec, answers):
        out.extend(seg.token_ids if answer is None else answer)
    return out


def assemble_text(spec: RequestSpec, decode: Callable[[list[int]], str], answers: Sequence[str] = ()) -> str:
    """Completion-API text: each segment decoded, actual answers in place of scripted ones."""
    return "".join(decode(list(seg.token_ids)) if a is None else a for seg, a in _with_answers(spec, answers))


def assemble_messages(spec: RequestSpec, decode: Callable[[list[int]], str],
                      answers: Sequence[str] = ()) -> list[dict[str, str]]:
    """Chat-API messages; consecutive segments of one role become one message."""
    messages: list[dict[str, str]] = []
    for seg, answer in _with_answers(spec, answers):
        text = decode(list(seg.token_ids)) if answer is None else answer
        if messages and messages[-1]["role"] == seg.role:
            messages[-1]["content"] += text
        else:
            messages.append({"role": seg.role, "content": text})
    return messages


def _with_answers(spec: RequestSpec, answers: Sequence[Any]):
    i = 0
    for seg in spec.segments:
        if seg.role == "assistant":
            yield seg, (answers[i] if i < len(answers) else None)
            i += 1
        else:
            yield seg, None


def sessions(requests: Sequence[RequestSpec]) -> list[tuple[RequestSpec, ...]]:
    """Group specs by session, turns in order; sessions in order of first appearance."""
    by_id: dict[str, list[RequestSpec]] = {}
    for spec in requests:
        by_id.setdefault(spec.session_id, []).append(spec)
    return [tuple(sorted(turns, key=lambda s: s.turn)) for turns in by_id.values()]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """n arrival times with exponential gaps at ``rate`` per second; rate=inf: all at 0."""
    _require(rate > 0, f"rate must be > 0 requests/s, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(f"arrivals/{seed}"), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def with_poisson_arrivals(requests: Sequence[RequestSpec], rate: float, seed: int) -> list[RequestSpec]:
    """Give each session's first turn a Poisson arrival time (later turns follow their answers)."""
    groups = sessions(requests)
    starts = dict(zip((g[0].session_id for g in groups), poisson_arrivals(len(groups), rate, seed)))
    return [replace(s, arrival_s=starts[s.session_id]) if s.turn == 0 else s for s in requests]


# -- workloads ----------------------------------------------------------------------


@dataclass(frozen=True)
class SharedPrefixConfig:
    groups: int = 4
    questions: int = 4
    prefix_len: int = 512
    suffix_len: int = 32
    output_len: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "groups", "questions", "prefix_len", "suffix_len", "output_len")


def _rng(workload: str, seed: int) -> random.Random:
    # The workload's name is part of the seed: workloads sent to one server must not share
    # prompts by accident (equal seeds would draw equal first tokens).
    return random.Random(f"{workload}/{seed}")


def shared_prefix(cfg: SharedPrefixConfig, tokens: TokenSpace) -> list[RequestSpec]:
    rng = _rng("shared_prefix", cfg.seed)
    out = []
    for g in range(cfg.groups):
        prefix = Segment("system", tokens.draw(rng, cfg.prefix_len))
        for q in range(cfg.questions):
            rid = f"sp-g{g}-q{q}"
            question = Segment("user", tokens.draw(rng, cfg.suffix_len))
            out.append(RequestSpec(rid, (prefix, question), cfg.output_len, rid, group=f"g{g}"))
    rng.shuffle(out)  # groups interleave, as independent users' requests do
    return out


@dataclass(frozen=True)
class MultiTurnConfig:
    sessions: int = 4
    turns: int = 4
    system_len: int = 256  # shared by every session; 0 for none
    user_len: int = 32
    output_len: int = 24
    think_s: float = 0.5  # mean of the exponential pause before turns after the first
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "sessions", "turns", "user_len", "output_len")
        _require(self.system_len >= 0, f"system_len must be >= 0, got {self.system_len}")
        _require(self.think_s >= 0, f"think_s must be >= 0, got {self.think_s}")


def multi_turn(cfg: MultiTurnConfig, tokens: TokenSpace) -> list[RequestSpec]:
    rng = _rng("multi_turn", cfg.seed)
    system = (Segment("system", tokens.draw(rng, cfg.system_len)),) if cfg.system_len else ()
    out = []
    for s in range(cfg.sessions):
        history: tuple[Segment, ...] = system
        for t in range(cfg.turns):
            history += (Segment("user", tokens.draw(rng, cfg.user_len)),)
            think = rng.expovariate(1 / cfg.think_s) if t and cfg.think_s else 0.0
            out.append(RequestSpec(f"mt-s{s}-t{t}", history, cfg.output_len, f"mt-s{s}", t, think,
                                   group=f"s{s}"))
            history += (Segment("assistant", tokens.draw(rng, cfg.output_len)),)  # scripted answer
    return out


@dataclass(frozen=True)
class RAGConfig:
    documents: int = 12
    doc_len: int = 256
    questions: int = 40
    question_len: int = 24
    output_len: int = 16
    docs_per_question: int = 1
    zipf_s: float = 1.0  # popularity of document rank r is 1 / r**zipf_s
    working_set_over_pool: float = 1.5  # the suite sizes the KV pool to working set / this
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "documents", "doc_len", "questions", "question_len", "output_len", "docs_per_question")
        _require(self.docs_per_question <= self.documents, "docs_per_question must be <= documents")
        _require(self.questions >= self.documents,
                 f"questions ({self.questions}) must be >= documents ({self.documents}) so every "
                 f"document is used and the working set is what was configured")
        _require(self.zipf_s >= 0, f"zipf_s must be >= 0, got {self.zipf_s}")
        _require(self.working_set_over_pool > 0, "working_set_over_pool must be > 0")

    @property
    def working_set_tokens(self) -> int:
        return self.documents * self.doc_len


def rag(cfg: RAGConfig, tokens: TokenSpace) -> list[RequestSpec]:
    rng = _rng("rag", cfg.seed)
    docs = [Segment("system", tokens.draw(rng, cfg.doc_len)) for _ in range(cfg.documents)]
    weights = [1 / (r + 1) ** cfg.zipf_s for r in range(cfg.documents)]
    # The first `documents` questions cover every document once; the rest follow popularity.
    firsts = list(range(cfg.documents))
    rng.shuffle(firsts)
    out = []
    for q in range(cfg.questions):
        chosen = _pick_docs(rng, weights, cfg.docs_per_question, firsts[q] if q < cfg.documents else None)
        rid = f"rag-q{q}"
        segs = tuple(docs[d] for d in chosen) + (Segment("user", tokens.draw(rng, cfg.question_len)),)
        out.append(RequestSpec(rid, segs, cfg.output_len, rid, group="+".join(f"d{d}" for d in chosen)))
    rng.shuffle(out)
    return out


def _pick_docs(rng: random.Random, weights: list[float], k: int, must: int | None) -> list[int]:
    chosen = {must} if must is not None else set()
    while len(chosen) < k:
        chosen.add(rng.choices(range(len(weights)), weights)[0])
    return sorted(chosen)  # document order, so questions over the same documents share a prefix


@dataclass(frozen=True)
class NoSharingConfig:
    requests: int = 10
    prompt_len: int = 512
    output_len: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "requests", "prompt_len", "output_len")


def no_sharing(cfg: NoSharingConfig, tokens: TokenSpace) -> list[RequestSpec]:
    rng = _rng("no_sharing", cfg.seed)
    return [RequestSpec(f"ns-{i}", (Segment("user", tokens.draw(rng, cfg.prompt_len)),), cfg.output_len, f"ns-{i}")
            for i in range(cfg.requests)]


# -- registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadKind:
    name: str
    config_type: type
    generate: Callable[[Any, TokenSpace], list[RequestSpec]]
    description: str


WORKLOADS: dict[str, WorkloadKind] = {k.name: k for k in (
    WorkloadKind("shared_prefix", SharedPrefixConfig, shared_prefix,
                 "groups x questions; each group shares one long prefix, each question adds a short suffix"),
    WorkloadKind("multi_turn", MultiTurnConfig, multi_turn,
                 "chat sessions with a shared system prompt, each turn extends the last prompt + answer, "
                 "with think time between turns"),
    WorkloadKind("rag", RAGConfig, rag,
                 "questions over Zipf-popular documents reused across questions; working set larger than "
                 "the KV pool"),
    WorkloadKind("no_sharing", NoSharingConfig, no_sharing,
                 "control: every prompt distinct, so a prefix cache can only cost time"),
)}


def shape(requests: Sequence[RequestSpec]) -> dict[str, float]:
    """What a run of these requests looks like, for the result JSON."""
    prompt = [s.prompt_len for s in requests]
    return {"requests": len(requests), "sessions": len(sessions(requests)),
            "prompt_tokens": sum(prompt), "max_prompt_len": max(prompt, default=0),
            "output_tokens": sum(s.output_len for s in requests),
            "max_request_len": max((s.prompt_len + s.output_len for s in requests), default=0)}


def override(cfg: Any, key: str, text: str) -> Any:
    """``dataclasses.replace`` from a ``field=value`` string, parsed by the field's current type."""
    names = {f.name for f in fields(cfg)}
    _require(key in names, f"{type(cfg).__name__} has no field {key!r}; fields: {', '.join(sorted(names))}")
    current = getattr(cfg, key)
    if isinstance(current, bool):
        value: Any = text.lower() in ("1", "true", "yes", "on")
    elif isinstance(current, (int, float, str)):
        value = type(current)(text)
    elif current is None:
        value = None if text.lower() == "none" else float(text)
    else:
        raise ValueError(f"{type(cfg).__name__}.{key} cannot be set from the command line")
    return replace(cfg, **{key: value})


def apply_overrides(cfg: Any, items: Sequence[str]) -> Any:
    """``WORKLOAD.FIELD=VALUE`` strings applied to a suite config with one field per workload."""
    for item in items:
        key, _, value = item.partition("=")
        workload, _, fld = key.partition(".")
        if workload not in WORKLOADS or not fld or not _:
            raise ValueError(f"--set wants WORKLOAD.FIELD=VALUE with WORKLOAD in {list(WORKLOADS)}, got {item!r}")
        cfg = replace(cfg, **{workload: override(getattr(cfg, workload), fld, value)})
    return cfg
