"""Sequences and requests as the scheduler sees them: token ids and block ids, no tensors."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixserve.engine.cache.hashing import hash_full_blocks
from radixserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixserve.engine.cache.peer import PeerHint
    from radixserve.engine.lora.manager import LoRAAdapter


class SeqStatus(enum.Enum):
    WAITING = "waiting"          # queued for (re)prefill
    FORK_PENDING = "fork_pending"  # n>1 child waiting for its parent's prefill
    RUNNING = "running"
    SWAPPING_IN = "swapping_in"  # admitted; waits for its CPU-tier prefix to reach the device
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated continuation of a prompt.

    ``token_ids`` is prompt + output; the block table covers the first
    ``num_computed_tokens`` tokens (whose KV exists) plus room for what is
    scheduled next. ``block_hashes`` holds the chained hash of every full block
    of ``token_ids``, extended as tokens are appended.
    """

    seq_id: int
    request: Request
    index: int  # which of the request's n/best_of outputs
    token_ids: list[int]
    block_size: int
    root_hash: int
    block_hashes: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_committed_blocks: int = 0  # blocks of block_ids already inserted in the radix tree
    num_cached_tokens: int = -1  # prefix hit at first scheduling; -1 = not scheduled yet
    num_cpu_cached_tokens: int = 0  # the part of that hit swapped in from the CPU tier
    num_remote_cached_tokens: int = 0  # the part of that hit pulled from a peer replica
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0
    parent: Sequence | None = None  # n>1: the sequence whose prefill this one forks from

    def __post_init__(self) -> None:
        if not self.block_hashes:
            self.block_hashes = hash_full_blocks(self.token_ids, self.block_size, self.root_hash)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.prompt_len:]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        """Tokens without KV yet: 1 while decoding (the last sampled token),
        more during a (re)prefill. A step that computes them all samples."""
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            parent = self.block_hashes[-1] if self.block_hashes else self.root_hash
            self.block_hashes.extend(hash_full_blocks(
                self.token_ids, self.block_size, parent, start_block=len(self.block_hashes)))


@dataclass(eq=False)
class Request:
    """A user request: one prompt, ``best_of`` sequences, ``n`` returned."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    namespace: tuple[str, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_logprobs: list | None = None  # set once every prompt position has its logprob
    prompt_logprobs_buffer: list | None = None  # filled chunk by chunk during prefill
    lora: LoRAAdapter | None = None  # the adapter version it runs on (its namespace is in ``namespace``)
    num_finished: int = 0  # sequences finished so far: is_finished stays O(1) for any n
    grammar_pending: bool = False  # structured outputs: its grammar is still compiling; not schedulable
    peer_hint: PeerHint | None = None  # its prefix is cached on a peer replica; tried once, then cleared

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_seqs(self) -> int:
        return self.params.best_of or self.params.n

    @property
    def is_finished(self) -> bool:
        return self.num_finished >= len(self.seqs)
