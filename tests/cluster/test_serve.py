"""The cluster over real Ray Serve, real HTTP, real replica processes."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from radixserve.cluster.replica_wire import ReplicaInfo, decode_info
from radixserve.cluster.routing_policy import RouterConfig
from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.hashing import prompt_block_hashes
from tests.cluster.helpers import KEYS

AUTH = {"Authorization": "Bearer key-a"}
NS_A = ("tenant:tenant-a",)


def complete(c: httpx.Client, prompt, key="key-a", **kw) -> httpx.Response:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, "temperature": 0, **kw}
    if "model" in kw:
        body["model"] = kw["model"]
    return c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def client(cluster, base=None) -> httpx.Client:
    return httpx.Client(base_url=base or cluster.url, timeout=120)


def router_reasons(c: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in c.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith("radixserve:router_decisions_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = out.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return out


def published_blocks(replica: str) -> set[int]:
    """Block hashes a replica has published to the cluster's cache directory."""
    import ray

    from radixserve.cluster.metadata import LocalIndex, decode_delta, get_metadata_actor
    index = LocalIndex()
    index.apply(decode_delta(ray.get(get_metadata_actor("radixserve").pull.remote(0))))
    return set(index.blocks.get(replica, {}))


def wait_for(pred, timeout=20.0, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_http_end_to_end_matches_offline_engine(cluster):
    c = client(cluster)
    prompt = "The cluster answers exactly what the offline engine answers. " * 3
    r = complete(c, prompt, max_tokens=8)
    assert r.status_code == 200, r.text
    tokens = LLM(str(cluster.model_dir), max_model_len=1024).generate(
        prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert r.json()["choices"][0]["text"] == tokens
    chat = c.post("/v1/chat/completions", headers=AUTH, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    with c.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "stream please"}],
            "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 5
    assert s.headers["x-radixserve-replica"]


def test_repeated_prefix_hits_cache_on_the_same_replica(cluster):
    c = client(cluster)
    prefix = "A long shared system prompt about routing requests to the replica that holds them. " * 3
    first = complete(c, prefix + "first question")
    replica = first.headers["x-radixserve-replica"]
    time.sleep(0.5)  # replicas publish block events every 0.1 s; routers pull every 0.05 s
    for i in range(3):
        r = complete(c, prefix + f"question {i}")
        assert r.headers["x-radixserve-replica"] == replica
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    wait_for(lambda: router_reasons(c).get("affinity", 0) >= 3)  # routers report every 0.5 s


def test_cluster_metrics_are_valid_prometheus_text(cluster):
    from prometheus_client.parser import text_string_to_metric_families
    c = client(cluster)
    for i in range(4):
        complete(c, f"metrics from both replicas {i} " * 8)
    wait_for(lambda: c.get("/metrics", headers=AUTH).text.count("radixserve:num_requests_running{") >= 2)
    fams = list(text_string_to_metric_families(c.get("/metrics", headers=AUTH).text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), "a family repeats its header"
    running = next(f for f in fams if f.name == "vllm:num_requests_running")
    assert len({s.labels["replica"] for s in running.samples}) == 2
    assert all(s.labels["model_name"] == "tiny-llama" for s in running.samples)


def test_eviction_makes_the_router_stop_preferring_a_replica(cluster):
    c = client(cluster)
    target = "This document is cached on one replica until other documents push it out. " * 4
    home = complete(c, target).headers["x-radixserve-replica"]
    # New prefixes go where the pool has empty blocks first (the pressure term), so probe until
    # both replicas have answered rather than a fixed few times.
    replicas = {home}
    for i in range(40):
        replicas.add(complete(c, f"probe {i} " * 30).headers["x-radixserve-replica"])
        if len(replicas) == 2:
            break
    assert len(replicas) == 2
    # Distinct ~450-token fillers (no cache hit anywhere) until five have landed on the home
    # replica: four overflow its 96-block pool. The router spreads new prefixes over both
    # replicas (by hash and recent share), so about half of them land there.
    landed, i = 0, 0
    while landed < 5:
        assert i < 40, f"only {landed} of {i} new prefixes landed on {home}"
        text = f"filler document {i}: " + "unrelated words about other topics " * 60
        landed += complete(c, text, max_tokens=1).headers["x-radixserve-replica"] == home
        i += 1
    # events published and pulled, router counters reported, and the router's own
    # prediction that the target's blocks are on home (made when it sent them) expired
    time.sleep(max(1.0, RouterConfig().predict_ttl_s + 0.5))
    before = router_reasons(c)
    r = complete(c, target)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # evicted
    wait_for(lambda: sum(router_reasons(c).values()) > sum(before.values()))
    after = router_reasons(c)
    assert after.get("affinity", 0) == before.get("affinity", 0)  # no longer an affinity decision
    assert after.get("rendezvous", 0) > before.get("rendezvous", 0)


def test_hot_prefix_spills_to_a_second_replica(cluster):
    hot = "One hot prefix that everybody sends at the same moment. " * 3

    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as ac:
            async def one(i):
                r = await ac.post("/v1/completions", headers=AUTH, json={
                    "model": "tiny-llama", "prompt": hot + f"#{i}", "max_tokens": 60, "ignore_eos": True})
                return r.headers["x-radixserve-replica"]
            return await asyncio.gather(*(one(i) for i in range(10)))
    assert len(set(asyncio.run(go()))) == 2


def test_auth_validation_and_unknown_model(cluster):
    c = client(cluster)
    assert c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x"}).status_code == 401
    assert complete(c, "x", key="wrong").status_code == 401
    r = c.post("/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = complete(c, "word " * 1100)
    assert r.status_code == 400 and "max" in r.json()["error"]["message"].lower()
    r = complete(c, "x", top_p=7)
    assert r.status_code == 400
    assert c.get("/health").status_code == 200
    assert c.get("/metrics").status_code == 401  # behind the key: per-replica hit counters


def test_tenant_and_salt_isolation(cluster):
    c = client(cluster)
    prompt = "Confidential prefix of tenant A that tenant B must never hit or time. " * 3
    complete(c, prompt + "1")
    # the router learns about the new blocks within a publish + pull interval
    same = wait_for(lambda: (r := complete(c, prompt + "2")).json()["usage"]["prompt_tokens_details"]
                    ["cached_tokens"] > 0 and r, timeout=10)
    assert same.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    other = complete(c, prompt + "2", key="key-b", return_token_ids=True)
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    salted = complete(c, prompt + "2", cache_salt="s1", return_token_ids=True)
    assert salted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # What the server did with them: the replica that ran each request cached its
    # prompt under the key's tenant (and the salt), and published those blocks.
    for r, ns in ((other, (f"tenant:{KEYS['key-b']}",)), (salted, (f"tenant:{KEYS['key-a']}", "salt:s1"))):
        ids = r.json()["choices"][0]["prompt_token_ids"]
        first_block = prompt_block_hashes(ids, 16, ns)[0]
        wait_for(lambda: first_block in published_blocks(r.headers["x-radixserve-replica"]), timeout=10)


def test_tp2_replica_matches_offline(cluster):
    c = client(cluster, cluster.tp2_url)
    prompt = "Tensor parallel replica behind Ray Serve."
    r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 8,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    ref = LLM(str(cluster.model_dir), max_model_len=1024).generate(
        prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert r.json()["choices"][0]["text"] == ref


def _replica_states(cluster) -> dict[str, tuple[ReplicaInfo, dict]]:
    states = {}
    for _ in range(30):  # calls without a prompt are spread by Ray's power-of-two choice
        info = decode_info(cluster.handle.get_info.remote().result())
        states[info.replica_id] = (info, cluster.handle.kv_state.remote().result())
        if len(states) == 2:
            break
    return states


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_load_200_concurrent_streams_no_errors_no_leaks(cluster):
    before = {rid: _rss_mb(info.pid) for rid, (info, _) in _replica_states(cluster).items()}

    async def go():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=300, limits=limits) as ac:
            async def one(i):
                body = {"model": "tiny-llama", "prompt": f"load test request {i % 7} " * 4, "max_tokens": 8,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                async with ac.stream("POST", "/v1/completions", json=body, headers=AUTH) as s:
                    lines = [ln async for ln in s.aiter_lines() if ln.startswith("data: ")]
                assert s.status_code == 200 and lines[-1] == "data: [DONE]"
                return json.loads(lines[-2][6:])["usage"]["completion_tokens"]
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), timeout=400)
    counts = asyncio.run(go())
    assert counts == [8] * 200  # zero errors, zero lost responses

    def settled():
        states = _replica_states(cluster)
        return states if all(kv["requests"] == 0 and kv["num_free"] == kv["num_blocks"]
                             for _, kv in states.values()) else None
    states = wait_for(settled, timeout=30)
    for rid, (info, _) in states.items():
        if rid in before:
            assert _rss_mb(info.pid) < before[rid] * 1.5 + 100  # memory back near its start


def test_lora_adapter_loaded_on_every_replica_and_served(cluster, tmp_path):
    from radixserve.engine.lora.request import LoRARequest
    from radixserve.engine.model.hf_config import load_arch_config
    from tests.cpu.helpers import write_adapter
    path = write_adapter(cluster.lora_root / "sql", load_arch_config(cluster.model_dir), seed=3)
    c = client(cluster)
    r = c.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "sql", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    assert "sql" in [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]]
    prompt = "Select every order placed last week by customers in Lisbon."
    ref = LLM(str(cluster.model_dir), enable_lora=True).generate(
        prompt, SamplingParams(temperature=0, max_tokens=6), lora_request=LoRARequest("sql", str(path)))[0]
    seen = set()
    for _ in range(3):
        out = complete(c, prompt, model="sql")
        assert out.status_code == 200 and out.json()["choices"][0]["text"] == ref.outputs[0].text
        seen.add(out.headers["x-radixserve-replica"])
    assert complete(c, prompt).json()["choices"][0]["text"] != ref.outputs[0].text  # base model differs
    bad = c.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "bad", "lora_path": str(tmp_path)})
    assert bad.status_code == 403  # outside the allowed roots
    assert c.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "sql"}).status_code == 200
    assert complete(c, prompt, model="sql").status_code == 404


# Last in this file (pytest runs a file top to bottom): it kills a replica of the shared deployment.
def test_killed_replica_is_replaced_and_requests_keep_succeeding(cluster):
    import ray
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "radixserve#LLMServer" in a["name"] and "tp2" not in a["name"]]
    assert len(names) == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    c = client(cluster)
    ok = 0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and ok < 10:
        r = complete(c, f"after the crash {ok}")
        assert r.status_code == 200, r.text
        ok += 1
    assert ok == 10

    def replaced():
        return len([a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "radixserve#LLMServer" in a["name"] and "tp2" not in a["name"]]) == 2
    wait_for(replaced, timeout=60)


def test_redeploy_with_a_changed_argument_under_load(cluster):
    """A second deploy of an app (one engine argument changed) rolls over under load: the
    metadata actor belongs to no replica's placement group, so it survives the old replica."""
    import threading

    import ray
    from ray import serve

    from radixserve.cluster.app import ClusterConfig, build_application
    from radixserve.cluster.metadata import ACTOR_NAMESPACE, actor_name
    from radixserve.cluster.serve_cli import kill_metadata_actor

    def app(max_num_seqs: int):
        return build_application(ClusterConfig(model="tiny-llama", engine={
            "cache_dir": cluster.cache_dir, "max_model_len": 512, "num_gpu_blocks": 64, "max_num_seqs": max_num_seqs,
            "engine_worker_queue_port": 0, "cache_queue_port": 0}))

    serve.run(app(8), name="redeploy", route_prefix="/redeploy")
    base = cluster.url + "/redeploy"
    codes: list[int] = []
    stop = threading.Event()

    def load():
        with client(cluster, base) as c:
            while not stop.is_set() and len(codes) < 400:  # bounded, loopback only
                try:
                    codes.append(c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "roll over " * 8,
                                                                 "max_tokens": 2}, timeout=30).status_code)
                except httpx.HTTPError:
                    codes.append(0)
                time.sleep(0.05)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(2)
        started = time.monotonic()
        # In a thread: with the defect serve.run never returned (the new replica hung on the actor).
        threading.Thread(target=serve.run, args=(app(16),), kwargs={"name": "redeploy", "route_prefix": "/redeploy"},
                         daemon=True).start()
        wait_for(lambda: time.monotonic() - started > 1
                 and serve.status().applications["redeploy"].status == "RUNNING", timeout=120, every=0.5)
        rolled_s = time.monotonic() - started
        time.sleep(2)
    finally:
        stop.set()
        worker.join(timeout=60)
    failed = [code for code in codes if code != 200]
    # Bound: a request in flight on the old replica when Serve stops it may fail; no more.
    assert len(codes) > 20 and len(failed) <= 3, (len(codes), failed)
    assert rolled_s < 90
    # The actor outlived the old replica's placement group and knows only the new replica.
    meta = ray.get_actor(actor_name("redeploy"), namespace=ACTOR_NAMESPACE)
    wait_for(lambda: len(ray.get(meta.replica_ids.remote(), timeout=10)) == 1, timeout=40)
    with client(cluster, base) as c:  # affinity is back: the new replica registered and publishes
        prefix = "after the redeploy the cache works again " * 4
        c.post("/v1/completions", json={"model": "tiny-llama", "prompt": prefix + "one", "max_tokens": 1})
        wait_for(lambda: c.post("/v1/completions", json={"model": "tiny-llama", "prompt": prefix + "two",
                                                         "max_tokens": 1}).json()["usage"]
                 ["prompt_tokens_details"]["cached_tokens"] > 0, timeout=20)
    serve.delete("redeploy")
    kill_metadata_actor("redeploy")
    ray.get(ray.put(None))  # the cluster still answers


def test_autoscaling_up_and_down_under_load_without_failures(cluster):
    """Serve's autoscaling_config, as Ray Serve LLM users pass it: 1 -> 2 replicas under
    load, back to 1 when idle, and no request fails on the way."""
    import threading

    from ray import serve

    from radixserve.cluster.app import ClusterConfig, build_application
    from radixserve.cluster.serve_cli import kill_metadata_actor
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 1}
    serve.run(build_application(ClusterConfig(model="tiny-llama", deployment_config={"autoscaling_config": scaling},
                                              engine={"cache_dir": cluster.cache_dir, "max_model_len": 512,
                                                      "num_gpu_blocks": 64, "engine_worker_queue_port": 0,
                                                      "cache_queue_port": 0})),
              name="autoscale", route_prefix="/autoscale")

    def replicas() -> int:
        return serve.status().applications["autoscale"].deployments["LLMServer"].replica_states.get("RUNNING", 0)

    codes: list[int] = []
    stop = threading.Event()

    def load(i: int):
        with client(cluster, cluster.url + "/autoscale") as c:
            while not stop.is_set() and len(codes) < 600:
                codes.append(c.post("/v1/completions", json={"model": "tiny-llama", "prompt": f"scale {i} " * 20,
                                                             "max_tokens": 16, "ignore_eos": True}).status_code)

    workers = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    assert replicas() == 1
    for w in workers:
        w.start()
    try:
        wait_for(lambda: replicas() == 2, timeout=90, every=0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    wait_for(lambda: replicas() == 1, timeout=90, every=0.5)
    assert codes and all(code == 200 for code in codes), sorted(set(codes))
    serve.delete("autoscale")
    kill_metadata_actor("autoscale")


def test_a_spilled_request_pulls_its_prefix_from_the_holder(cluster):
    """Peer KV over Ray: a burst on one replica's cached prefix spills to the other with a
    hint, and that replica fetches the blocks (a remote hit) instead of recomputing them."""
    doc = "A long contract that one replica has read and the other has not, clause by clause. " * 8
    c = client(cluster)
    # both replicas report to the router (a replica that never did is not a candidate)
    wait_for(lambda: c.get("/metrics", headers=AUTH).text.count("radixserve:num_requests_running{") >= 2)
    home = complete(c, doc + "Summary?", max_tokens=1).headers["x-radixserve-replica"]
    time.sleep(0.5)  # published and pulled by the router

    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as ac:
            async def one(i):
                r = await ac.post("/v1/completions", headers=AUTH, json={
                    "model": "tiny-llama", "prompt": doc + f"Clause {i}?", "max_tokens": 100, "ignore_eos": True})
                return r.headers["x-radixserve-replica"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            return await asyncio.gather(*(one(i) for i in range(8)))
    spilled = [cached for replica, cached in asyncio.run(go()) if replica != home]
    assert spilled and max(spilled) >= 16 * 8  # a hit on a replica that never computed the doc
    other = next(r for r in ray_replicas(c) if r != home)

    def remote_hits() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in c.get("/metrics", headers=AUTH).text.splitlines()
                   if line.startswith("radixserve:prefix_cache_remote_hits_tokens") and f'replica="{other}"' in line)
    wait_for(lambda: remote_hits() >= 16 * 8)
    # a pull naming a replica that is gone fails at once (the puller recomputes), not at its timeout
    from radixserve.cluster.replica_wire import ExportRequest, encode_export_request
    t = time.monotonic()
    try:
        cluster.handle.export_kv.remote("no-such-replica", encode_export_request(ExportRequest("x", [1]))).result(
            timeout_s=30)
        raise AssertionError("an export from a missing replica succeeded")
    except Exception as exc:
        assert "no-such-replica" in str(exc), exc
    assert time.monotonic() - t < 5


def ray_replicas(c: httpx.Client) -> set[str]:
    return {line.split('replica="')[1].split('"')[0] for line in c.get("/metrics", headers=AUTH).text.splitlines()
            if line.startswith("radixserve:num_requests_running{")}
