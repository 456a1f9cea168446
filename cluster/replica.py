"""LLMServer: one replica = one AsyncLLMEngine (+ its TP worker actors).

It registers with the RadixCacheMetadata actor (refused loudly on a hash
fingerprint mismatch), publishes its engine's block events and metrics every
``publish_interval_s`` (a snapshot when the actor reports a gap), streams
outputs as msgpack bytes, and reports unhealthy when its engine is, or when the
engine has had work queued without progress for ``stall_timeout_s`` (Serve then
stops sending it requests and replaces it).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray import serve

from radixserve.cluster.metadata import encode_batch, encode_snapshot, get_metadata_actor
from radixserve.cluster.replica_wire import (
    ExportRequest,
    ReplicaInfo,
    StreamItem,
    decode_export,
    decode_export_request,
    decode_hint,
    decode_request,
    encode_export,
    encode_export_request,
    encode_info,
    encode_item,
)
from radixserve.engine.cache.hashing import HASH_SCHEME_VERSION
from radixserve.engine.cache.peer import KVExport, PeerHint
from radixserve.engine.entrypoints.async_engine import AsyncLLMEngine
from radixserve.engine.entrypoints.llm import engine_config
from radixserve.engine.lora.request import LoRARequest

log = logging.getLogger(__name__)


def fingerprint(model_dir: str, block_size: int) -> str:
    """What block hashes depend on -- the model (its config, tokenizer and
    weight files), the block size, the hash scheme: replicas that differ here
    must never be compared."""
    p = Path(model_dir)
    h = hashlib.blake2b(digest_size=8)
    for name in ("config.json", "tokenizer.json"):
        h.update((p / name).read_bytes())
    for f in sorted(p.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{h.hexdigest()}:bs{block_size}:hash-v{HASH_SCHEME_VERSION}"


def _log_to_stderr() -> None:
    """The engine's INFO lines (the periodic stats line) reach the replica's log, as vLLM's do."""
    logger = logging.getLogger("radixserve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_METADATA_TIMEOUT_S = 10.0


async def _bounded(ref, timeout_s: float = _METADATA_TIMEOUT_S):
    """Await a metadata-actor call for at most ``timeout_s`` (TimeoutError after)."""
    return await asyncio.wait_for(ref, timeout_s)


class RayPeerFetcher:
    """Peer KV, the puller's side: fetch a prefix's KV from the holder replica with a
    targeted Serve call (PrefixAffinityRouter routes ``export_kv`` to the replica it
    names; Ray's object store moves the bytes). Runs on the engine's fetch threads."""

    def __init__(self, handle, replica_id: str, timeout_s: float):
        self.handle = handle
        self.replica_id = replica_id
        self.timeout_s = timeout_s

    def __call__(self, hint: PeerHint, block_hashes: list[int]) -> KVExport:
        payload = encode_export_request(ExportRequest(hint.holder, block_hashes))
        response = self.handle.export_kv.remote(hint.holder, payload)
        try:
            return decode_export(response.result(timeout_s=self.timeout_s))
        except BaseException:
            response.cancel()  # the holder died or is slow: the engine recomputes
            raise


class LLMServer:
    def __init__(self, engine_kwargs: dict[str, Any], publish_interval_s: float = 0.1,
                 stall_timeout_s: float = 120.0):
        _log_to_stderr()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        cfg = engine_config(**engine_kwargs)
        launcher = None
        if cfg.parallel.tensor_parallel_size > 1:
            import torch

            from radixserve.cluster.ray_launcher import RayWorkerLauncher
            launcher = RayWorkerLauncher(use_gpu=torch.cuda.is_available())
        fetcher = None
        if cfg.cache.peer_kv:
            handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
            fetcher = RayPeerFetcher(handle, self.replica_id, cfg.cache.peer_pull_timeout_s)
        self.engine = AsyncLLMEngine(cfg, launcher=launcher, engine_id=self.replica_id, peer_fetcher=fetcher)
        core = self.engine.engine
        import ray
        self.info = ReplicaInfo(self.replica_id, cfg.model.model, core.max_model_len, core.block_size,
                                core.arch.vocab_size, str(core.model_dir),
                                fingerprint(str(core.model_dir), core.block_size),
                                ray.get_runtime_context().get_node_id(), os.getpid(),
                                cfg.scheduler.max_num_seqs)
        self.metadata = get_metadata_actor(ctx.app_name)
        self._registered = self._register(ray)
        self.publish_interval_s = publish_interval_s
        self.stall_timeout_s = stall_timeout_s  # 0: never fail the health check for a stall
        self._publisher: asyncio.Task | None = None
        self._adapters_version = -1  # the registry version this replica last converged to
        self._adapter_errors: dict[str, str] = {}
        try:  # report from the start: routers pass over a replica that never reported
            self._ensure_publisher()
        except RuntimeError:  # built outside an event loop (Serve runs __init__ on one): the first call starts it
            pass

    def _register(self, ray) -> bool:
        """Join the cache directory, waiting a bounded time: a replica never blocks on it. A
        fingerprint mismatch still fails loudly; an unreachable actor only costs affinity
        until the publisher's next attempt succeeds."""
        try:
            ray.get(self.metadata.register.remote(self.replica_id, self.info.fingerprint),
                    timeout=_METADATA_TIMEOUT_S)
            return True
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            log.warning("the cache metadata actor did not answer in %.0f s; serving without prefix "
                        "affinity until it does", _METADATA_TIMEOUT_S)
            return False

    def _ensure_publisher(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        while True:
            try:
                batch, load = await self.engine.call(  # wall clock: routers compare it across nodes
                    lambda e: (e.events.drain(), (e.scheduler.pending_prefill_tokens(), time.time(),
                                                   e.kv.num_free_blocks, e.kv.num_blocks,
                                                   *e.peer.estimate.in_tokens())))
                text = self.engine.engine.metrics.render()
                ok = await _bounded(self.metadata.push.remote(self.replica_id, encode_batch(batch), text, load))
                if not ok:  # the actor missed events, restarted, or never met us: send the whole state
                    await _bounded(self.metadata.ensure_registered.remote(self.replica_id, self.info.fingerprint))
                    snap = await self.engine.call(lambda e: e.snapshot())
                    await _bounded(self.metadata.push_snapshot.remote(self.replica_id, encode_snapshot(snap)))
                    if not self._registered:
                        log.info("joined the cache metadata actor; prefix affinity is back")
                        self._registered = True
                if self.engine.engine.lora is not None:
                    await self._sync_adapters()
            except Exception:
                log.exception("publishing block events failed; retrying")
            await asyncio.sleep(self.publish_interval_s)

    async def _sync_adapters(self) -> None:
        """Converge to the cluster's adapter registry, then report what is loaded
        (namespace per adapter, or the error) and what sits in device slots."""
        got = await self.metadata.adapter_sync.remote(self.replica_id, self._adapters_version)
        lora = self.engine.engine.lora
        if got is not None:
            version, wanted = got
            want = dict(wanted)
            for name in [n for n in lora.adapters if n not in want]:
                await self.engine.unload_lora(name)
                self._adapter_errors.pop(name, None)
            for name, path in want.items():
                cur = lora.adapters.get(name)
                if cur is not None and cur.path == path:
                    continue
                try:
                    await self.engine.load_lora(LoRARequest(name, path))
                    self._adapter_errors.pop(name, None)
                except (ValueError, OSError) as exc:  # an unreadable file too: reported, not retried forever
                    self._adapter_errors[name] = f"error: {exc}"
            self._adapters_version = version
        loaded = {n: a.namespace for n, a in lora.adapters.items()}
        resident = [a.name for a in lora.slots if a is not None]
        await self.metadata.report_adapters.remote(self.replica_id, {**loaded, **self._adapter_errors}, resident)

    async def get_info(self) -> bytes:
        """This replica's ReplicaInfo, msgpack-encoded (``replica_wire.decode_info``)."""
        self._ensure_publisher()
        return encode_info(self.info)

    async def generate(self, payload: bytes, peer_hint: bytes | None = None):
        """Stream msgpack-encoded StreamItems; closing the stream aborts the request.
        ``peer_hint`` (the router's): another replica holds more of the prompt's prefix."""
        self._ensure_publisher()
        req = decode_request(payload)
        hint = decode_hint(peer_hint) if peer_hint is not None else None
        if hint is not None and hint.holder == self.replica_id:
            hint = None
        lora = None
        if req.lora is not None:
            if self.engine.engine.lora is not None and req.lora not in self.engine.engine.lora.adapters:
                await self._sync_adapters()  # loaded in the cluster moments ago
            lora = LoRARequest(req.lora)
        async for out in self.engine.generate(req.prompt_text, req.params, req.request_id,
                                              prompt_token_ids=req.prompt_token_ids,
                                              namespace=req.namespace, lora_request=lora, peer_hint=hint):
            yield encode_item(StreamItem(self.replica_id, out))

    async def export_kv(self, target: str, payload: bytes) -> bytes:
        """Peer KV, the holder's side: the longest cached prefix of a chain, every rank's
        bytes (msgpack). ``target`` is the replica the caller meant (our router routes the
        call there by it); copied between two engine steps, pinned meanwhile."""
        if target != self.replica_id:
            raise LookupError(f"peer KV export for replica {target} reached {self.replica_id}: "
                              f"{target} is not a running replica")
        req = decode_export_request(payload)
        export = await self.engine.call(lambda e: e.export_kv(req.block_hashes))
        return encode_export(export)

    async def metrics(self) -> str:
        return self.engine.engine.metrics.render(f'replica="{self.replica_id}"')

    async def kv_state(self) -> dict:
        """Blocks in use and cached (tests check nothing leaks after load)."""
        return await self.engine.call(lambda e: {
            "num_free": e.kv.num_free_blocks, "num_blocks": e.kv.num_blocks,
            "requests": len(e.scheduler.requests), "cached": e.kv.num_cached_blocks})

    async def reset_prefix_cache(self) -> bool:
        return await self.engine.call(lambda e: e.kv.reset_prefix_cache())

    async def check_health(self) -> None:
        self._ensure_publisher()
        if not self.engine.is_healthy():
            raise RuntimeError(f"replica {self.replica_id}: engine unhealthy")
        stalled = self.engine.stalled_for()
        if self.stall_timeout_s and stalled > self.stall_timeout_s:
            raise RuntimeError(f"replica {self.replica_id}: the engine made no progress for {stalled:.0f} s "
                               f"with work queued (stall_timeout_s={self.stall_timeout_s:g})")

    def __del__(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:
            pass
