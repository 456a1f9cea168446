"""Radix prefix tree over full KV blocks, in two tiers (device pool, CPU pool).

Each node is one full block, keyed by its chained hash (see hashing.py), so a
node's hash already pins its whole prefix and namespace. A node holds a copy
in the device tier (``gpu``), the CPU tier (``cpu``) or both. Invariants the
KV manager keeps and the property tests check:

* device copies are upward-closed: a node with a device copy has a parent
  with one, so a prefix hit is always device blocks followed by CPU blocks;
* nodes leave the tree only as whole subtrees whose nodes have no device copy
  in use, so a cached chain never has a hole in the middle.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    block_hash: int
    parent: RadixNode | None
    root: int  # hash the chain starts from: the namespace
    gpu: int | None = None  # device-pool block id
    cpu: int | None = None  # CPU-pool block id
    gpu_pending: bool = False  # device copy being written (a swap-in in flight)
    cpu_pending: bool = False  # CPU copy being written (a demotion in flight)
    # Freed by a recompute preemption: its device copy is never demoted (evicting it drops it).
    keep_off_cpu: bool = False
    children: dict[int, RadixNode] = field(default_factory=dict)

    @property
    def parent_hash(self) -> int | None:
        """The parent block's hash; None for the first block of a chain."""
        return self.parent.block_hash if self.parent is not None else None

    @property
    def gpu_ready(self) -> bool:
        return self.gpu is not None and not self.gpu_pending

    @property
    def cpu_ready(self) -> bool:
        return self.cpu is not None and not self.cpu_pending

    @property
    def gpu_id(self) -> int:
        """The device block of a node known to hold one."""
        assert self.gpu is not None, "the node holds no device block"
        return self.gpu

    @property
    def cpu_id(self) -> int:
        """The CPU block of a node known to hold one."""
        assert self.cpu is not None, "the node holds no CPU block"
        return self.cpu

    def has_gpu_children(self) -> bool:
        return any(c.gpu is not None for c in self.children.values())

    def subtree(self) -> Iterator[RadixNode]:
        """This node and its descendants, children before parents.

        Iterative: a chain of blocks is as deep as a prompt is long (24k tokens at block
        size 16 is 1,500 levels), past Python's recursion limit."""
        stack: list[tuple[RadixNode, bool]] = [(self, False)]
        while stack:
            node, children_done = stack.pop()
            if children_done:
                yield node
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in list(node.children.values()))


class RadixTree:
    """Hash -> node index with parent links and per-tier block indexes."""

    def __init__(self) -> None:
        self._by_hash: dict[int, RadixNode] = {}
        self._by_gpu: dict[int, RadixNode] = {}
        self._by_cpu: dict[int, RadixNode] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    def get(self, block_hash: int) -> RadixNode | None:
        return self._by_hash.get(block_hash)

    def holds_block(self, block_id: int) -> bool:
        return block_id in self._by_gpu

    def holds_cpu_block(self, block_id: int) -> bool:
        return block_id in self._by_cpu

    def node_of_block(self, block_id: int) -> RadixNode:
        return self._by_gpu[block_id]

    def node_of_cpu_block(self, block_id: int) -> RadixNode:
        return self._by_cpu[block_id]

    @property
    def num_gpu(self) -> int:
        return len(self._by_gpu)

    @property
    def num_cpu(self) -> int:
        return len(self._by_cpu)

    def match(self, block_hashes: Sequence[int]) -> list[RadixNode]:
        """Nodes of the longest cached prefix whose copies are ready (either tier).

        A node being swapped in ends the match: the caller treats it as in
        flight rather than start a second swap-in of the same block.
        """
        hit = []
        for h in block_hashes:
            node = self._by_hash.get(h)
            if node is None or node.gpu_pending or not (node.gpu_ready or node.cpu_ready):
                break
            hit.append(node)
        return hit

    def insert(self, parent_hash: int | None, root: int, block_hash: int, gpu_block: int) -> RadixNode:
        """Cache a freshly computed device block under its parent (None: first block).

        An existing node wins: if it already has a device copy (or one in
        flight) it is returned unchanged; a CPU-only node gains this block as
        its device copy.
        """
        node = self._by_hash.get(block_hash)
        if node is not None:
            if node.gpu is None:
                self.set_gpu(node, gpu_block)
            return node
        assert gpu_block not in self._by_gpu, f"block {gpu_block} already in the tree"
        parent = None
        if parent_hash is not None:
            parent = self._by_hash.get(parent_hash)
            assert parent is not None, "parent block must be cached before its child"
            assert parent.gpu is not None, "device copies must stay upward-closed"
        node = RadixNode(block_hash, parent, root)
        if parent is not None:
            parent.children[block_hash] = node
        self._by_hash[block_hash] = node
        self.set_gpu(node, gpu_block)
        return node

    def set_gpu(self, node: RadixNode, block_id: int | None, pending: bool = False) -> None:
        if node.gpu is not None:
            del self._by_gpu[node.gpu]
        node.gpu, node.gpu_pending = block_id, pending and block_id is not None
        if block_id is not None:
            assert block_id not in self._by_gpu, f"device block {block_id} in two nodes"
            self._by_gpu[block_id] = node

    def set_cpu(self, node: RadixNode, block_id: int | None, pending: bool = False) -> None:
        if node.cpu is not None:
            del self._by_cpu[node.cpu]
        node.cpu, node.cpu_pending = block_id, pending and block_id is not None
        if block_id is not None:
            assert block_id not in self._by_cpu, f"CPU block {block_id} in two nodes"
            self._by_cpu[block_id] = node

    def remove_subtree(self, node: RadixNode) -> list[RadixNode]:
        """Drop a node and everything under it; returns the dropped nodes
        (children first) so the caller can release their blocks."""
        dropped = list(node.subtree())
        for n in dropped:
            del self._by_hash[n.block_hash]
            if n.gpu is not None:
                del self._by_gpu[n.gpu]
            if n.cpu is not None:
                del self._by_cpu[n.cpu]
        if node.parent is not None:
            del node.parent.children[node.block_hash]
        return dropped

    def nodes(self) -> Iterator[RadixNode]:
        return iter(self._by_hash.values())

    def clear(self) -> list[RadixNode]:
        dropped = list(self._by_hash.values())
        self._by_hash.clear()
        self._by_gpu.clear()
        self._by_cpu.clear()
        return dropped
