"""Cluster suite: the workloads over HTTP against running radixserve endpoints, side by side.

Compares endpoints that serve the same model: typically one cluster per
router policy (prefix affinity vs round robin vs least loaded), or a single
server vs a cluster. It never starts a cluster or Ray itself; give it base
URLs of OpenAI-compatible servers (``/v1/completions``, ``/v1/chat/completions``
with SSE streaming):

    python -m radixserve.benchmarks.bench_cluster \\
        --endpoint prefix_affinity=http://127.0.0.1:8000 --endpoint round_robin=http://127.0.0.1:8001 \\
        --model small-llama --api chat --users 16 --device 2xh100

or, from Python, with a callback that deploys one cluster per policy and
yields its base URL (it is entered once per policy and round)::

    run_suite(cfg, decode, setup=lambda policy: my_deployment(policy))

Prompts are the token-id workloads of ``benchmarks/workloads.py`` decoded to
text with ``--model``'s tokenizer (the served model's, so lengths in tokens
stay close to the spec's); multi-turn sessions send the answers actually
returned. Per request: TTFT, token times from the SSE chunks, cached tokens
from ``usage.prompt_tokens_details.cached_tokens`` and the replica from the
``x-radixserve-replica`` header. Each round draws the workloads from a fresh
seed (seed + round), so a round never hits blocks cached by an earlier one;
within a round every endpoint gets the same requests. ``rag.working_set_over_pool``
does not apply: the servers' pools are whatever they were deployed with.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from radixserve.benchmarks import drivers
from radixserve.benchmarks.bench_workloads import QUICK as ENGINE_QUICK
from radixserve.benchmarks.bench_workloads import WorkloadsBenchConfig
from radixserve.benchmarks.common import command_line, load_average, print_summary, workload_panels_plot, write_result
from radixserve.benchmarks.metrics import Run, Slo, aggregate, headline, round_ratios, summarize
from radixserve.benchmarks.workloads import (
    WORKLOADS,
    MultiTurnConfig,
    NoSharingConfig,
    RAGConfig,
    RequestSpec,
    SharedPrefixConfig,
    TokenSpace,
    apply_overrides,
    shape,
    with_poisson_arrivals,
)

Deploy = Callable[[str], AbstractContextManager[str]]  # policy name -> context yielding a base URL


@dataclass(frozen=True)
class Endpoint:
    name: str
    base_url: str = ""  # empty when a Deploy callback provides it

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        name, sep, url = text.partition("=")
        return cls(name, url) if sep and not name.startswith("http") else cls("default", text)


@dataclass(frozen=True)
class ClusterBenchConfig:
    endpoints: tuple[Endpoint, ...]
    model: str = "small-llama"  # tokenizer for the prompt text
    served_model: str | None = None  # the "model" field of requests (default: model)
    api: str = "completions"
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    reference: str | None = None  # ratios are reference vs each other endpoint (default: the first)
    load: drivers.Load = drivers.Load("closed", users=8)
    repeats: int = 1
    slo: Slo = Slo(ttft_s=2.0)
    seed: int = 0
    timeout_s: float = 600.0
    shared_prefix: SharedPrefixConfig = SharedPrefixConfig()
    multi_turn: MultiTurnConfig = MultiTurnConfig()
    rag: RAGConfig = RAGConfig()
    no_sharing: NoSharingConfig = NoSharingConfig()

    def __post_init__(self) -> None:
        names = [e.name for e in self.endpoints]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need at least one endpoint, with distinct names; got {names}")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be completions or chat, got {self.api!r}")
        if unknown := [w for w in self.workloads if w not in WORKLOADS]:
            raise ValueError(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not an endpoint name {names}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def reference_name(self) -> str:
        return self.reference or self.endpoints[0].name


def make_requests(cfg: ClusterBenchConfig, name: str, tokens: TokenSpace, rnd: int) -> list[RequestSpec]:
    wcfg = getattr(cfg, name)
    requests = WORKLOADS[name].generate(replace(wcfg, seed=wcfg.seed + rnd), tokens)
    if cfg.load.mode == "open":
        requests = with_poisson_arrivals(requests, cfg.load.rate, cfg.seed + rnd)
    return requests


@contextlib.contextmanager
def _static(url: str) -> Iterator[str]:
    yield url


def plan(cfg: ClusterBenchConfig) -> list[tuple[int, Endpoint]]:
    """(round, endpoint), the endpoint order rotated every round."""
    out = []
    for r in range(cfg.repeats):
        k = r % len(cfg.endpoints)
        out += [(r, e) for e in cfg.endpoints[k:] + cfg.endpoints[:k]]
    return out


def run_suite(cfg: ClusterBenchConfig, decode: Callable[[list[int]], str], tokens: TokenSpace,
              setup: Deploy | None = None, api_key: str | None = None) -> tuple[list[Run], dict]:
    requests = {(r, w): make_requests(cfg, w, tokens, r) for r in range(cfg.repeats) for w in cfg.workloads}
    runs = []
    steps = plan(cfg)
    with tqdm(total=len(steps) * len(cfg.workloads), desc="bench_cluster") as bar:
        for rnd, ep in steps:
            with (setup(ep.name) if setup else _static(ep.base_url)) as url:
                for w in cfg.workloads:
                    runs.append(run_one(cfg, decode, ep.name, url, w, requests[rnd, w], rnd, api_key))
                    s = runs[-1].summary
                    tqdm.write(f"round {rnd} {w:13s} {ep.name:17s} ttft p50 {s.ttft_p50:7.3f}s  "
                               f"{s.output_tok_per_s:7.1f} out tok/s  hit {s.hit_rate_client:.2f}  "
                               f"failed {s.failed}  replicas {s.replicas}")
                    bar.update(1)
    shapes = {w: {"description": WORKLOADS[w].description, "config": asdict(getattr(cfg, w)),
                  "shape": shape(requests[0, w])} for w in cfg.workloads}
    return runs, shapes


def run_one(cfg: ClusterBenchConfig, decode: Callable[[list[int]], str], name: str, url: str, workload: str,
            requests: Sequence[RequestSpec], rnd: int, api_key: str | None) -> Run:
    target = drivers.HttpTarget(url, cfg.served_model or cfg.model, decode, cfg.api, name, api_key, cfg.timeout_s)
    load0 = load_average()
    records = drivers.run(target, requests, cfg.load, desc=f"{workload}/{name}")
    return Run(rnd, workload, name, summarize(records, cfg.slo), records, settings={"base_url": url},
               load_average_before=load0, load_average_after=load_average())


def load_tokenizer(model: str, cache_dir: str | None):
    from radixserve.engine.model.default_models import resolve_model
    from radixserve.engine.tokenizer import Tokenizer
    return Tokenizer(resolve_model(model, cache_dir))


def plot(json_path: Path) -> Path:
    doc = json.loads(Path(json_path).read_text())
    cfg = doc["config"]
    where = cfg.get("device") or doc["env"]["device"]
    return workload_panels_plot(json_path, f"radixserve endpoints over HTTP ({cfg['api']} API, {cfg['model']}) "
                                           f"on {where}, {drivers.Load(**cfg['load']).label()}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_cluster", description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", action="append", metavar="NAME=URL",
                   help="an OpenAI-compatible base URL to measure (repeatable; the first is the reference)")
    p.add_argument("--quick", action="store_true", help="smoke size, tiny-llama tokenizer (seconds)")
    p.add_argument("--model", help="tokenizer / model name (default small-llama; tiny-llama with --quick)")
    p.add_argument("--served-model", help="the request's model field, if it differs from --model")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", help="bearer token (never written to the result)")
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--reference", help="endpoint the ratios are taken against (default: the first)")
    p.add_argument("--mode", choices=("open", "closed"), default="closed")
    p.add_argument("--users", type=int, default=None, help="closed loop: concurrent users (default 8)")
    p.add_argument("--rate", type=float, default=1.0, help="open loop: sessions per second")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=None)
    p.add_argument("--set", action="append", default=[], metavar="WORKLOAD.FIELD=VALUE")
    p.add_argument("--device", help="label of the serving hardware for the result name (default: this machine's)")
    p.add_argument("--plot-only", type=Path, metavar="JSON")
    p.add_argument("--cache-dir", help="where embedded models (their tokenizers) are generated")
    p.add_argument("--out-dir")
    return p


def parse_config(args: argparse.Namespace) -> ClusterBenchConfig:
    if not args.endpoint:
        raise ValueError("give at least one --endpoint NAME=URL of a running server (this suite starts none)")
    base = ENGINE_QUICK if args.quick else WorkloadsBenchConfig()  # the engine suite's sizes
    users = args.users or (base.load.users if args.quick else 8)
    cfg = ClusterBenchConfig(
        endpoints=tuple(Endpoint.parse(e) for e in args.endpoint), model=args.model or base.model,
        served_model=args.served_model, api=args.api,
        workloads=tuple(args.workloads.split(",")) if args.workloads else tuple(WORKLOADS),
        reference=args.reference, load=drivers.Load(args.mode, users, args.rate), repeats=args.repeats,
        slo=Slo(args.ttft_slo, args.tpot_slo), shared_prefix=base.shared_prefix, multi_turn=base.multi_turn,
        rag=base.rag, no_sharing=base.no_sharing)
    return apply_overrides(cfg, args.set)


def main(argv: list[str] | None = None, setup: Deploy | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        print(plot(args.plot_only))
        return {}
    cfg = parse_config(args)
    tok = load_tokenizer(cfg.model, args.cache_dir)
    runs, shapes = run_suite(cfg, tok.decode, TokenSpace.from_tokenizer(tok), setup, args.api_key)
    agg, ratios = aggregate(runs), round_ratios(runs, cfg.reference_name)
    summary = headline(ratios, agg, cfg.reference_name)
    measurements = {"workloads": shapes, "aggregate": agg, "round_ratios": ratios,
                    "runs": [r.to_json() for r in runs]}
    config = {**asdict(cfg), "device": args.device}
    path = write_result("cluster-quick" if args.quick else "cluster", config, measurements, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_cluster", argv), device=args.device)
    plot(path)
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
