"""The batch job: prefix-grouped shards over Ray actors, killed mid-run and resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radixserve.cluster.batch import Row, shard_by_prefix
from radixserve.cluster.ray_reaper import descendants, start_time
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.model.default_models import resolve_model

PREFIXES = ["Summarize the following policy for a new employee in two sentences. " * 2,
            "Translate the next sentence into plain English for a customer. " * 2,
            "Classify the sentiment of this product review as positive or negative. " * 2]


QUICK, SLOW = 6, 200  # max_tokens: rows 0-5 finish long before the others


def write_input(path, n=18):
    rows = [{"id": f"row-{i}", "prompt": PREFIXES[i % 3] + f"Item number {i}.", "ignore_eos": True,
             "max_tokens": QUICK if i < 6 else SLOW} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def batch_cmd(inp, out, cache):
    return [sys.executable, "-m", "radixserve.cluster.batch", str(inp), str(out), "--model", "tiny-llama",
            "--cache-dir", cache, "--num-engines", "2", "--cpus-per-engine", "0.5"]


def complete_rows(out) -> list[dict]:
    text = out.read_text() if out.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def kill_after_rows(cmd, out, n: int, timeout_s: float = 300.0) -> dict[int, str]:
    """Run the batch job and SIGKILL it (that PID only) once ``n`` rows are written;
    returns the processes it had started (pid -> start time), its reaper aside."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    started: dict[int, str] = {}
    try:
        while len(complete_rows(out)) < n:
            assert proc.poll() is None, f"batch job ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "batch job wrote too few rows in time"
            time.sleep(0.02)
        assert proc.poll() is None, "batch job finished before it could be interrupted"
        started = {pid: start for pid in descendants(proc.pid) if (start := start_time(pid))
                   and b"ray_reaper" not in cmdline(pid)}
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    return started


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def assert_all_gone(started: dict[int, str], bound_s: float = 20.0) -> None:
    """Issue 19, item 11: Ray's DashboardAgent and RuntimeEnvAgent outlived a SIGKILLed job."""
    deadline = time.monotonic() + bound_s
    alive = started
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p: s for p, s in alive.items() if start_time(p) == s}
    names = {p: cmdline(p).rstrip(b"\0")[:60] for p in alive}
    for pid in alive:  # ours: a test stops what it started, by pid
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes of the killed job still run after {bound_s:.0f}s: {names}"


def test_interrupted_job_resumes_without_loss_or_duplicates(tmp_path):
    cache = str(tmp_path / "models")
    model_dir = resolve_model("tiny-llama", cache)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = write_input(inp)
    started = kill_after_rows(batch_cmd(inp, out, cache), out, 6)  # the quick rows are in; the slow ones are not
    assert any(b"DashboardAgent" in cmdline(p) for p in started)  # what used to stay
    assert_all_gone(started)
    first = {r["id"] for r in complete_rows(out)}
    assert first == {f"row-{i}" for i in range(6)}
    with out.open("a") as f:
        f.write('{"id": "row-torn", "te')  # a write torn by the crash
    second = subprocess.run(batch_cmd(inp, out, cache), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert report["rows_written"] == len(rows) - len(first) and report["prefix_hit_rate"] > 0.3
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # each exactly once
    llm = LLM(str(model_dir))
    ref = llm.generate([r["prompt"] for r in rows],
                       [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in rows])
    by_id = {r["id"]: r for r in got}
    for row, expect in zip(rows, ref):
        assert by_id[row["id"]]["token_ids"] == expect.outputs[0].token_ids


def test_shards_keep_prefix_groups_together():
    rows = [Row(f"r{i}", [i % 3] * 64 + [i], SamplingParams()) for i in range(30)]
    shards = shard_by_prefix(rows, 2, 16)
    for shard in shards:
        groups = {r.prompt_token_ids[0] for r in shard}
        for g in groups:
            assert all(r.prompt_token_ids[0] != g for other in shards if other is not shard for r in other)


def test_ray_job_submit_and_a_batch_next_to_a_running_cluster(tmp_path):
    """The documented flows: `ray job submit` against the launch script's head (its dashboard
    on 127.0.0.1), and a plain local batch run while that cluster is up (it starts its own Ray)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from tests.cluster.helpers import free_port
    script = Path(__file__).resolve().parents[2] / "ray_configs" / "launch_multinode.sh"
    temp_dir = tempfile.mkdtemp(prefix="rsjob-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "PYTHON": sys.executable, "RAY_TEMP_DIR": temp_dir, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cache = str(tmp_path / "models")
    resolve_model("tiny-llama", cache)
    inp = tmp_path / "in.jsonl"
    rows = write_input(inp, n=6)
    dash = free_port()
    try:
        head = subprocess.run(["bash", str(script), "head", "--port", str(free_port()), "--dashboard-port", str(dash),
                               "--num-cpus", "2"], capture_output=True, text=True, timeout=180, env=env)
        assert head.returncode == 0, head.stderr[-3000:]
        out = tmp_path / "job-out.jsonl"
        submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--", *batch_cmd(inp, out, cache)[:-4], "--num-engines", "1", "--cpus-per-engine", "1"]
        deadline = time.monotonic() + 60
        while True:  # right after `ray start` the job agent may not be up yet ("try again later")
            job = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env)
            no_agent = "No available agent" in job.stdout + job.stderr
            if not no_agent or time.monotonic() > deadline:
                break
            time.sleep(3)
        # The dashboard answered (without it this is "connection refused"); on a loaded CI machine
        # Ray's job agent was seen not to register for minutes: that part is then not judged here.
        if not no_agent:
            assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
            assert sorted(r["id"] for r in complete_rows(out)) == sorted(r["id"] for r in rows)  # where asked
        local_out = tmp_path / "local-out.jsonl"
        local = subprocess.run(batch_cmd(inp, local_out, cache)[:-4] + ["--num-engines", "1"],
                               capture_output=True, text=True, timeout=600, env=env)
        assert local.returncode == 0, local.stderr[-3000:]
        assert len(complete_rows(local_out)) == len(rows)
        if no_agent:
            pytest.skip("Ray's job agent did not register within 60 s; the job-submit half was not run")
    finally:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=120, env=env)
        left = subprocess.run(["pgrep", "-f", temp_dir + "/"], capture_output=True, text=True).stdout.split()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes left under {temp_dir}"


def test_a_relative_output_in_a_jobs_temporary_working_dir_is_refused(tmp_path, monkeypatch):
    from radixserve.cluster.batch import output_path
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "pkg"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    try:
        output_path("out.jsonl")
    except ValueError as exc:
        assert "absolute path" in str(exc)
    else:
        raise AssertionError("a relative output path inside a job's working_dir was accepted")
    assert output_path(str(tmp_path / "out.jsonl")) == tmp_path / "out.jsonl"
