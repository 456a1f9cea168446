"""The xgrammar side of structured outputs: tokenizer info, grammars, compiling.

xgrammar is an optional dependency (``pip install 'radixserve[structured]'``);
it is imported on the first constrained request only, so an engine that never
sees one never loads it (or the transformers it depends on).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from radixserve.engine.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from radixserve.engine.tokenizer import Tokenizer


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise ValueError("structured outputs need the xgrammar package: pip install 'radixserve[structured]' "
                         f"(or pip install xgrammar) [{exc}]") from None
    return xgrammar


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: frozenset[int]) -> Any:
    """xgrammar's view of our ``tokenizers`` tokenizer (no transformers object needed).

    ``vocab_size`` is the model's (logits) vocabulary, which may exceed the
    tokenizer's: the extra ids are never allowed.
    """
    xgr = import_xgrammar()
    hf = tokenizer.hf_tokenizer
    encoded = [""] * max(vocab_size, hf.get_vocab_size(with_added_tokens=True))
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        # Special tokens (BOS, headers, reserved) are no text: left empty, xgrammar never allows
        # them (it would otherwise read "<|eot_id|>" as ten characters of a JSON string).
        encoded[i] = "" if i in tokenizer.special_token_ids and i not in stop_token_ids else token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(hf.to_str())  # byte-level / byte-fallback / raw
    return xgr.TokenizerInfo(encoded[:vocab_size], vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=sorted(stop_token_ids), add_prefix_space=meta["add_prefix_space"])


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are valid EBNF string literals in xgrammar's syntax.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# xgrammar 0.2.9 builds a string with minLength/maxLength from [^"\\\r\n], which lets raw
# control characters (invalid JSON) through; an equivalent pattern keeps them out.
_PLAIN_CHAR = r'[^"\\\x00-\x1f]'


def _fix_string_lengths(node: Any) -> Any:
    """A copy of the schema where length-bounded plain strings are patterns instead."""
    if isinstance(node, list):
        return [_fix_string_lengths(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _fix_string_lengths(v) for k, v in node.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    if (out.get("type") == "string" and (lo is not None or hi is not None) and "pattern" not in out
            and "format" not in out and all(v is None or isinstance(v, int) for v in (lo, hi))):
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHAR}{{{lo or 0},{'' if hi is None else hi}}}$"
    return out


def build_grammar(params: StructuredOutputsParams) -> Any:
    """The tokenizer-independent grammar; ValueError naming what is wrong with it."""
    xgr = import_xgrammar()
    kind = params.kind
    ws = not params.disable_any_whitespace
    strict = params.disable_additional_properties
    try:
        if kind == "json":
            spec = params.json  # canonical JSON text after StructuredOutputsParams.__post_init__
            raw = json.loads(spec) if isinstance(spec, str) else spec
            schema = json.dumps(_fix_string_lengths(raw))
            return xgr.Grammar.from_json_schema(schema, any_whitespace=ws, strict_mode=strict)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=ws)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice or []))
        return xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"structured_outputs.{kind} cannot be compiled: {_clean(exc)}") from None


def _clean(exc: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source path: keep the message."""
    text = str(exc).strip()
    head, sep, rest = text.partition(": ")
    if sep and (".cc:" in head or ".h:" in head):
        text = rest
    return text.splitlines()[0] if text else type(exc).__name__
