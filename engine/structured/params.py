"""What a request constrains its output to (vLLM's ``StructuredOutputsParams``).

Plain data, importable without xgrammar or torch: it rides inside
SamplingParams through the scheduler, the HTTP layer and the wire codec.
Exactly one of ``json``, ``regex``, ``choice``, ``grammar`` or
``json_object`` is set. The grammar itself is built and compiled by
``radixserve.engine.structured.manager``.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class StructuredOutputsParams:
    """One output constraint.

    ``json``: a JSON schema (a dict, or its JSON text; kept as canonical text).
    ``regex``: a regular expression the whole output matches.
    ``choice``: the output is exactly one of these strings.
    ``grammar``: an EBNF (GBNF) grammar whose start rule is ``root``.
    ``json_object``: any JSON object (``response_format: json_object``).
    ``disable_any_whitespace``: JSON without free whitespace between tokens
    (compact output; protects weak models from whitespace loops).
    ``disable_additional_properties``: objects of a schema that says nothing
    about ``additionalProperties`` get no extra keys (xgrammar's strict mode).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = _json.dumps(self.json, sort_keys=True)
        elif self.json is not None:
            _require(isinstance(self.json, str), f"structured_outputs.json must be a JSON schema "
                                                 f"(object or its JSON text), got {type(self.json).__name__}")
            try:
                schema = _json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            _require(isinstance(schema, (dict, bool)), "structured_outputs.json must be a JSON schema object")
            self.json = _json.dumps(schema, sort_keys=True)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, str) and bool(v)),
                     f"structured_outputs.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None:
            _require(isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                     and all(isinstance(c, str) and c for c in self.choice),
                     f"structured_outputs.choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            self.choice = list(self.choice)
        for name in ("json_object", "disable_any_whitespace", "disable_additional_properties"):
            _require(isinstance(getattr(self, name), bool),
                     f"structured_outputs.{name} must be a bool, got {getattr(self, name)!r}")
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        _require(len(set_kinds) == 1, "structured_outputs needs exactly one of json, regex, choice, grammar, "
                                      f"json_object; got {set_kinds or 'none'}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool, bool]:
        """What the compiled grammar depends on (with the engine's tokenizer): the cache key."""
        kind = self.kind
        spec = getattr(self, kind)
        text = _json.dumps(spec) if kind == "choice" else "" if kind == "json_object" else str(spec)
        return kind, text, self.disable_any_whitespace, self.disable_additional_properties
