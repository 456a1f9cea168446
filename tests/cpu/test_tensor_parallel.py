"""Tensor parallelism on CPU with gloo: TP=2 == TP=1, the queue protocol, and faults."""
from __future__ import annotations

import os
import signal
import threading
import time

import msgpack
import pytest
import zmq

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.core.scheduler_output import SchedulerOutput, StepResult
from radixserve.engine.executor import wire
from radixserve.engine.executor.auth import FrameAuth
from radixserve.engine.executor.launcher import WorkerLauncher
from radixserve.engine.executor.protocol import ENGINE_TO_WORKER, Failure, StepReply
from tests.cpu.helpers import listening_addresses

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
LOGPROB_ATOL = 2e-4


def run(llm: LLM, prompts):
    return llm.generate(prompts, GREEDY)


@pytest.fixture(scope="module")
def tp2(tiny_dir):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, engine_worker_queue_port=0, max_model_len=512)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tp1(tiny_dir):
    return LLM(str(tiny_dir), max_model_len=512)


PROMPTS = ["Tensor parallel test one", "and a second, somewhat longer prompt for the batch " * 3,
           "short"]


def test_tp2_equals_tp1(tp1, tp2):
    a, b = run(tp1, PROMPTS), run(tp2, PROMPTS)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [lp[t].logprob for lp, t in zip(x.outputs[0].logprobs, x.outputs[0].token_ids)]
        ly = [lp[t].logprob for lp, t in zip(y.outputs[0].logprobs, y.outputs[0].token_ids)]
        assert max(abs(p - q) for p, q in zip(lx, ly)) < LOGPROB_ATOL


def test_tp2_chunked_prefill_equals_tp1(tiny_dir, tp1):
    # 16-token steps: early chunks sample nothing, so the last layer runs on zero
    # kept rows and its all-reduce must be skipped on every rank alike.
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, engine_worker_queue_port=0, max_model_len=512,
              max_num_batched_tokens=16)
    try:
        a, b = run(tp1, PROMPTS), run(llm, PROMPTS)
    finally:
        llm.shutdown()
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]


def test_prefix_hits_identical_across_tp(tp1, tp2):
    shared = "A shared system prompt that is long enough to span a few blocks of sixteen tokens. " * 2
    for llm in (tp1, tp2):
        run(llm, [shared + "first"])
    a, b = run(tp1, [shared + "second"])[0], run(tp2, [shared + "second"])[0]
    assert a.num_cached_tokens == b.num_cached_tokens > 0
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_kv_heads_must_divide(mistral_dir):  # noqa: F811
    path, _ = mistral_dir
    with pytest.raises(Exception, match="num_key_value_heads = 1 is not divisible"):
        LLM(str(path), tensor_parallel_size=2, engine_worker_queue_port=0, worker_timeout_s=60)


def test_malformed_and_wrong_version_messages_are_rejected():
    good = SchedulerOutput(step_id=1)
    kind, body = wire.decode(wire.encode("step", good), ENGINE_TO_WORKER)
    assert kind == "step" and body == good
    bad_version = msgpack.packb({"v": 99, "kind": "step", "body": wire.to_plain(good)})
    with pytest.raises(wire.WireError, match="version"):
        wire.decode(bad_version, ENGINE_TO_WORKER)
    with pytest.raises(wire.WireError, match="not a msgpack"):
        wire.decode(b"\xc1garbage", ENGINE_TO_WORKER)
    wrong_type = msgpack.packb({"v": wire.WIRE_VERSION, "kind": "step",
                                "body": {**wire.to_plain(good), "step_id": "one"}})
    with pytest.raises(wire.WireError, match="step_id"):
        wire.decode(wrong_type, ENGINE_TO_WORKER)
    unknown_kind = wire.encode("rm -rf", {})
    with pytest.raises(wire.WireError, match="unexpected message kind"):
        wire.decode(unknown_kind, ENGINE_TO_WORKER)
    extra = msgpack.packb({"v": wire.WIRE_VERSION, "kind": "step",
                           "body": {**wire.to_plain(good), "exec": "x"}})
    with pytest.raises(wire.WireError, match="unknown field"):
        wire.decode(extra, ENGINE_TO_WORKER)


def test_worker_rejects_garbage_and_keeps_serving(tp2):
    """A signed but malformed message (an engine bug): the worker answers with a failure and
    runs nothing. An unsigned one (anyone else): dropped unread, no answer at all."""
    executor = tp2.engine.executor
    peer = executor.peers[1]
    executor.sock.send_multipart([peer, b"\x93unsigned"])
    executor.sock.send_multipart([peer, *FrameAuth.generate().sign(executor.epoch, wire.encode("ping", None))])
    assert not executor.sock.poll(500)
    executor.sock.send_multipart([peer, *executor.auth.sign(executor.epoch, b"\x93not-a-valid-message")])
    deadline = time.monotonic() + 10
    reply = None
    while time.monotonic() < deadline and reply is None:
        if executor.sock.poll(100):
            _, *parts = executor.sock.recv_multipart()
            reply = wire.decode(executor.auth.open(parts, executor.epoch, "test"), {"failure": None})
    assert reply is not None and "rejected message" in reply[1]["message"]
    assert run(tp2, ["still fine"])[0].outputs[0].finish_reason == "length"


def test_intruder_on_the_queue_port_cannot_fail_a_request(tp2):
    """Issue 19, item 8: one unsigned ``failure`` frame from a local DEALER used to fail the
    request in flight and take the group down. Now every foreign frame is dropped."""
    engine, executor = tp2.engine, tp2.engine.executor
    pids, dropped = _pids(tp2), executor.auth.dropped
    ctx = zmq.Context()
    socks = []
    for ident in (b"intruder", b"rank-1", b"rank-0"):  # also squatting on the ranks' old fixed names
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, ident)
        s.connect(executor.address)
        socks.append(s)
    failure = wire.encode("failure", Failure(1, "intruder says rank 1 failed"))
    try:
        engine.add_request("victim", "a request an intruder tries to fail", SamplingParams(max_tokens=40, ignore_eos=True))
        engine.step()
        for s in socks:
            s.send(failure)  # main's frame format
            s.send_multipart([b"\0" * 32, executor.epoch.to_bytes(8, "big"), failure])  # a forged tag
            s.send_multipart(FrameAuth.generate().sign(executor.epoch, failure))  # a guessed key
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    victim = next(o for o in outs if o.request_id == "victim" and o.finished)
    assert victim.error is None and victim.outputs[0].finish_reason == "length"
    assert engine.is_healthy() and _pids(tp2) == pids  # no restart either
    assert executor.auth.dropped - dropped == 9


def test_worker_start_arguments_stay_off_the_command_line_and_environment(tp2):
    key = tp2.engine.executor.auth.key.hex()
    for pid in _pids(tp2):
        for what in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{what}", "rb") as f:
                assert key.encode() not in f.read(), f"the queue key is in /proc/{pid}/{what}"


def test_workers_listen_on_loopback_only(tp2):
    """Issue 19, item 11: rank 0's torch TCPStore listened on every interface."""
    addresses = {a for pid in _pids(tp2) for a in listening_addresses(pid)}
    assert addresses, "the ranks listen on nothing? (the store and gloo pairs should show)"
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses


def test_restart_drops_what_the_old_group_left_in_flight(tp2):
    """Issue 19, item 9: a step reply of the old group that arrived during the restart aborted
    it ("rank 1 answered 'step', expected 'loaded'") and left the engine dead. Now it carries
    the old epoch and is dropped."""
    engine, executor = tp2.engine, tp2.engine.executor
    old_epoch, stale = executor.epoch, executor.auth.stale
    ctx = zmq.Context()
    ghost = ctx.socket(zmq.DEALER)  # a surviving rank of the old group, still answering its last step
    ghost.setsockopt(zmq.LINGER, 0)
    ghost.connect(executor.address)
    reply = wire.encode("step", StepReply(1, StepResult(step_id=7), 0.0))
    late = threading.Timer(0.3, lambda: ghost.send_multipart(executor.auth.sign(old_epoch, reply)))
    late.start()  # lands while the new ranks load
    try:
        engine._recover("test: the old group failed")
    finally:
        late.join()
        ghost.close(0)
        ctx.term()
    assert engine.dead is None and engine.is_healthy()
    assert executor.epoch == old_epoch + 1 and executor.auth.stale == stale + 1
    assert run(tp2, ["after the restart"])[0].outputs[0].finish_reason == "length"


class _KillsItsFirstWorker(WorkerLauncher):
    """Starts workers through ``inner`` and SIGKILLs the first right away: a rank lost while
    the group loads (a real launcher, a real kill)."""

    def __init__(self, inner: WorkerLauncher):
        self.inner, self.killed = inner, False

    def start(self, args):
        handle = self.inner.start(args)
        if not self.killed:
            self.killed = True
            handle.kill()
        return handle


def test_a_rank_lost_while_the_group_restarts_is_retried(tp2):
    """A kill during the restart itself used to leave the engine dead for good."""
    engine, executor = tp2.engine, tp2.engine.executor
    inner, epoch = executor.launcher, executor.epoch
    executor.launcher = _KillsItsFirstWorker(inner)
    try:
        engine._recover("test: the old group failed")
    finally:
        executor.launcher = inner
    assert engine.dead is None and engine.is_healthy()
    assert executor.epoch == epoch + 2  # the first new group failed, the second came up
    assert run(tp2, ["after the retried restart"])[0].outputs[0].finish_reason == "length"


def _pids(llm: LLM) -> list[int]:
    return [h.pid for h in llm.engine.executor.handles]


def test_killed_worker_fails_request_then_engine_recovers(tiny_dir):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, engine_worker_queue_port=0, worker_timeout_s=20,
              max_model_len=512)
    engine = llm.engine
    old = _pids(llm)
    engine.add_request("victim", "a request that will lose its worker",
                       SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    start = time.monotonic()
    os.kill(old[1], signal.SIGKILL)
    outs = []
    while not any(o.request_id == "victim" and o.finished for o in outs):
        outs += engine.step()
        assert time.monotonic() - start < 30, "the failed request must end within the bound"
    victim = next(o for o in outs if o.request_id == "victim")
    assert victim.outputs[0].finish_reason == "error" and "worker" in victim.error
    assert engine.is_healthy()
    new = _pids(llm)
    assert not set(new) & set(old)
    assert run(llm, ["after the restart"])[0].outputs[0].finish_reason == "length"
    llm.shutdown()
    for pid in old + new:  # no orphans
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_shutdown_frees_port(tiny_dir):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, engine_worker_queue_port=0)
    port = llm.engine.executor.port
    llm.shutdown()
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")  # would raise EADDRINUSE if still bound
    s.close(0)
    ctx.term()
