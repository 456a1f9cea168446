"""Structured outputs: grammar-constrained decoding (JSON schema, regex, choice, EBNF)."""
from radixserve.engine.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
