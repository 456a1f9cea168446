"""Who may talk on the engine's two ZMQ queues, and which worker generation is talking.

Every frame on the engine-worker and cache queues is three ZMQ parts::

    [tag, epoch, payload]    tag = HMAC-SHA256(key, epoch || payload), epoch = 8 bytes big-endian

``key`` is 32 random bytes (``secrets``) the engine makes when it starts; workers get it only
in their start arguments (a local process reads them from stdin, a Ray actor as its call's
argument), never from the command line or the environment. A frame whose tag does not verify
(``hmac.compare_digest``) is dropped and logged before it is decoded: a local process that
can reach the port cannot fail a request or join a group. ``epoch`` is the worker group's
generation: the engine bumps it on every restart and each side drops frames of another
generation, so a reply a killed group left in flight never reaches the next one.

Why a tag on every frame and not ZMQ CURVE: CURVE only limits who may connect when a ZAP
authenticator thread checks client keys (without one, anyone who knows the server key gets
in), it encrypts loopback traffic nobody can read without root, and it carries no epoch;
an HMAC is one stdlib call per frame, the same for both queues, for local and Ray workers.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_EPOCH_BYTES = 8
_LOG_EVERY_S = 10.0  # a flood of bad frames logs once per interval, with a count


@dataclass(frozen=True)
class Frame:
    epoch: int
    payload: bytes


@dataclass
class FrameAuth:
    """Signs and checks the frames of one engine's queues (one key per engine launch)."""

    key: bytes
    dropped: int = 0  # frames refused: bad tag, wrong shape
    stale: int = 0    # well-signed frames of another epoch
    _last_log: float = field(default=0.0, repr=False)

    @classmethod
    def generate(cls) -> FrameAuth:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_hex(cls, key: str) -> FrameAuth:
        return cls(bytes.fromhex(key))

    def _tag(self, e: bytes, payload: bytes) -> bytes:
        # fed in two parts: ``e + payload`` would copy a peer-KV payload (tens of MB) once more
        mac = hmac.new(self.key, e, hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def sign(self, epoch: int, payload: bytes) -> list[bytes]:
        e = epoch.to_bytes(_EPOCH_BYTES, "big")
        return [self._tag(e, payload), e, payload]

    def open(self, parts: list[bytes], epoch: int, where: str) -> bytes | None:
        """The payload of a well-signed frame of ``epoch``; None (dropped, logged) otherwise."""
        frame = self.verify(parts, where)
        if frame is None:
            return None
        if frame.epoch != epoch:
            self.stale += 1
            log.debug("%s: dropped a frame of epoch %d (now %d)", where, frame.epoch, epoch)
            return None
        return frame.payload

    def verify(self, parts: list[bytes], where: str) -> Frame | None:
        if len(parts) != 3 or len(parts[1]) != _EPOCH_BYTES:
            self._refuse(where, f"a frame of {len(parts)} part(s), not [tag, epoch, payload]")
            return None
        tag, e, payload = parts
        if not hmac.compare_digest(tag, self._tag(e, payload)):
            self._refuse(where, "a frame with a bad tag")
            return None
        return Frame(int.from_bytes(e, "big"), payload)

    def _refuse(self, where: str, what: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("%s: dropped %s from an unauthenticated peer (%d dropped so far)",
                        where, what, self.dropped)
