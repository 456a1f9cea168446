"""Radix prefix tree over full KV blocks.

Each node is one full block, keyed by its chained hash (see hashing.py), so a
node's hash already pins its whole prefix and namespace. Nodes are found by
hash in O(1); the tree shape (parent/children) is what guarantees that only
leaves are ever evicted, so a cached chain never has a hole in the middle.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    block_hash: int
    block_id: int
    parent: RadixNode | None
    children: dict[int, RadixNode] = field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.children


class RadixTree:
    """Hash -> node index with parent links; knows nothing of ref counts."""

    def __init__(self) -> None:
        self._by_hash: dict[int, RadixNode] = {}
        self._by_block: dict[int, RadixNode] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    def holds_block(self, block_id: int) -> bool:
        return block_id in self._by_block

    def node_of_block(self, block_id: int) -> RadixNode:
        return self._by_block[block_id]

    def get(self, block_hash: int) -> RadixNode | None:
        return self._by_hash.get(block_hash)

    def match(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of a chain of hashes."""
        hit = []
        for h in block_hashes:
            node = self._by_hash.get(h)
            if node is None:
                break
            hit.append(node.block_id)
        return hit

    def insert(self, parent_hash: int | None, block_hash: int, block_id: int) -> RadixNode:
        """Add a block under its parent (None for a chain's first block).

        If the hash is already cached (another sequence computed the same
        block), the existing node wins and is returned; the caller keeps its
        own copy as a private block.
        """
        node = self._by_hash.get(block_hash)
        if node is not None:
            return node
        assert block_id not in self._by_block, f"block {block_id} already in the tree"
        parent = None
        if parent_hash is not None:
            parent = self._by_hash.get(parent_hash)
            assert parent is not None, "parent block must be cached before its child"
        node = RadixNode(block_hash, block_id, parent)
        if parent is not None:
            parent.children[block_hash] = node
        self._by_hash[block_hash] = node
        self._by_block[block_id] = node
        return node

    def remove_block(self, block_id: int) -> RadixNode:
        """Drop a leaf (eviction); removing an inner node would orphan its children."""
        node = self._by_block.pop(block_id)
        assert node.is_leaf, f"evicting block {block_id}, which still has cached children"
        del self._by_hash[node.block_hash]
        if node.parent is not None:
            del node.parent.children[node.block_hash]
        return node

    def nodes(self) -> Iterator[RadixNode]:
        return iter(self._by_hash.values())

    def clear(self) -> list[RadixNode]:
        dropped = list(self._by_hash.values())
        self._by_hash.clear()
        self._by_block.clear()
        return dropped
