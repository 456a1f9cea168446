"""Constants and helpers shared by the cluster tests and their conftest."""
from __future__ import annotations

import socket

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}  # API key -> tenant of the shared deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
