"""Tokenizer of a Hugging Face directory, without transformers.

Reads ``tokenizer.json`` with the ``tokenizers`` library, special tokens from
``tokenizer_config.json``, and the chat template from (first found) the
``chat_template`` argument (a file path or the template itself),
``tokenizer_config.json``, ``chat_template.jinja`` (what transformers >= 4.43
writes) or ``chat_template.json``. Templates render with jinja2 the way
transformers renders them (same globals and filters), so the engine never
imports transformers.
"""
from __future__ import annotations

import datetime
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.sandbox
from jinja2.ext import Extension
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from radixserve.engine.config import ModelConfig


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    raise ValueError(f"unexpected special token entry {value!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping (unlike jinja2's), unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant spans): renders its body."""

    tags = {"generation"}

    def parse(self, parser):  # type: ignore[no-untyped-def]
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def read_chat_template(path: Path, override: str | None, cfg: dict[str, Any]) -> str | None:
    """The chat template in force: ``override`` (a file or the template), else the model's own."""
    if override is not None:
        candidate = Path(override).expanduser()
        if "{" not in override and candidate.is_file():
            return candidate.read_text(encoding="utf-8")
        if "{" not in override:
            raise ValueError(f"chat template {override!r}: no such file (and not a jinja template)")
        return override
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return template


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    """Encode, decode and apply the chat template of one model directory."""

    def __init__(self, path: str | Path, extra_eos_token_ids: list[int] | None = None,
                 chat_template: str | None = None):
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{tok_file}: missing; a model directory needs tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{tok_file}: cannot be parsed as a tokenizer ({exc})") from exc
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cfg_file}: invalid JSON ({exc})") from exc
        self.chat_template: str | None = read_chat_template(path, chat_template, cfg)
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = set(extra_eos_token_ids or [])
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos_ids.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.special_token_ids: frozenset[int] = frozenset(
            tid for tid, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (structured outputs read its vocabulary)."""
        return self._tok

    @property
    def eos_token_id(self) -> int | None:
        return min(self.eos_token_ids) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json post-processors usually add BOS themselves; add it only
        # when the config asks and the post-processor did not.
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters. Byte-level entries spell one character
        per byte, so no token decodes to more characters than this: a text longer than
        ``n * max_token_chars`` cannot encode to ``n`` tokens or fewer."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def apply_chat_template(self, messages: list[dict[str, Any]] | list[ChatMessage],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render messages to the prompt text (which already holds BOS if the template adds it)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json, chat_template.jinja); "
                             "pass one with --chat-template, or use a completion prompt")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(self.chat_template)
        msgs = [m.__dict__ if isinstance(m, ChatMessage) else m for m in messages]
        for m in msgs:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message needs 'role' and 'content', got keys {sorted(m)}")
        # chat_template_kwargs (enable_thinking, tools, documents, ...) may set anything but these two.
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs,
                   "messages": msgs, "add_generation_prompt": add_generation_prompt}
        return self._template.render(**context)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        # The template already wrote BOS, so the post-processor must not add another.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(cfg: ModelConfig, model_dir: Path) -> Tokenizer:
    """The tokenizer a ModelConfig asks for: the model's own or ``cfg.tokenizer``, with its
    chat template override, and EOS ids from both tokenizer and model config."""
    from radixserve.engine.model.default_models import resolve_model
    from radixserve.engine.model.hf_config import load_arch_config
    tok_dir = resolve_model(cfg.tokenizer, cfg.cache_dir, cfg.revision) if cfg.tokenizer else model_dir
    eos = list(load_arch_config(model_dir).eos_token_ids)
    return Tokenizer(tok_dir, extra_eos_token_ids=eos, chat_template=cfg.chat_template)
