"""``radixserve`` command line: generate | chat | serve | bench.

Engine flags are the fields of the config dataclasses in ``radixserve.engine.config`` with
dashes (the keywords of ``LLM(...)``), so the CLI and ``LLM(...)`` always agree. Heavy imports (ray, the
engine) happen inside the subcommands to keep ``--help`` fast.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _flag_kind(tp: Any) -> tuple[Any, str | None]:
    """A config field's annotation -> (argparse type, nargs)."""
    if typing.get_origin(tp) is tuple:
        return str, "+"  # lora_modules: name=path strings; the config parses them
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if args else tp  # X | None parses as X
    return (_bool if tp is bool else tp), None


# Short spellings vLLM users type.
_ALIASES = {"tensor_parallel_size": ("-tp",)}


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """One flag per engine config field (``block_size`` -> ``--block-size``): type, default and
    help all come from the dataclasses in radixserve/engine/config.py. A boolean works as vLLM's
    do: ``--enable-prefix-caching`` alone is true, ``--no-enable-prefix-caching`` false, and an
    explicit ``--enable-prefix-caching false`` still parses."""
    from radixserve.engine.config import engine_flags
    for f in engine_flags().values():
        kind, nargs = _flag_kind(f.type)
        flag = "--" + f.name.replace("_", "-")
        shown = "" if f.default in (None, ()) else f" (default: {f.default})"  # help says what unset means
        if kind is _bool:
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=f.default, metavar="BOOL",
                           help=f.help + shown)
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           help=argparse.SUPPRESS)
            continue
        p.add_argument(flag, *_ALIASES.get(f.name, ()), type=kind, nargs=nargs, default=f.default,
                       metavar=f.metavar, help=f.help + shown)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags of parsed ``args`` as engine_config keywords, less ``model``
    (which the callers pass on its own)."""
    from radixserve.engine.config import engine_flags
    return {n: getattr(args, n) for n in engine_flags() if n != "model"}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None)


def sampling_params(args: argparse.Namespace):
    from radixserve.engine.sampling_params import SamplingParams
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.sampling_seed, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=args.stop, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def cmd_generate(args: argparse.Namespace) -> int:
    from radixserve.engine.entrypoints.llm import LLM
    params = sampling_params(args)  # validate before loading the model
    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with LLM(args.model, **engine_kwargs(args)) as llm:
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for out in outs:
        for comp in out.outputs:
            if args.json:
                print(json.dumps({"prompt": out.prompt, "text": comp.text, "token_ids": comp.token_ids,
                                  "finish_reason": comp.finish_reason,
                                  "num_cached_tokens": out.num_cached_tokens,
                                  "ttft_s": out.metrics.ttft, "e2e_s": out.metrics.e2e}))
            else:
                print(f"{out.prompt!r} -> {comp.text!r}  [{comp.finish_reason}, "
                      f"{len(comp.token_ids)} tokens, ttft {out.metrics.ttft:.3f}s]")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from radixserve.engine.entrypoints.llm import LLM
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    params = sampling_params(args)
    with LLM(args.model, **engine_kwargs(args)) as llm:
        if args.message:  # one-shot: answer these turns in one conversation, then exit
            lines = list(args.message)
        else:
            print("radixserve chat: type a message, '/reset' to clear history, '/exit' or EOF to quit.",
                  file=sys.stderr)
            lines = sys.stdin
        for line in lines:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = history[:1] if args.system else []
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            out = llm.chat(history, params)[0]
            reply = out.outputs[0].text
            history.append({"role": "assistant", "content": reply})
            print(f"assistant: {reply}")
            print(f"  [prompt {len(out.prompt_token_ids)} tokens, cached {out.num_cached_tokens}, "
                  f"ttft {out.metrics.ttft:.3f}s]", file=sys.stderr)
            sys.stdout.flush()
    return 0


def bench_suites() -> dict[str, str]:
    """Runnable benchmark modules (bench_* and report) -> first line of their docstring.

    Read with ast, not imported, so listing stays fast and needs no torch.
    """
    import ast

    from radixserve import benchmarks
    suites = {}
    for path in sorted(Path(benchmarks.__file__).parent.glob("*.py")):
        if path.stem.startswith("bench_") or path.stem == "report":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            suites[path.stem] = doc.split("\n")[0]
    return suites


def cmd_bench(args: argparse.Namespace) -> int:
    suites = bench_suites()
    if args.list or not args.suite:
        for name, doc in suites.items():
            print(f"{name:18s} {doc}")
        return 0 if args.list else 2
    # "workloads" is short for "bench_workloads"
    name = args.suite if args.suite in suites else f"bench_{args.suite}"
    if name not in suites:
        raise ValueError(f"unknown benchmark suite {args.suite!r}; choose from {', '.join(suites)}")
    import importlib
    importlib.import_module(f"radixserve.benchmarks.{name}").main(list(args.suite_args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions offline")
    g.add_argument("prompt", nargs="*", help="prompt text (several allowed; default: one per stdin line)")
    g.add_argument("--json", action="store_true", help="print one JSON object per output")
    add_engine_flags(g)
    add_sampling_flags(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="chat that keeps history: the messages given, or interactively")
    c.add_argument("message", nargs="*", help="user turns to answer in order, then exit (default: read stdin)")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_flags(c)
    add_sampling_flags(c)
    c.set_defaults(fn=cmd_chat)
    from radixserve.cluster.serve_cli import add_serve_parser
    add_serve_parser(sub, add_engine_flags)
    b = sub.add_parser("bench", help="run a benchmark suite (python -m radixserve.benchmarks.<suite>)",
                       description="radixserve bench <suite> [suite args...]; --list shows the suites; "
                                   "<suite> --help shows a suite's own flags")
    b.add_argument("--list", action="store_true", help="list the suites")
    b.add_argument("suite", nargs="?", help="e.g. bench_workloads (or workloads), report")
    b.add_argument("suite_args", nargs=argparse.REMAINDER, help="passed to the suite's main(argv)")
    b.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"radixserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
