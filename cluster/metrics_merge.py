"""Merge the Prometheus text of several replicas and routers into one valid exposition.

Each replica renders its own families (``# HELP`` / ``# TYPE`` then samples). Concatenated,
every family would repeat its header once per replica, which Prometheus' parsers reject
("Clashing name"). Here each family gets its header once, followed by every source's
samples, each sample carrying its source's labels (``replica="..."``). Given the live
replicas, a sample about any other replica (a router's decisions for one that died) is
left out. Ray-free and pure, so it is unit-tested with prometheus_client's own parser.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

_REPLICA = re.compile(r'[{,]replica="((?:[^"\\]|\\.)*)"')


@dataclass
class _Family:
    help: str = ""
    type: str = "untyped"
    samples: list[str] = field(default_factory=list)


def _with_label(sample: str, label: str) -> str:
    if not label:
        return sample
    name_end = sample.find("{")
    space = sample.find(" ")
    if name_end != -1 and name_end < space:  # name{a="b"} value
        return f"{sample[:name_end + 1]}{label},{sample[name_end + 1:]}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"  # name value


def _about_gone_replica(sample: str, live: Collection[str] | None) -> bool:
    if live is None:
        return False
    labels = sample[:sample.find("}") + 1] if "{" in sample.split(" ", 1)[0] else ""
    m = _REPLICA.search(labels)
    return m is not None and m.group(1) not in live


def merge(sources: Iterable[tuple[str, str]], live_replicas: Collection[str] | None = None) -> str:
    """``sources``: (extra label like 'replica="r1"' or '', Prometheus text) pairs;
    ``live_replicas``: when given, samples labelled with any other replica are dropped."""
    families: dict[str, _Family] = {}
    for label, text in sources:
        current: _Family | None = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                _, kind, name, *rest = line.split(" ", 3)
                current = families.setdefault(name, _Family())
                if kind == "HELP":
                    current.help = rest[0] if rest else ""
                else:
                    current.type = rest[0] if rest else "untyped"
            elif line and not line.startswith("#"):
                if current is None:  # a sample before any header: its own untyped family
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    current = families.setdefault(name, _Family())
                sample = _with_label(line, label)
                if not _about_gone_replica(sample, live_replicas):
                    current.samples.append(sample)
    out = []
    for name, fam in families.items():
        out += [f"# HELP {name} {fam.help}", f"# TYPE {name} {fam.type}", *fam.samples]
    return "\n".join(out) + "\n" if out else ""
