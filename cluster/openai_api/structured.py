"""Request fields that constrain the output -> StructuredOutputsParams.

What vLLM's OpenAI server accepts: ``response_format`` ({"type": "json_object"} or
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}), the
``structured_outputs`` body field (StructuredOutputsParams' own fields) and the
older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
At most one constraint per request; the engine compiles it (a bad one is a 400
naming the problem).
"""
from __future__ import annotations

from typing import Any

from radixserve.cluster.openai_api.protocol import RequestError
from radixserve.engine.structured.params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_SO_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
              "disable_additional_properties")


def _make(param: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc), param=param) from None


def _from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise RequestError("response_format must be an object with a 'type'", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _make("response_format", json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                               "{...}}}", param="response_format")
        schema = spec.get("schema", {"type": "object"})  # OpenAI: schema is optional
        # strict: objects get exactly the declared keys, as OpenAI's strict mode guarantees
        return _make("response_format", json=schema, disable_additional_properties=bool(spec.get("strict")))
    raise RequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                       param="response_format")


_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties")


def _from_structured_outputs(so: Any) -> StructuredOutputsParams | None:
    if so is None or (isinstance(so, dict) and not any(so.get(k) not in (None, False) for k in _KINDS)):
        return None  # options only (or nothing): they apply to response_format / guided_* (vLLM merges them)
    if not isinstance(so, dict):
        raise RequestError("structured_outputs must be an object", param="structured_outputs")
    unknown = sorted(set(so) - set(_SO_FIELDS) - {"backend", "whitespace_pattern", "structural_tag"})
    if unknown:
        raise RequestError(f"structured_outputs: unknown field(s) {unknown}; known: {list(_SO_FIELDS)}",
                           param="structured_outputs")
    for name in ("whitespace_pattern", "structural_tag"):
        if so.get(name) is not None:
            raise RequestError(f"structured_outputs.{name} is not supported", param="structured_outputs")
    kwargs = {k: v for k, v in so.items() if k in _SO_FIELDS and v is not None}
    return _make("structured_outputs", **kwargs)


def structured_params(req: Any) -> StructuredOutputsParams | None:
    """The request's one output constraint, or None; RequestError when it sets two or a bad one."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = _from_response_format(getattr(req, "response_format", None))
    if rf is not None:
        found.append(("response_format", rf))
    so = _from_structured_outputs(getattr(req, "structured_outputs", None))
    if so is not None:
        found.append(("structured_outputs", so))
    for name, kind in _GUIDED.items():
        value = getattr(req, name, None)
        if value is not None:
            found.append((name, _make(name, **{kind: value})))
    if len(found) > 1:
        raise RequestError(f"send at most one output constraint; got {[n for n, _ in found]}", param=found[1][0])
    if not found:
        return None
    name, params = found[0]
    raw = getattr(req, "structured_outputs", None)
    options = {k: raw[k] for k in _OPTIONS if isinstance(raw, dict) and raw.get(k) is not None}
    if name != "structured_outputs" and options:
        _from_structured_outputs_check(raw)
        kwargs = {k: getattr(params, k) for k in (*_KINDS, *_OPTIONS)}
        params = _make("structured_outputs", **{**kwargs, **options})
    return params


def _from_structured_outputs_check(so: dict[str, Any]) -> None:
    unknown = sorted(set(so) - set(_SO_FIELDS) - {"backend"})
    if unknown:
        raise RequestError(f"structured_outputs: unknown field(s) {unknown}; known: {list(_SO_FIELDS)}",
                           param="structured_outputs")
