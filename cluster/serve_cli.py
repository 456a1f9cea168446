"""``radixserve serve``: start (or join) Ray, deploy the cluster app, serve HTTP.

    radixserve serve smollm2                                  # local Ray, 127.0.0.1:8000
    radixserve serve --ray-address HEAD:6379 --detach ...      # deploy onto a running cluster
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _api_keys(values: list[str] | None) -> dict[str, str] | None:
    """``--api-key KEY`` (tenant = the key's own name) or ``--api-key KEY=TENANT``."""
    if not values:
        return None
    keys = {}
    for v in values:
        key, _, tenant = v.partition("=")
        keys[key] = tenant or f"tenant-{len(keys)}"
    return keys


def add_serve_parser(sub, add_engine_flags) -> None:
    from radixserve.cluster.config import ClusterConfig  # ray-free: --help stays fast
    from radixserve.cluster.routing_policy import POLICIES
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve")
    s.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as vLLM takes it (same as --model)")
    add_engine_flags(s)
    s.add_argument("--num-replicas", type=_replicas, default=ClusterConfig.num_replicas,
                   help="replicas, or 'auto' for Serve's default autoscaling (default: 1)")
    s.add_argument("--autoscaling-config", type=json.loads, default=None, metavar="JSON",
                   help='Serve autoscaling_config, e.g. \'{"min_replicas": 1, "max_replicas": 4, '
                        '"target_ongoing_requests": 8}\' (then --num-replicas is ignored)')
    s.add_argument("--router", default=ClusterConfig.router, choices=POLICIES,
                   help=f"replica choice (default: {ClusterConfig.router})")
    s.add_argument("--api-key", action="append", default=None,
                   help="require this key (repeatable; KEY=TENANT gives the key its own cache namespace)")
    s.add_argument("--served-model-name", nargs="+", default=ClusterConfig.served_model_name,
                   help="name(s) clients use for the model; the first is reported (default: the model)")
    for name in ("origins", "methods", "headers"):
        s.add_argument(f"--allowed-{name}", nargs="+", type=str, default=getattr(ClusterConfig, f"allowed_{name}"),
                       help=f"CORS allowed {name} (a list, or vLLM's JSON list; default: "
                            f"{list(getattr(ClusterConfig, f'allowed_{name}')) or 'none'})")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    _add_limit_flags(s, ClusterConfig)
    s.add_argument("--tool-call-parser", default=ClusterConfig.tool_call_parser,
                   help=f"how tool_choice auto finds tool calls in the output (default: {ClusterConfig.tool_call_parser}: "
                        "<tool_call>{...}</tool_call>)")
    s.add_argument("--host", "--http-host", dest="http_host", default="127.0.0.1",
                   help="HTTP address (default: 127.0.0.1; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--ray-address", default=None, help="join a running Ray cluster (default: start a local one)")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    s.add_argument("--dashboard-port", type=int, default=8265,
                   help="a local Ray's dashboard, on 127.0.0.1 (serve status, ray job submit)")
    s.add_argument("--replica-cpus", type=float, default=ClusterConfig.replica_cpus,
                   help=f"CPUs per replica and per TP worker (default: {ClusterConfig.replica_cpus})")
    s.add_argument("--app-name", default="radixserve")
    s.add_argument("--detach", action="store_true", help="deploy and exit; the app keeps running")
    s.set_defaults(fn=cmd_serve)


def _add_limit_flags(s, defaults) -> None:
    """The HTTP layer's limits and access (ServerConfig), and the replica stall timeout."""
    s.add_argument("--max-request-body-bytes", type=int, default=defaults.max_request_body_bytes,
                   help=f"larger request bodies are a 413 (default: {defaults.max_request_body_bytes})")
    s.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                   help="longer prompt texts are a 400 before tokenizing (default: max_model_len x the "
                        "tokenizer's longest token)")
    s.add_argument("--max-prompts-per-request", type=int, default=defaults.max_prompts_per_request,
                   help=f"prompts in one completions batch (default: {defaults.max_prompts_per_request})")
    s.add_argument("--max-stop-sequences", type=int, default=defaults.max_stop_sequences,
                   help=f"entries in stop / stop_token_ids (default: {defaults.max_stop_sequences})")
    s.add_argument("--metrics-api-key", default=None,
                   help="the key /metrics requires (default: any --api-key; open without keys)")
    s.add_argument("--allowed-lora-roots", nargs="+", default=list(defaults.allowed_lora_roots), metavar="DIR",
                   help="directories /v1/load_lora_adapter may load from (default: none, runtime loading off)")
    s.add_argument("--stall-timeout-s", type=float, default=defaults.stall_timeout_s,
                   help="a replica with work but no engine progress this long fails its health check "
                        f"(0: never; default: {defaults.stall_timeout_s:g})")


def _replicas(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def _cors(values) -> tuple[str, ...]:
    """``a b`` or vLLM's ``'["a", "b"]'``."""
    values = list(values)
    if len(values) == 1 and values[0].lstrip().startswith("["):
        values = json.loads(values[0])
    return tuple(str(v) for v in values)


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from radixserve.cli import engine_kwargs
    from radixserve.cluster.app import build_application
    from radixserve.cluster.config import ClusterConfig
    if args.model_tag:
        args.model = args.model_tag
    cfg = ClusterConfig(model=args.model, num_replicas=args.num_replicas, router=args.router,
                        autoscaling=args.autoscaling_config,
                        api_keys=_api_keys(args.api_key), served_model_name=args.served_model_name,
                        allowed_origins=_cors(args.allowed_origins), allowed_methods=_cors(args.allowed_methods),
                        allowed_headers=_cors(args.allowed_headers), allow_credentials=args.allow_credentials,
                        replica_cpus=args.replica_cpus, engine=engine_kwargs(args),
                        tool_call_parser=args.tool_call_parser,
                        max_request_body_bytes=args.max_request_body_bytes, max_prompt_chars=args.max_prompt_chars,
                        max_prompts_per_request=args.max_prompts_per_request,
                        max_stop_sequences=args.max_stop_sequences, metrics_api_key=args.metrics_api_key,
                        allowed_lora_roots=tuple(os.path.abspath(r) for r in args.allowed_lora_roots), stall_timeout_s=args.stall_timeout_s)
    if args.ray_address:
        ray.init(address=args.ray_address, namespace="serve")
    else:
        # The dashboard (loopback only) is what `serve status`, `serve config` and `ray job submit` talk to.
        # address="local": a new Ray of our own, even when another runs on this machine.
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=args.dashboard_port, namespace="serve")
    serve.start(http_options={"host": args.http_host, "port": args.port}, detached=args.detach)
    serve.run(build_application(cfg), name=args.app_name, route_prefix="/")
    print(json.dumps({"serving": f"http://{args.http_host}:{args.port}/v1", "model": args.model,
                      "replicas": args.num_replicas, "router": args.router}), flush=True)
    if args.detach:
        return 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    kill_metadata_actor(args.app_name)
    ray.shutdown()
    return 0


def kill_metadata_actor(app_name: str) -> None:
    """The metadata actor is detached (it outlives replicas); stop it with the app."""
    import ray

    from radixserve.cluster.metadata import ACTOR_NAMESPACE, actor_name
    try:
        ray.kill(ray.get_actor(actor_name(app_name), namespace=ACTOR_NAMESPACE))
    except ValueError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m radixserve.cluster.serve_cli`` == ``radixserve serve`` (the launch script uses it)."""
    from radixserve.cli import add_engine_flags
    parser = argparse.ArgumentParser(prog="radixserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True), add_engine_flags)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"radixserve serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
