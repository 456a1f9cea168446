"""Router policies at scale, simulated: no Ray, no model, seconds per run.

N simulated replicas, each with

- a block cache that evicts like the engine's: prompt blocks form chains
  (a radix tree of blocks), freed blocks are LRU-ordered with a chain's deeper
  blocks older than the blocks they extend (the engine frees a sequence tail
  first), so eviction takes the least recently used *leaf*; blocks of running
  requests are pinned, and a request is admitted only when its blocks fit;
- a service-time model of the engine's continuous batching with chunked
  prefill: each step carries every decoding request's next token plus up to
  ``step_tokens`` of prompt chunks, and lasts
  ``step_base_s + prefill_token_s * prefill tokens + decode_seq_s * decoding requests``;
  a request's first token comes at the end of the step that finishes its prompt.

The real ``RoutingPolicy`` (cluster/routing_policy.py) decides, with its real
``Accounting``; it sees each replica's cache and load as the metadata actor
would. With ``publish_interval_s`` 0 that view is exact (the load taken at the
end of each engine step); otherwise it lags like the live cluster's: a replica
publishes its block events and load every ``publish_interval_s`` (each replica
at its own phase) and the router's copy is ``sync_lag_s`` behind that, so
blocks stored since are unseen and blocks evicted since are still believed
cached. pow2 is Ray Serve's default: two random replicas, the
one with fewer requests queued or running.

Traces: the Mooncake synthetic trace (../shared/traces) replayed with its real
timestamps sped up (``rate_per_replica`` keeps each replica's arrival rate
fixed as the cluster grows), each 512-token hash block one engine block, after
``system_blocks`` blocks of a system prompt every request shares (as the
trace's chat requests carry one when replayed over the chat API); and generated
workloads (benchmarks/workloads.py shapes, hashed like the engine does).

Reported per policy: cached-token rate (hit tokens / prompt tokens) and its
ratio to the one-cache oracle (a single LRU cache with all replicas' blocks,
fed the requests in arrival order), max/mean requests per replica, TTFT
p50/p99 under the service model.

    python -m radixserve.benchmarks.router_sim                        # whole trace, 2-32 replicas
    python -m radixserve.benchmarks.router_sim --workloads shared_prefix,multi_turn,rag,hot_burst --replicas 2,8,32
    python -m radixserve.benchmarks.router_sim --replicas 2 --concurrency 1,4,16 --max-output 1 --max-blocks 127
        # the live replay's shape (bench_router --trace): closed loop, prefill only, 2048-token context
    python -m radixserve.benchmarks.router_sim --router queue_weight=1.0 --no-write   # try a RouterConfig knob
    python -m radixserve.benchmarks.router_sim --replicas 4,8 --blocks-per-replica 256 --max-blocks 64 \
        --policies prefix_affinity+nopull,prefix_affinity,round_robin+nopull,round_robin   # peer KV pulls vs none

How the RouterConfig defaults were tuned (not on the figures reported): each
candidate ran on the trace's two halves separately at 2.5 and 3.5 requests/s
per replica, 8 and 32 replicas, on the four generated workloads at 8 replicas,
and on the closed-loop 2-replica shape at 4 and 16 clients; a default moved
only where it helped the mean over those without hurting hot_burst (the
adversarial one). The reported run is the whole trace at 2 requests/s.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from radixserve.benchmarks.common import command_line, median, percentile, write_result
from radixserve.cluster.routing_policy import LoadReport, RouterConfig, RoutingPolicy

# shared/ lies beside the repository (the repo root is this file's grandparent)
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_synthetic.jsonl"
SIM_POLICIES = ("prefix_affinity", "pow2", "round_robin", "consistent_hash")
_SYSTEM_HASH = 1 << 62  # the shared system prompt's blocks (trace hash ids are small ints)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """The simulated cluster. Service times are per engine step (tokens of 16)."""

    replicas: int = 8
    blocks_per_replica: int = 512  # device KV blocks per replica (the live replay's --num-gpu-blocks)
    block_size: int = 16
    step_tokens: int = 512         # prompt tokens per step (max_num_batched_tokens)
    max_running: int = 64          # requests decoding at once (max_num_seqs)
    step_base_s: float = 0.004     # fixed cost of one step
    prefill_token_s: float = 0.0001  # per prompt token computed
    decode_seq_s: float = 0.0002   # per decoding request in the step
    rate_per_replica: float = 2.0  # trace replay: requests/s per replica (0: real time)
    concurrency: int = 0           # > 0: closed loop, this many clients in request order (the live replay)
    system_blocks: int = 1         # trace replay: shared system-prompt blocks before each prompt
    max_blocks: int = 128          # prompt cap in blocks (the model's context)
    max_output: int = 256          # output cap in tokens
    # the live cluster's view lag: replicas publish every 0.1 s (LLMServer.publish_interval_s); with
    # the router's pull the view measured 0.11 s old on average at decisions (bench_router --trace, 1
    # client; 0.21 s at 16 clients on 2 loaded cores). 0: the router sees exactly
    publish_interval_s: float = 0.1  # replica -> metadata publish period
    sync_lag_s: float = 0.06         # the router's copy trails the published state by this
    # peer KV: the router hints the holder and the chosen replica pulls what the holder still has
    # at admission; a pulled token is charged this share of a computed one on the puller (the
    # live pull waits off the engine's step, so this is conservative; bench_peer_kv: ~0.13)
    peer_kv: bool = True  # as the cluster's default (cache.peer_kv); "<policy>+nopull" turns it off
    pull_cost: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("replicas", "blocks_per_replica", "block_size", "step_tokens", "max_running", "max_blocks",
                  "max_output"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1")
        if self.publish_interval_s < 0 or self.sync_lag_s < 0:
            raise ValueError("publish_interval_s and sync_lag_s must be >= 0")
        if self.max_blocks > self.blocks_per_replica:
            raise ValueError("max_blocks must fit in one replica's pool")


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    block_hashes: tuple[int, ...]  # full blocks only: what the engine caches
    prompt_len: int
    output_len: int
    tail: tuple[int, ...] = ()  # the prompt's tokens past its last full block


# -- the engine's cache ---------------------------------------------------------------------

class BlockCache:
    """Cached blocks in LRU order, leaf first (see the module doc); pinned blocks stay."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.pins: Counter[int] = Counter()
        self.private = 0  # pinned blocks holding no reusable prefix (partial / generated)
        self.stored_at: dict[int, float] = {}   # block -> when it was last stored (for lagged views)
        self.evicted_at: dict[int, float] = {}  # block -> when it was last evicted

    def seen_hit(self, hashes: tuple[int, ...], limit: int, seen_at: float) -> int:
        """The hit as a view taken at ``seen_at`` shows it: blocks stored later unseen,
        blocks evicted later still there."""
        n = 0
        for h in hashes[:limit]:
            stored = self.stored_at.get(h, math.inf)
            if h in self.lru:
                ok = stored <= seen_at
            else:
                ok = stored <= seen_at < self.evicted_at.get(h, -math.inf)
            if not ok:
                break
            n += 1
        return n

    def hit(self, hashes: tuple[int, ...], limit: int) -> int:
        n = 0
        for h in hashes[:limit]:
            if h not in self.lru:
                break
            n += 1
        return n

    @property
    def empty(self) -> int:
        return self.capacity - len(self.lru) - self.private

    @property
    def free(self) -> int:
        """What an allocation can take: empty plus evictable cached blocks (the engine's num_free)."""
        return self.empty + len(self.lru) - len(self.pins)

    def admit(self, hashes: tuple[int, ...], hit: int, private: int, pin: bool = True,
              now: float = 0.0) -> bool:
        need = len(hashes) - hit + private
        if need > self.free:
            return False
        it = iter(list(self.lru))
        while self.empty < need:  # evict the least recently used unpinned block
            h = next(it)
            if h not in self.pins:
                del self.lru[h]
                self.evicted_at[h] = now
        for h in reversed(hashes):  # deepest first: parents end up more recent
            if h not in self.lru:
                self.stored_at[h] = now
            self.lru[h] = None
            self.lru.move_to_end(h)
        if pin:
            self.pins.update(hashes)
            self.private += private
        return True

    def release(self, hashes: tuple[int, ...], private: int) -> None:
        self.pins.subtract(hashes)
        for h in hashes:
            if self.pins[h] <= 0:
                del self.pins[h]
        self.private -= private
        for h in reversed(hashes):  # freed tail first, as the engine frees a sequence
            if h in self.lru:
                self.lru.move_to_end(h)


# -- one replica ------------------------------------------------------------------------------

@dataclass
class Seq:
    rid: int
    req: SimRequest
    arrival: float
    hit: int = 0
    todo: int = 0          # prompt tokens still to compute
    decoded: int = 0
    private: int = 0
    ttft: float = math.nan
    hint: tuple[SimReplica, int] | None = None  # (holder, its blocks) from the router
    remote: int = 0        # blocks pulled from the holder


class SimReplica:
    def __init__(self, name: str, cfg: SimConfig):
        self.name, self.cfg = name, cfg
        self.cache = BlockCache(cfg.blocks_per_replica)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.step: tuple[float, float, int, list[tuple[Seq, int]]] | None = None  # start, dt, steps, chunks
        self.version = 0  # invalidates a scheduled step end
        self.report = LoadReport(0, 0.0, cfg.blocks_per_replica, cfg.blocks_per_replica)
        self.reports: deque[LoadReport] = deque([self.report])  # oldest first, for lagged views
        self.phase = random.Random(name).random() * cfg.publish_interval_s  # replicas publish out of step
        self.requests = 0
        self.work = 0  # tokens computed: uncached prompt tokens and decoded tokens

    def seen_at(self, now: float) -> float:
        """When the state the router sees now was published (``now`` without lag)."""
        c = self.cfg
        if not c.publish_interval_s:
            return now
        t = now - c.sync_lag_s - self.phase
        return math.floor(t / c.publish_interval_s) * c.publish_interval_s + self.phase

    def load(self, now: float) -> LoadReport:
        if not self.cfg.publish_interval_s:
            if self.step is None:  # idle: a report now would say the same
                return LoadReport(0, now, self.cache.free, self.cfg.blocks_per_replica)
            return self.report
        seen = self.seen_at(now)
        while len(self.reports) > 1 and self.reports[1].at <= seen:
            self.reports.popleft()
        return self.reports[0]

    def hit_seen(self, hashes: tuple[int, ...], limit: int, now: float) -> int:
        if not self.cfg.publish_interval_s:
            return self.cache.hit(hashes, limit)
        return self.cache.seen_hit(hashes, limit, self.seen_at(now))

    def pending_tokens(self) -> int:
        return sum(s.todo for s in self.running) + sum(s.req.prompt_len for s in self.waiting)

    def _admit(self, now: float) -> None:
        bs = self.cfg.block_size
        while self.waiting and len(self.running) < self.cfg.max_running:
            s = self.waiting[0]
            r = s.req
            limit = (r.prompt_len - 1) // bs
            s.hit = self.cache.hit(r.block_hashes, limit)
            s.private = -(-(r.prompt_len + r.output_len) // bs) - len(r.block_hashes)
            if not self.cache.admit(r.block_hashes, s.hit, s.private, now=now):
                return  # waits for blocks, like the engine
            if s.hint is not None:  # the export holds what the holder still has now
                s.remote = max(0, s.hint[0].cache.hit(r.block_hashes, min(limit, s.hint[1])) - s.hit)
            s.todo = r.prompt_len - (s.hit + s.remote) * bs + math.ceil(self.cfg.pull_cost * s.remote * bs)
            self.work += s.todo + r.output_len
            self.running.append(self.waiting.popleft())

    def plan(self, now: float) -> tuple[float, float] | None:
        """Start the next step (or run of identical decode steps): (end time, dt)."""
        self._admit(now)
        if not self.running:
            if self.step is not None:  # going idle: what the next publish says
                self._record(LoadReport(0, now, self.cache.free, self.cfg.blocks_per_replica))
            self.step = None
            return None
        c = self.cfg
        decoding = [s for s in self.running if s.todo == 0]
        budget, chunks = c.step_tokens, []
        for s in self.running:
            if s.todo and budget > 0:
                n = min(s.todo, budget)
                chunks.append((s, n))
                budget -= n
        dt = c.step_base_s + c.prefill_token_s * sum(n for _, n in chunks) + c.decode_seq_s * len(decoding)
        k = 1
        if not chunks and not self.waiting:  # only decoding: jump to the next finish (an arrival cuts it)
            k = max(1, min(s.req.output_len - s.decoded for s in decoding))
        self.step = (now, dt, k, chunks)
        self.version += 1
        return now + dt * k, dt

    def cut(self, now: float) -> float | None:
        """A request arrived during a run of decode steps: end the run after the current step."""
        if self.step is None:
            return None
        start, dt, k, chunks = self.step
        done = min(k, max(1, math.ceil((now - start) / dt - 1e-9)))
        if done == k:
            return None
        self.step = (start, dt, done, chunks)
        self.version += 1
        return start + dt * done

    def finish_step(self, now: float) -> list[Seq]:
        assert self.step is not None
        _, _, k, chunks = self.step
        chunked = {id(s) for s, _ in chunks}
        finished = []
        for s in self.running:
            if id(s) not in chunked and s.todo == 0:  # decoding since before this step
                s.decoded += k
        for s, n in chunks:
            s.todo -= n
            if s.todo == 0:
                s.ttft = now - s.arrival
                s.decoded = 1  # the step that ends the prompt samples the first token
        for s in self.running:
            if s.todo == 0 and s.decoded >= s.req.output_len:
                finished.append(s)
        for s in finished:
            self.running.remove(s)
            self.cache.release(s.req.block_hashes, s.private)
        self._record(LoadReport(self.pending_tokens(), now, self.cache.free, self.cfg.blocks_per_replica))
        return finished

    def _record(self, report: LoadReport) -> None:
        self.report = report
        if self.cfg.publish_interval_s:
            self.reports.append(report)


# -- the cluster ---------------------------------------------------------------------------------

@dataclass
class SimResult:
    policy: str
    hit_rate: float
    oracle_hit_rate: float
    hit_over_oracle: float
    load_max_over_mean: float  # requests per replica
    work_max_over_mean: float  # tokens computed per replica (uncached prompt + decoded)
    ttft_p50_s: float
    ttft_p99_s: float
    requests: int
    per_replica: list[int] = field(default_factory=list)
    remote_hit_rate: float = 0.0  # of the hit rate, tokens pulled from a peer (peer_kv)


def oracle_hit_rate(reqs: list[SimRequest], cfg: SimConfig) -> float:
    """One LRU cache with every replica's blocks, requests in arrival order."""
    cache = BlockCache(cfg.blocks_per_replica * cfg.replicas)
    hit = total = 0
    for r in reqs:
        n = cache.hit(r.block_hashes, (r.prompt_len - 1) // cfg.block_size)
        hit += n * cfg.block_size
        total += r.prompt_len
        cache.admit(r.block_hashes, n, 0, pin=False)
    return hit / max(1, total)


def simulate(reqs: list[SimRequest], cfg: SimConfig, policy: str, router: dict[str, Any] | None = None,
             oracle: float | None = None) -> SimResult:
    """One policy over the requests; "<policy>+pull" / "<policy>+nopull" with peer KV pulls on / off."""
    for suffix, on in (("+pull", True), ("+nopull", False)):
        if policy.endswith(suffix):
            res = simulate(reqs, replace(cfg, peer_kv=on), policy.removesuffix(suffix), router, oracle)
            return replace(res, policy=policy)
    rcfg = RouterConfig(policy=policy if policy != "pow2" else "prefix_affinity", block_size=cfg.block_size,
                        step_tokens=cfg.step_tokens, **{"peer_kv": cfg.peer_kv, **(router or {})})
    pol = RoutingPolicy(rcfg)
    acct = pol.accounting
    rng = random.Random(cfg.seed)
    reps = [SimReplica(f"replica-{i:02d}", cfg) for i in range(cfg.replicas)]
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind 0=arrival 1=step end, index/version)
    if cfg.concurrency:  # closed loop: each client sends the next request when its last one ends
        events += [(0.0, i, 0, i) for i in range(min(cfg.concurrency, len(reqs)))]
    else:
        events += [(r.arrival_s, i, 0, i) for i, r in enumerate(reqs)]
    heapq.heapify(events)
    sent = len(events)
    order = len(reqs)
    ends: dict[int, tuple[int, int]] = {}  # event order -> (replica, version)
    seqs: list[Seq] = []
    hit_tokens = prompt_tokens = 0

    def schedule(ri: int, now: float) -> None:
        nonlocal order
        got = reps[ri].plan(now)
        if got is not None:
            order += 1
            ends[order] = (ri, reps[ri].version)
            heapq.heappush(events, (got[0], order, 1, order))

    while events:
        now, _, kind, idx = heapq.heappop(events)
        if kind == 0:
            r = reqs[idx]
            ri, hint = _route(pol, rng, policy, reps, r, idx, now)
            rep = reps[ri]
            s = Seq(idx, r, now, hint=hint if cfg.peer_kv else None)
            seqs.append(s)
            rep.waiting.append(s)
            rep.requests += 1
            acct.routed(str(idx), rep.name, now)
            if rep.step is None:
                schedule(ri, now)
            else:
                end = rep.cut(now)
                if end is not None:
                    order += 1
                    ends[order] = (ri, rep.version)
                    heapq.heappush(events, (end, order, 1, order))
            continue
        ri, version = ends.pop(idx)
        rep = reps[ri]
        if version != rep.version:
            continue  # superseded by a cut
        for s in rep.finish_step(now):
            acct.completed(str(s.rid), rep.name)
            if cfg.concurrency and sent < len(reqs):
                heapq.heappush(events, (now, sent, 0, sent))
                sent += 1
        schedule(ri, now)
    remote_tokens = 0
    for s in seqs:
        hit_tokens += (s.hit + s.remote) * cfg.block_size
        remote_tokens += s.remote * cfg.block_size
        prompt_tokens += s.req.prompt_len
    counts = [r.requests for r in reps]
    ttft = [s.ttft for s in seqs]
    hit = hit_tokens / max(1, prompt_tokens)
    orc = oracle_hit_rate(reqs, cfg) if oracle is None else oracle
    work = [r.work for r in reps]
    return SimResult(policy, hit, orc, hit / orc if orc else 0.0, max(counts) / (sum(counts) / len(counts)),
                     max(work) / (sum(work) / len(work)), median(ttft), percentile(ttft, 0.99), len(seqs), counts,
                     remote_tokens / max(1, prompt_tokens))


def _route(pol: RoutingPolicy, rng: random.Random, policy: str, reps: list[SimReplica], r: SimRequest,
           idx: int, now: float) -> tuple[int, tuple[SimReplica, int] | None]:
    """The chosen replica and the router's peer hint (holder, blocks) for it."""
    if policy == "pow2":  # Ray Serve's default: the shorter queue of two random replicas
        a, b = rng.sample(range(len(reps)), 2) if len(reps) > 1 else (0, 0)
        qa, qb = (len(reps[i].waiting) + len(reps[i].running) for i in (a, b))
        return (a if qa <= qb else b), None
    bs = pol.config.block_size
    limit = (r.prompt_len - 1) // bs
    hashes = list(r.block_hashes)
    states = [pol.state(rep.name, (rep.hit_seen(r.block_hashes, limit, now), 0), hashes, rep.load(now), now,
                        cached_gpu_blocks=len(rep.cache.lru)) for rep in reps]
    prompt = [0] * (len(hashes) * bs) + list(r.tail)  # the policy reads only the tail's tokens
    chosen = pol.route(str(idx), states, hashes, prompt, now)[0].replica
    hint = pol.peer_hint(states, chosen)
    holder = (reps[int(hint[0].rsplit("-", 1)[1])], hint[1]) if hint else None
    return int(chosen.rsplit("-", 1)[1]), holder


# -- workloads ------------------------------------------------------------------------------------

def load_trace(cfg: SimConfig, path: Path = TRACE, limit: int | None = None) -> list[SimRequest]:
    """The Mooncake trace: each 512-token hash block one engine block (its last one partial
    in proportion), after the shared system prompt; timestamps sped up to ``rate_per_replica``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    span = max(1.0, rows[-1]["timestamp"] / 1000)
    speed = (cfg.rate_per_replica * cfg.replicas * span / len(rows)) if cfg.rate_per_replica else 1.0
    bs, out = cfg.block_size, []
    for row in rows:
        ids = row["hash_ids"]
        tail = row["input_length"] - 512 * (len(ids) - 1)  # tokens of the last hash block
        last = max(1, min(bs, round(bs * tail / 512)))
        blocks = [_SYSTEM_HASH + i for i in range(cfg.system_blocks)] + list(ids)
        blocks = blocks[:cfg.max_blocks]
        full = blocks if (last == bs or len(blocks) < cfg.system_blocks + len(ids)) else blocks[:-1]
        tail = () if len(full) == len(blocks) else tuple(random.Random(blocks[-1]).choices(range(32000), k=last))
        out.append(SimRequest(row["timestamp"] / 1000 / speed, tuple(full), len(full) * bs + len(tail),
                              max(1, min(cfg.max_output, row["output_length"])), tail))
    return out


def _hashed(specs: list[Any], arrivals: list[float], cfg: SimConfig) -> list[SimRequest]:
    from radixserve.engine.cache.hashing import prompt_block_hashes
    out = []
    for spec, at in zip(specs, arrivals):
        ids = list(spec.prompt_token_ids)[:cfg.max_blocks * cfg.block_size]
        hashes = prompt_block_hashes(ids, cfg.block_size)[:len(ids) // cfg.block_size]
        out.append(SimRequest(at, tuple(hashes), len(ids), min(cfg.max_output, spec.output_len),
                              tuple(ids[len(hashes) * cfg.block_size:])))
    order = sorted(range(len(out)), key=lambda i: out[i].arrival_s)
    return [out[i] for i in order]


def generated(name: str, cfg: SimConfig) -> list[SimRequest]:
    """The project's workload shapes, scaled to the cluster, Poisson arrivals at
    ``rate_per_replica`` (or 2/s per replica). ``hot_burst`` is the adversarial one: 90% of
    requests carry one long hot prefix, arriving in bursts of 32 at once."""
    from radixserve.benchmarks import workloads as w
    tokens = w.TokenSpace(10, 32000)
    n = cfg.replicas
    rate = (cfg.rate_per_replica or 2.0) * n
    rng = random.Random(f"{name}/{cfg.seed}")
    if name == "shared_prefix":
        specs = w.shared_prefix(w.SharedPrefixConfig(groups=8 * n, questions=16, prefix_len=1024, suffix_len=64,
                                                     output_len=64, seed=cfg.seed), tokens)
    elif name == "multi_turn":
        specs = w.multi_turn(w.MultiTurnConfig(sessions=24 * n, turns=6, system_len=256, user_len=64,
                                               output_len=96, think_s=2.0, seed=cfg.seed), tokens)
    elif name == "rag":
        specs = w.rag(w.RAGConfig(documents=24 * n, doc_len=512, questions=120 * n, question_len=32,
                                  output_len=32, docs_per_question=2, zipf_s=1.0, seed=cfg.seed), tokens)
    elif name == "hot_burst":
        hot = w.Segment("system", tokens.draw(rng, 1536))
        specs = []
        for i in range(100 * n):
            own = w.Segment("user", tokens.draw(rng, 64 if rng.random() < 0.9 else 1024))
            segs = (hot, own) if rng.random() < 0.9 else (own,)
            specs.append(w.RequestSpec(f"hb{i}", segs, 48, f"hb{i}"))
    else:
        raise ValueError(f"unknown workload {name!r}")
    if name == "hot_burst":  # bursts of 32 at the mean rate
        arrivals = [(i // 32) * 32 / rate for i in range(len(specs))]
    elif name == "multi_turn":  # sessions start Poisson; turn k after k think-and-answer pauses
        starts = w.poisson_arrivals(len(specs), rate / 6, cfg.seed)
        arrivals, t_session = [], 0.0
        for spec in specs:
            if spec.turn == 0:
                t_session = starts[len(arrivals) // 6]
                clock = t_session
            clock += spec.think_s + (1.0 if spec.turn else 0.0)
            arrivals.append(clock)
    else:
        arrivals = w.poisson_arrivals(len(specs), rate, cfg.seed)
    return _hashed(specs, arrivals, cfg)


WORKLOADS = ("trace", "shared_prefix", "multi_turn", "rag", "hot_burst")


def requests_for(workload: str, cfg: SimConfig, limit: int | None = None, trace: Path = TRACE) -> list[SimRequest]:
    return load_trace(cfg, trace, limit) if workload == "trace" else generated(workload, cfg)


# -- the command ---------------------------------------------------------------------------------

def run_grid(workloads: list[str], replicas: list[int], policies: list[str], base: SimConfig,
             router: dict[str, Any], limit: int | None = None, progress: bool = True,
             trace: Path = TRACE, concurrency: tuple[int, ...] = (0,)) -> dict:
    """workload (with "@c<N>" for closed-loop runs) -> replicas -> policy -> SimResult fields."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is not installed: plain loop
        tqdm = None
    jobs = [(wl, n, c) for wl in workloads for c in concurrency for n in replicas]
    bar = tqdm(total=len(jobs) * len(policies), desc="router_sim") if (tqdm and progress) else None
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for wl, n, c in jobs:
        cfg = SimConfig(**{**asdict(base), "replicas": n, "concurrency": c})
        reqs = requests_for(wl, cfg, limit, trace)
        orc = oracle_hit_rate(reqs, cfg)
        row = out.setdefault(f"{wl}@c{c}" if c else wl, {}).setdefault(str(n), {})
        for p in policies:
            t0 = time.perf_counter()
            res = simulate(reqs, cfg, p, router, orc)
            row[p] = {**asdict(res), "sim_s": round(time.perf_counter() - t0, 2)}
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{wl} n={n} {p}: {res.hit_over_oracle:.2f}x oracle, "
                                    f"max/mean {res.load_max_over_mean:.2f}")
    if bar:
        bar.close()
    return out


def summarize(grid: dict) -> dict[str, float]:
    s: dict[str, float] = {}
    for wl, by_n in grid.items():
        for n, by_p in by_n.items():
            ours = by_p.get("prefix_affinity", by_p.get("prefix_affinity+pull"))
            nopull = by_p.get("prefix_affinity+nopull")
            if ours and nopull:  # peer KV pulls (the default) against none
                s[f"{wl}_n{n}_nopull_hit_over_oracle"] = round(nopull["hit_over_oracle"], 3)
                s[f"{wl}_n{n}_pull_hit_over_nopull"] = round(ours["hit_rate"] / max(1e-9, nopull["hit_rate"]), 3)
                s[f"{wl}_n{n}_nopull_load_max_over_mean"] = round(nopull["load_max_over_mean"], 3)
                s[f"{wl}_n{n}_pull_ttft_p99_over_nopull"] = round(
                    ours["ttft_p99_s"] / max(1e-9, nopull["ttft_p99_s"]), 3)
            if not ours:
                continue
            s[f"{wl}_n{n}_hit_over_oracle"] = round(ours["hit_over_oracle"], 3)
            s[f"{wl}_n{n}_load_max_over_mean"] = round(ours["load_max_over_mean"], 3)
            for other in ("pow2", "consistent_hash"):
                if other in by_p:
                    s[f"{wl}_n{n}_hit_over_{other}"] = round(ours["hit_rate"] / max(1e-9, by_p[other]["hit_rate"]), 3)
                    s[f"{wl}_n{n}_ttft_p99_over_{other}"] = round(
                        ours["ttft_p99_s"] / max(1e-9, by_p[other]["ttft_p99_s"]), 3)
    return s


def plot(path: Path, grid: dict) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    wls = list(grid)
    fig, axes = plt.subplots(len(wls), 4, figsize=(17, 3.2 * len(wls)), squeeze=False)
    for row, wl in zip(axes, wls):
        ns = sorted(grid[wl], key=int)
        pols = list(grid[wl][ns[0]])
        for ax, metric, label in zip(row, ("hit_over_oracle", "load_max_over_mean", "ttft_p50_s", "ttft_p99_s"),
                                     ("cached tokens / oracle", "max/mean requests (log)", "TTFT p50 (s, log)",
                                      "TTFT p99 (s, log)")):
            for p in pols:
                ax.plot([int(n) for n in ns], [grid[wl][n][p][metric] for n in ns], marker="o", label=p)
            ax.set_xscale("log", base=2)
            if metric != "hit_over_oracle":
                ax.set_yscale("log")
            ax.set_title(f"{wl}: {label}", fontsize=9)
            ax.set_xlabel("replicas")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _router_overrides(items: list[str]) -> dict[str, Any]:
    types = {f.name: f.type for f in fields(RouterConfig)}
    out: dict[str, Any] = {}
    for item in items:
        k, _, v = item.partition("=")
        if k not in types or k in ("policy", "block_size", "step_tokens"):
            raise SystemExit(f"--router {item!r}: not a RouterConfig knob")
        out[k] = float(v) if "float" in str(types[k]) else int(v)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="trace", help=f"comma list of {', '.join(WORKLOADS)} or 'all'")
    p.add_argument("--replicas", default="2,4,8,16,32")
    p.add_argument("--policies", default=",".join(SIM_POLICIES))
    p.add_argument("--trace-file", type=Path, default=TRACE, help="Mooncake-format JSONL trace")
    p.add_argument("--limit", type=int, default=None, help="first N trace requests only")
    p.add_argument("--router", action="append", default=[], help="RouterConfig override, e.g. tie_tokens=32")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--concurrency", default="0", help="comma list; > 0: closed loop with that many clients")
    for f in fields(SimConfig):
        if f.name in ("replicas", "concurrency"):
            continue
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=None)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = p.parse_args(argv)
    base = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)
                        if f.name not in ("replicas", "concurrency") and getattr(args, f.name) is not None})
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    workloads = list(WORKLOADS) if args.workloads == "all" else args.workloads.split(",")
    grid = run_grid(workloads, [int(n) for n in args.replicas.split(",")], args.policies.split(","), base,
                    _router_overrides(args.router), args.limit, trace=args.trace_file,
                    concurrency=concurrency)
    summary = summarize(grid)
    for wl, by_n in grid.items():
        for n, by_p in by_n.items():
            for pol, r in by_p.items():
                print(f"{wl:16s} n={n:>2s} {pol:16s} hit {r['hit_rate']:.3f} ({r['hit_over_oracle']:.2f}x oracle "
                      f"{r['oracle_hit_rate']:.3f})  max/mean req {r['load_max_over_mean']:.2f} "
                      f"work {r['work_max_over_mean']:.2f}  "
                      f"ttft p50 {r['ttft_p50_s'] * 1e3:7.1f} ms p99 {r['ttft_p99_s'] * 1e3:8.1f} ms")
    if not args.no_write:
        suite = ("router-trace" if workloads == ["trace"] else "router-workloads") + \
            ("-closed" if any(concurrency) else "") + \
            ("-pull" if any(p.endswith("pull") for p in args.policies.split(",")) else "")
        path = write_result(suite, {**asdict(base), "router": asdict(RouterConfig(**_router_overrides(args.router))),
                                    "workloads": workloads}, grid, summary,
                            Path(args.out_dir) if args.out_dir else None,
                            command=command_line("radixserve.benchmarks.router_sim", argv), device="sim")
        plot(path.with_suffix(".png"), grid)
        print(path)
    return summary


if __name__ == "__main__":
    main()
