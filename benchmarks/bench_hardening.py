"""Hostile requests vs ordinary ones: how fast each is refused, and what it costs the others.

One in-process OpenAI server (uvicorn on loopback over one AsyncLLMEngine). Each case
sends one hostile request (a 20 MB body, a 5 MB prompt, 1000 prompts, a 5 MB /tokenize,
Infinity as temperature) while ``others`` ordinary short completions run beside it; a
baseline round sends the ordinary ones alone. Rounds alternate baseline / case, so the
ratio ``others_p90_over_baseline`` compares runs taken side by side. On main before the
hardening issue, the 20 MB body held the ingress for 41-59 s.

    python -m radixserve.benchmarks.bench_hardening [--quick]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import uvicorn

from radixserve.benchmarks.common import bar_plot, command_line, median, percentile, print_summary, write_result
from radixserve.cluster.backend import LocalBackend
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine import AsyncLLMEngine
from radixserve.engine.model.default_models import resolve_model


@dataclass(frozen=True)
class HardeningBenchConfig:
    model: str = "tiny-llama"
    max_model_len: int = 2048
    body_mb: float = 20.0
    prompt_mb: float = 5.0
    prompts: int = 1000
    tokenize_mb: float = 5.0
    others: int = 16
    rounds: int = 3


QUICK = HardeningBenchConfig(body_mb=2.0, prompt_mb=0.5, prompts=300, tokenize_mb=0.5, others=4, rounds=1)


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def hostile_cases(cfg: HardeningBenchConfig) -> dict[str, tuple[str, bytes]]:
    mb = 2**20
    text = lambda n: "word " * int(n * mb / 5)  # noqa: E731
    return {
        "body_20mb": ("/v1/completions", json.dumps({"prompt": text(cfg.body_mb), "max_tokens": 1}).encode()),
        "prompt_5mb": ("/v1/completions", json.dumps({"prompt": text(cfg.prompt_mb), "max_tokens": 1}).encode()),
        "prompts_1000": ("/v1/completions", json.dumps({"prompt": ["hi there"] * cfg.prompts,
                                                        "max_tokens": 1}).encode()),
        "tokenize_5mb": ("/tokenize", json.dumps({"prompt": text(cfg.tokenize_mb)}).encode()),
        "temperature_inf": ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity}'),
    }


def _post(url: str, path: str, body: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=300) as client:
            status = client.post(url + path, content=body, headers={"content-type": "application/json"}).status_code
    except httpx.HTTPError:  # a server may close the connection while a refused body is still being sent
        status = -1
    return status, time.perf_counter() - start


def one_round(url: str, cfg: HardeningBenchConfig, hostile: tuple[str, bytes] | None) -> dict:
    ordinary = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True}).encode()
    with concurrent.futures.ThreadPoolExecutor(cfg.others + 1) as pool:
        bad = pool.submit(_post, url, *hostile) if hostile else None
        time.sleep(0.05 if hostile else 0)  # the hostile request is in flight first
        good = list(pool.map(lambda _: _post(url, "/v1/completions", ordinary), range(cfg.others)))
        status, seconds = bad.result() if bad else (None, None)
    return {"status": status, "answer_s": seconds, "others_ok": sum(s == 200 for s, _ in good),
            "others_latency_s": [t for _, t in good]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--rounds", type=int, default=None, help="baseline/case round pairs per case")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else HardeningBenchConfig()
    if args.rounds is not None:
        cfg = HardeningBenchConfig(**{**asdict(cfg), "rounds": args.rounds})
    engine = AsyncLLMEngine.from_kwargs(str(resolve_model(cfg.model, args.cache_dir)), max_model_len=cfg.max_model_len)
    m: dict = {"cases": {}}
    with serve(build_app(LocalBackend(engine, model_name=cfg.model), ServerConfig())) as url:
        one_round(url, cfg, None)  # warm-up
        for name, hostile in hostile_cases(cfg).items():
            runs = [(one_round(url, cfg, None), one_round(url, cfg, hostile)) for _ in range(cfg.rounds)]
            base = [t for b, _ in runs for t in b["others_latency_s"]]
            beside = [t for _, c in runs for t in c["others_latency_s"]]
            m["cases"][name] = {"status": [c["status"] for _, c in runs],
                                "answer_s": median([c["answer_s"] for _, c in runs]),
                                "others_ok": sum(c["others_ok"] for _, c in runs),
                                "others_p90_s": percentile(beside, 0.9), "baseline_p90_s": percentile(base, 0.9)}
        state = engine.engine
        m["blocks_in_use_after"] = state.kv.num_blocks - state.kv.num_free_blocks
        m["live_requests_after"] = len(state.scheduler.requests)
    engine.shutdown()
    summary = {"blocks_in_use_after": float(m["blocks_in_use_after"])}
    for name, c in m["cases"].items():
        summary[f"{name}/answer_s"] = c["answer_s"]
        summary[f"{name}/others_p90_over_baseline"] = c["others_p90_s"] / c["baseline_p90_s"]
        summary[f"{name}/status"] = float(max(c["status"]))
    path = write_result("hardening-quick" if args.quick else "hardening", asdict(cfg), m, summary,
                        Path(args.out_dir) if args.out_dir else None,
                        command_line("radixserve.benchmarks.bench_hardening", argv))
    bar_plot(path.with_suffix(".png"), f"hostile requests: seconds to the refusal ({cfg.model})",
             [(name, c["answer_s"], None) for name, c in m["cases"].items()], "seconds")
    print_summary(path, summary)
    return summary


if __name__ == "__main__":
    main()
