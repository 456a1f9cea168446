"""An engine dropped without shutdown() is collected without hanging and frees its ports."""
from __future__ import annotations

import gc
import socket
import threading

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
