"""An engine dropped without shutdown() is collected without hanging and frees its ports."""
from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from radixserve.engine import LLM, SamplingParams


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_dropped_llm_is_collected_and_closes_its_ports(tiny_dir):
    # A CPU tier gives the engine a ZMQ cache queue; a reference cycle makes the collector,
    # not refcounting, free it (zmq's Context.__del__ used to block there forever).
    llm = LLM(str(tiny_dir), num_cpu_blocks=16, max_model_len=256, cache_queue_port=0)
    llm.generate("warm up", SamplingParams(max_tokens=2))
    port = llm.engine.transfers.port
    llm.cycle = llm
    del llm
    done = threading.Event()
    threading.Thread(target=lambda: (gc.collect(), done.set()), daemon=True).start()
    assert done.wait(30), "gc.collect() hung on the dropped engine"
    assert _port_is_free(port)


_PARENT = r"""
import sys, time
from radixserve.engine.entrypoints.llm import engine_config
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.launcher import ProcessLauncher
from radixserve.engine.executor.protocol import WorkerArgs, WorkerSpec
spec = WorkerSpec(engine_config(model=sys.argv[1], max_model_len=128), sys.argv[1], 0, 128, (2,))
handle = ProcessLauncher().start(WorkerArgs(spec, "tcp://127.0.0.1:9", FrameAuth.generate().key.hex(), 1))
print(handle.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped is dead too
    except FileNotFoundError:
        return True


def test_worker_of_a_parent_killed_while_it_starts_dies_at_once(tiny_dir):
    """Issue 19, item 11: the parent-death signal was armed only after torch's import, so a
    parent killed in that window left its worker running (here: for good)."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tiny_dir)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.kill()  # the worker is still importing torch
    parent.wait(timeout=10)
    parent.stdout.close()
    deadline = time.monotonic() + 3.0
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert _gone(worker), "the worker outlived its killed parent"
    finally:
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)
