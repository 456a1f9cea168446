"""Socket helpers shared by the engine's two queues (engine-worker, cache)."""
from __future__ import annotations

import logging
import socket
import weakref

import zmq

log = logging.getLogger(__name__)


def bind_router(ctx: zmq.Context, host: str, port: int) -> tuple[zmq.Socket, int]:
    """Bind the configured port, or any free one if it is taken (another
    replica on this node), so replicas never collide."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished rank raises, not drops
    if port:
        try:
            sock.bind(f"tcp://{host}:{port}")
            return sock, port
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
            log.warning("port %d is in use; binding a free port instead", port)
    return sock, sock.bind_to_random_port(f"tcp://{host}")


def close_on_collect(owner: object, sock: zmq.Socket, ctx: zmq.Context) -> None:
    """Close ``sock`` and terminate ``ctx`` when ``owner`` is collected without being closed.

    zmq's own Context.__del__ blocks in term() while any socket of it is open, and in a
    garbage cycle the socket may still be open when it runs: the collector would hang,
    wherever it happened to run. The finalizer closes the socket first."""
    weakref.finalize(owner, _close, sock, ctx)


def _close(sock: zmq.Socket, ctx: zmq.Context) -> None:
    if not sock.closed:
        sock.close(linger=0)
    if not ctx.closed:
        ctx.term()


def free_tcp_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
