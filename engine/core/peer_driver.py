"""Drives peer KV for one engine: exports for others, fetches and imports for itself.

The engine knows no transport: a ``PeerFetcher`` (holder hint, chain hashes)
-> KVExport is plugged in (the cluster's goes through a Ray actor call on the
holder replica). Fetches run on a small thread pool, so the engine keeps
stepping meanwhile; each step the driver collects finished fetches, sends
rank r's bytes to rank r over the cache queue, and hands finished imports to
the scheduler. A fetch that raises, times out or returns fewer (or other)
blocks ends in a shorter or empty import: the sequence recomputes the rest.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from radixserve.engine.cache.peer import EXPORT, IMPORT, WRITING, KVExport, PeerHint, Pull
from radixserve.engine.executor.protocol import TransferDone, TransferTask

if TYPE_CHECKING:
    from radixserve.engine.core.llm_engine import LLMEngine

log = logging.getLogger(__name__)
PeerFetcher = Callable[[PeerHint, list[int]], KVExport]
_TASK_IDS = 1 << 40  # cache-queue task ids of peer tasks: apart from the CPU tier's


class PullEstimate:
    """Whether pulling n blocks beats recomputing them on this engine, from what it measured:
    pull time as ``a + b * n`` (least squares over recent pulls: a call's fixed cost, then
    bytes) against prefill seconds per token (prefill-heavy steps). Where compute is nearly
    free (a toy model) the fixed cost of a remote call loses; on a real model the pull wins.
    Until both are measured it pulls; when it declines, every ``EXPLORE``-th candidate pulls
    anyway, so a change (a faster link, a busier engine) is seen."""

    DECAY = 0.9      # weight of older observations, per new one
    EXPLORE = 16
    MIN_PREFILL = 64  # prompt tokens in a step for it to count as prefill-heavy

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.sums = [0.0] * 5  # decayed sum of w, n, t, n*n, n*t
        self.token_s: float | None = None
        self.declined = 0

    def note_step(self, seconds: float, prefill_tokens: int) -> None:
        if prefill_tokens >= self.MIN_PREFILL:
            per = seconds / prefill_tokens
            self.token_s = per if self.token_s is None else 0.8 * self.token_s + 0.2 * per

    def note_pull(self, seconds: float, blocks: int) -> None:
        self.sums = [self.DECAY * x + v for x, v in zip(self.sums, (1.0, blocks, seconds, blocks * blocks,
                                                                     blocks * seconds))]

    def pull_s(self, blocks: int) -> float | None:
        w, n, t, nn, nt = self.sums
        if w == 0:
            return None
        var = nn / w - (n / w) ** 2
        slope = max(0.0, (nt / w - n * t / w / w) / var) if var > 1e-9 else 0.0
        fixed = max(0.0, t / w - slope * n / w)
        if var <= 1e-9:  # one size seen so far: scale it (no fixed part known)
            slope, fixed = t / max(n, 1e-9), 0.0
        return fixed + slope * blocks

    def in_tokens(self) -> tuple[float, float]:
        """(fixed, per block) cost of a pull in this engine's prefill tokens; (-1, -1) until
        measured. The router prices a remote hit with it."""
        one, two = self.pull_s(1), self.pull_s(2)
        if one is None or self.token_s is None:
            return -1.0, -1.0
        per_block = max(0.0, two - one)
        return max(0.0, one - per_block) / self.token_s, per_block / self.token_s

    def worth(self, blocks: int) -> bool:
        est = self.pull_s(blocks)
        if est is None or self.token_s is None or est <= self.token_s * blocks * self.block_size:
            return True
        self.declined += 1
        return self.declined % self.EXPLORE == 0


class PeerDriver:
    def __init__(self, engine: LLMEngine, fetcher: PeerFetcher | None):
        self.engine = engine
        self.fetcher = fetcher
        self.pool = ThreadPoolExecutor(engine.config.cache.max_concurrent_pulls, thread_name_prefix="peer-fetch")
        self.fetching: dict[int, tuple[Pull, Future]] = {}  # pull id -> its fetch
        self.writing: dict[int, tuple[Pull, int]] = {}  # task id -> (pull, blocks written)
        self.early: list[TransferDone] = []  # other tasks' acks an export's wait took
        self._ids = itertools.count(_TASK_IDS)
        self.started_at: dict[int, float] = {}  # pull id -> when its fetch started
        self.estimate = PullEstimate(engine.block_size)
        engine.scheduler.peer_enabled = fetcher is not None and engine.transfers is not None
        engine.scheduler.pull_timeout_s = engine.config.cache.peer_pull_timeout_s
        engine.scheduler.pull_worth = self.estimate.worth

    # -- the holder side ----------------------------------------------------------------------

    def export(self, block_hashes: list[int]) -> KVExport:
        """The longest prefix of the chain cached here, every rank's bytes. Call it on the
        engine's own thread, between steps; pinned blocks cannot be evicted meanwhile."""
        kv, transfers = self.engine.kv, self.engine.transfers
        if transfers is None:
            raise RuntimeError("peer KV export needs the cache queue (a CPU tier: swap_space > 0)")
        pin = kv.peer.pin_export(block_hashes)
        try:
            if not pin.block_hashes:
                return KVExport((), ())
            task = TransferTask(next(self._ids), EXPORT, pin.gpu_blocks, pin.cpu_blocks)
            transfers.send(task)
            done = transfers.poll({task.task_id}, self.engine.config.parallel.worker_timeout_s)
            mine = next(d for d in done if d.task_id == task.task_id)
            self.early += [d for d in done if d is not mine]
            if not mine.ok:
                raise RuntimeError(f"peer KV export failed: {mine.error}")
            self.engine.metrics.inc("peer_export_blocks", len(pin.block_hashes))
            return KVExport(pin.block_hashes, tuple(mine.kv))
        finally:
            kv.peer.unpin(pin)

    # -- the puller side ----------------------------------------------------------------------

    def start(self) -> None:
        for p in self.engine.kv.peer.take_started():
            assert self.fetcher is not None
            self.started_at[p.pull_id] = time.monotonic()
            self.fetching[p.pull_id] = (p, self.pool.submit(self.fetcher, p.hint, list(p.block_hashes)))

    def poll(self) -> None:
        """Fetches that finished (or ran out of time) become imports (or fallbacks)."""
        now = time.monotonic()
        for pull_id, (p, fut) in list(self.fetching.items()):
            if not self.engine.kv.peer.is_live(p):  # its sequence finished meanwhile
                del self.fetching[pull_id]
            elif fut.done():
                del self.fetching[pull_id]
                self._write(p, self._result(p, fut))
            elif now > p.deadline:
                del self.fetching[pull_id]
                log.warning("peer KV fetch from %s timed out: recomputing", p.hint.holder)
                self._end(p, 0)

    def _result(self, p: Pull, fut: Future) -> KVExport | None:
        try:
            return fut.result()
        except Exception as exc:  # the holder died, refused, or the transport failed
            log.warning("peer KV fetch from %s failed (%s): recomputing", p.hint.holder, exc)
            return None

    def _write(self, p: Pull, export: KVExport | None) -> None:
        tp = self.engine.config.parallel.tensor_parallel_size
        n = 0
        if export is not None and len(export.ranks) == tp:
            n = next((i for i, (a, b) in enumerate(zip(export.block_hashes, p.block_hashes)) if a != b),
                     min(export.num_blocks, len(p.block_hashes)))
        if n == 0:
            self._end(p, 0)
            return
        assert export is not None and self.engine.transfers is not None
        task_id = next(self._ids)
        self.engine.transfers.send_each([TransferTask(task_id, IMPORT, p.gpu_blocks[:n], [], export.ranks[r])
                                         for r in range(tp)])
        p.state = WRITING
        self.writing[task_id] = (p, n)

    def on_done(self, d: TransferDone) -> bool:
        """A cache-queue task finished: True if it was a peer import (now applied)."""
        entry = self.writing.pop(d.task_id, None)
        if entry is None:
            return False
        p, n = entry
        if not d.ok:
            log.warning("peer KV import failed (%s): recomputing", d.error)
        self._end(p, n if d.ok else 0)
        if d.ok:
            self.engine.metrics.inc("peer_import_bytes", d.num_bytes)
        return True

    def _end(self, p: Pull, num_in: int) -> None:
        started = self.started_at.pop(p.pull_id, None)
        if num_in and started is not None:
            self.estimate.note_pull(time.monotonic() - started, num_in)
        self.engine.scheduler.finish_pull(p, num_in)
        self.engine.metrics.inc("peer_pulls_ok" if num_in else "peer_pulls_failed")

    def reset(self) -> None:
        self.started_at.clear()
        self.fetching.clear()
        self.writing.clear()
        self.early.clear()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
