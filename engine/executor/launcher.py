"""How worker processes come to exist. The executor only needs ``start``.

``ProcessLauncher`` starts local processes (the offline API, the CLI, tests);
the cluster provides a Ray-actor launcher with the same interface, and the
worker code is the same either way (engine/worker/main.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod

from radixserve.engine.executor import wire
from radixserve.engine.executor.protocol import WorkerArgs


class WorkerHandle(ABC):
    @abstractmethod
    def is_alive(self) -> bool: ...

    @abstractmethod
    def kill(self) -> None:
        """Stop the worker now (SIGKILL or equivalent) and reap it."""

    def describe(self) -> str:
        return repr(self)


class WorkerLauncher(ABC):
    @abstractmethod
    def start(self, args: WorkerArgs) -> WorkerHandle: ...

    def close(self) -> None:
        """Release launcher resources (placement groups, ...) after the last kill."""


class ProcessHandle(WorkerHandle):
    def __init__(self, proc: subprocess.Popen, rank: int):
        self.proc = proc
        self.rank = rank

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.proc.pid}, exit code {self.proc.poll()})"


class ProcessLauncher(WorkerLauncher):
    """``python -m radixserve.engine.worker.main`` with its arguments as plain JSON on stdin
    (never pickle; never argv or the environment, which other local users can read: the
    arguments carry the queues' key)."""

    def start(self, args: WorkerArgs) -> WorkerHandle:
        payload = json.dumps(wire.to_plain(dataclasses.replace(args, parent_pid=os.getpid()))).encode()
        proc = subprocess.Popen([sys.executable, "-m", "radixserve.engine.worker.main"], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:  # it died at once; the executor sees it dead and says so
            pass
        return ProcessHandle(proc, args.spec.rank)
