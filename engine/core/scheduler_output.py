"""What one step runs (SchedulerOutput) and what it returns (StepResult).

These cross the engine-worker queue as msgpack (see engine/executor/wire.py),
so they hold only ints, floats, strings, lists of them and plain dataclasses
such as SamplingParams -- never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.engine.sampling_params import SamplingParams


@dataclass
class ScheduledSeq:
    """The slice of one sequence computed this step."""

    seq_id: int
    token_ids: list[int]   # the new tokens whose KV this step computes
    start_pos: int         # position of token_ids[0] == tokens already cached/computed
    block_ids: list[int]   # block table covering start_pos + len(token_ids) tokens
    prompt_logprobs: int | None = None  # top-k prompt logprobs wanted for these tokens
    next_prompt_token: int = -1  # with prompt_logprobs: the prompt token after this chunk, if any
    lora_slot: int = -1  # device LoRA slot of the sequence's adapter; -1 = base model


@dataclass
class NewSampler:
    """First time a sequence samples: the sampling state rank 0 creates for it."""

    seq_id: int
    params: SamplingParams  # rebuilt, hence validated, by the wire codec on decode
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resumed after a preemption
    child_index: int = 0


@dataclass
class SampleRow:
    """Sample ``seq_id``'s next token from the logits of the last token of
    ``seqs[source]`` (n>1 children sample from their parent's row)."""

    seq_id: int
    source: int


@dataclass
class LoRALoad:
    """Fill device slot ``slot`` with the adapter at ``path`` before this step's
    forward. Each rank reads its own shard and checks that the weights still
    hash to ``content_hash`` (the hash the engine validated and namespaced)."""

    slot: int
    name: str
    path: str
    content_hash: str


@dataclass
class GrammarMask:
    """Allowed-token bitmasks of the step's constrained sample rows (structured outputs).

    Row j of ``bitmask`` (``num_words`` little-endian int32s, xgrammar's layout:
    bit t % 32 of word t // 32 set = token t allowed) belongs to
    ``sample_rows[rows[j]]``; rows not listed are unconstrained.
    """

    rows: list[int]
    num_words: int
    bitmask: bytes


@dataclass
class SchedulerOutput:
    step_id: int
    seqs: list[ScheduledSeq] = field(default_factory=list)
    sample_rows: list[SampleRow] = field(default_factory=list)
    new_samplers: list[NewSampler] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # drop their sampling state
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    wait_transfers: list[int] = field(default_factory=list)  # swap-outs to finish before replying
    transfers_before_forward: list[int] = field(default_factory=list)  # copy-on-evict: before any write
    lora_loads: list[LoRALoad] = field(default_factory=list)  # before the forward, in order
    grammar_mask: GrammarMask | None = None  # set by the engine after scheduling; rank 0 applies it

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not (self.seqs or self.block_copies or self.wait_transfers or self.transfers_before_forward
                    or self.lora_loads)


@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens start_pos+1 .. start_pos+len(entries) of a chunk."""

    seq_id: int
    start_pos: int
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class LoRALoadError:
    """A slot load failed on some rank: the step's forward did not run."""

    slot: int
    name: str
    message: str


@dataclass
class StepResult:
    step_id: int
    sampled: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    error: str | None = None  # a worker-side failure; the engine fails the step's requests
    lora_errors: list[LoRALoadError] = field(default_factory=list)  # non-empty: nothing was computed
