"""Chained block hashes: the key of every node of the radix prefix tree.

A full block's hash covers (parent hash, its token ids); the chain starts at a
root hash derived from the namespace (LoRA adapter, cache salt, tenant), so two
namespaces never share a block. The function is stable across processes and
machines (blake2b, little-endian token bytes): the cluster router computes the
same hashes from a prompt to find the replica that holds it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack
import numpy as np

# Bump when the hashed bytes change: replicas and routers with different
# versions must not compare hashes (the metadata actor refuses a mismatch).
HASH_SCHEME_VERSION = 1


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def root_hash(namespace: Sequence[str] = ()) -> int:
    """Hash every chain starts from; () is the shared default namespace."""
    return _digest(msgpack.packb(["radixserve-block-hash", HASH_SCHEME_VERSION, list(namespace)]))


def request_namespace(tenant: str | None = None, cache_salt: str | None = None) -> tuple[str, ...]:
    """A request's own namespace parts: its tenant's (API key) and its cache salt's,
    so a request only ever hits blocks cached by requests with the same ones."""
    return ((f"tenant:{tenant}",) if tenant is not None else ()) + \
        ((f"salt:{cache_salt}",) if cache_salt is not None else ())


def cache_namespace(adapter: str | None, namespace: Sequence[str] = ()) -> tuple[str, ...]:
    """The namespace a request's blocks hash under: its LoRA adapter version's own
    (``lora:{name}:{content hash}``, None for the base model) first, then the
    request's (``request_namespace``). The engine caches under it and the cluster
    ingress hashes prompts under it for the router: both call this."""
    return ((adapter,) if adapter is not None else ()) + tuple(namespace)


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    tokens = np.asarray(token_ids, dtype="<u4").tobytes()
    return _digest(parent_hash.to_bytes(8, "little") + tokens)


def hash_full_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int,
                     start_block: int = 0) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` from ``start_block`` on.

    ``parent_hash`` is the hash of block ``start_block - 1`` (or the root).
    """
    hashes = []
    num_full = len(token_ids) // block_size
    for i in range(start_block, num_full):
        parent_hash = hash_block(parent_hash, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent_hash)
    return hashes


def prompt_block_hashes(token_ids: Sequence[int], block_size: int,
                        namespace: Sequence[str] = ()) -> list[int]:
    """All full-block hashes of a prompt, as the router and the engine see it."""
    return hash_full_blocks(token_ids, block_size, root_hash(namespace))
