"""What the ingress and the replicas exchange through Ray Serve, as msgpack bytes.

Ray moves the bytes; their content is our explicit, versioned schema
(engine/executor/wire.py), so no Python object crosses a process as pickle.
"""
from __future__ import annotations

from dataclasses import dataclass

from radixserve.engine.cache.peer import KVExport, PeerHint
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.executor import wire
from radixserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    params: SamplingParams  # rebuilt, hence validated, on decode
    namespace: list[str]
    block_hashes: list[int]  # computed by the ingress exactly as the engine will: what the router reads
    lora: str | None = None  # LoRA adapter name (None: the base model)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica tells the ingress about itself (``LLMServer.get_info``)."""

    replica_id: str
    model: str
    max_model_len: int
    block_size: int
    vocab_size: int
    model_dir: str
    fingerprint: str
    node_id: str
    pid: int
    max_num_seqs: int


@dataclass(frozen=True)
class StreamItem:
    replica_id: str
    output: RequestOutput


@dataclass(frozen=True)
class RoutingInfo:
    block_hashes: list[int]
    prompt_token_ids: list[int]  # keys near ties by the prompt's first non-common tokens
    prompt_len: int
    lora: str | None = None


def encode_request(req: GenerateRequest) -> bytes:
    return wire.encode("generate", req)


def decode_request(data: bytes) -> GenerateRequest:
    return wire.decode(data, {"generate": GenerateRequest})[1]


def routing_info(data: bytes) -> RoutingInfo:
    req = decode_request(data)
    return RoutingInfo(req.block_hashes, req.prompt_token_ids, len(req.prompt_token_ids), req.lora)


def encode_item(item: StreamItem) -> bytes:
    return wire.encode("output", item)


def decode_item(data: bytes) -> StreamItem:
    return wire.decode(data, {"output": StreamItem})[1]


def encode_info(info: ReplicaInfo) -> bytes:
    return wire.encode("info", info)


def decode_info(data: bytes) -> ReplicaInfo:
    return wire.decode(data, {"info": ReplicaInfo})[1]


@dataclass(frozen=True)
class PeerHintWire:
    """The router's word on where a request's prefix is cached besides the replica it chose."""

    holder: str      # replica id
    num_blocks: int  # leading prompt blocks the holder has cached


@dataclass(frozen=True)
class ExportRequest:
    """Replica B asks holder ``target`` for the cached prefix of a chain (peer KV)."""

    target: str
    block_hashes: list[int]


def encode_hint(holder: str, num_blocks: int) -> bytes:
    return wire.encode("peer_hint", PeerHintWire(holder, num_blocks))


def decode_hint(data: bytes) -> PeerHint:
    h = wire.decode(data, {"peer_hint": PeerHintWire})[1]
    return PeerHint(h.holder, h.num_blocks)


def encode_export_request(req: ExportRequest) -> bytes:
    return wire.encode("export_request", req)


def decode_export_request(data: bytes) -> ExportRequest:
    return wire.decode(data, {"export_request": ExportRequest})[1]


def encode_export(export: KVExport) -> bytes:
    return wire.encode("kv_export", export)


def decode_export(data: bytes) -> KVExport:
    return wire.decode(data, {"kv_export": KVExport})[1]
