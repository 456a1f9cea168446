"""Block ids, reference counts and the free-block LRU queue of one KV pool.

Pure bookkeeping: the KV tensors live in the workers. A block with ref count 0
sits in the free queue; if the radix tree still holds it, it is *evictable*:
its KV stays valid and reusable until the block is popped for a new owner, at
which point ``on_evict`` tells the tree to drop it (lazy eviction).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator


class FreeBlockQueue:
    """Doubly linked list over block ids: O(1) append, appendleft, popleft and remove.

    The head is the next block to hand out: never-cached blocks are put at the
    head, cached ones at the tail, so a cached block is reused (evicted) only
    when no plain free block is left, least recently freed first.
    """

    def __init__(self, num_blocks: int):
        # prev/next links indexed by block id; index num_blocks is the sentinel
        # closing the ring, so the list starts as 0, 1, ..., num_blocks - 1.
        self._sentinel = s = num_blocks
        ring = [s, *range(num_blocks), s]
        self._next = ring[2:] + [ring[1]]
        self._prev = ring[:-2] + [ring[-2]]
        self._in_queue = [True] * num_blocks
        self._len = num_blocks

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block_id: int) -> bool:
        return self._in_queue[block_id]

    def _link_after(self, anchor: int, block_id: int) -> None:
        nxt = self._next[anchor]
        self._prev[block_id], self._next[block_id] = anchor, nxt
        self._next[anchor] = self._prev[nxt] = block_id
        self._in_queue[block_id] = True
        self._len += 1

    def append(self, block_id: int) -> None:
        assert not self._in_queue[block_id], f"block {block_id} freed twice"
        self._link_after(self._prev[self._sentinel], block_id)

    def appendleft(self, block_id: int) -> None:
        assert not self._in_queue[block_id], f"block {block_id} freed twice"
        self._link_after(self._sentinel, block_id)

    def remove(self, block_id: int) -> None:
        assert self._in_queue[block_id], f"block {block_id} is not free"
        prv, nxt = self._prev[block_id], self._next[block_id]
        self._next[prv], self._prev[nxt] = nxt, prv
        self._in_queue[block_id] = False
        self._len -= 1

    def peek(self) -> int | None:
        head = self._next[self._sentinel]
        return None if head == self._sentinel else head

    def popleft(self) -> int:
        head = self.peek()
        if head is None:
            raise IndexError("no free block")
        self.remove(head)
        return head

    def __iter__(self) -> Iterator[int]:
        node = self._next[self._sentinel]
        while node != self._sentinel:
            yield node
            node = self._next[node]


class BlockPool:
    """Reference-counted blocks of one pool (one tier, one rank's view)."""

    def __init__(self, num_blocks: int, is_cached: Callable[[int], bool],
                 on_evict: Callable[[int], None]):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.free_queue = FreeBlockQueue(num_blocks)
        self._is_cached = is_cached
        self._on_evict = on_evict

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: plain free ones plus evictable cached ones."""
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def next_free(self, n: int) -> list[int]:
        """The next ``n`` (at most) blocks ``allocate`` would hand out, in order."""
        return list(itertools.islice(self.free_queue, n))

    def allocate(self) -> int:
        block_id = self.free_queue.popleft()
        if self._is_cached(block_id):
            self._on_evict(block_id)  # reuse drops the cached KV
        self.ref_cnt[block_id] = 1
        return block_id

    def allocate_many(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        return [self.allocate() for _ in range(n)]

    def touch(self, block_id: int) -> None:
        """Take one more reference; revives an evictable cached block."""
        if self.ref_cnt[block_id] == 0:
            self.free_queue.remove(block_id)
        self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference each; pass a sequence's blocks tail first so that
        a chain's deeper blocks are evicted before the blocks they extend."""
        for block_id in block_ids:
            cnt = self.ref_cnt[block_id] - 1
            assert cnt >= 0, f"block {block_id} freed more often than referenced"
            self.ref_cnt[block_id] = cnt
            if cnt == 0:
                if self._is_cached(block_id):
                    self.free_queue.append(block_id)
                else:
                    self.free_queue.appendleft(block_id)

    def uncache(self, block_id: int) -> None:
        """A free block the tree just dropped: move it to the head of the queue,
        so it is handed out before any block that still holds cached KV."""
        assert self.ref_cnt[block_id] == 0 and not self._is_cached(block_id), \
            f"block {block_id} is referenced or still cached"
        self.free_queue.remove(block_id)
        self.free_queue.appendleft(block_id)
