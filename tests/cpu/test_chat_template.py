"""The chat-template and generation-config conventions of model directories users bring."""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest

from radixserve.engine.model.hf_config import generation_defaults
from radixserve.engine.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
# Calls what HF templates call: strftime_now, tojson with its options, the generation tag,
# a chat_template_kwargs switch, and raise_exception.
TEMPLATE = (
    "{{ bos_token }}Today: {{ strftime_now('%Y') }}\n"
    "{%- if tools %}Tools: {{ tools | tojson(indent=2, sort_keys=True) }}{% endif %}\n"
    "{%- for m in messages %}{% if m['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}</{{ m['role'] }}>\n{% endfor %}"
    "{%- if add_generation_prompt %}<assistant>{% if enable_thinking %}<think>{% endif %}{% endif %}"
)


@pytest.fixture
def model_copy(tiny_dir, tmp_path) -> Path:
    """tiny-llama's directory with its chat template moved to chat_template.jinja."""
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


def test_chat_template_jinja_file_renders_like_transformers(model_copy):
    from transformers import AutoTokenizer
    ours, ref = Tokenizer(model_copy), AutoTokenizer.from_pretrained(model_copy)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"b": 1, "a": "é"}}}]
    for kwargs in ({}, {"enable_thinking": True}, {"tools": tools}):
        text = ours.apply_chat_template(CHAT + [{"role": "assistant", "content": "Hello"}, CHAT[1]], **kwargs)
        assert text == ref.apply_chat_template(CHAT + [{"role": "assistant", "content": "Hello"}, CHAT[1]],
                                               tokenize=False, add_generation_prompt=True, **kwargs)
    assert f"Today: {datetime.datetime.now().year}" in text
    assert text.endswith("<assistant>")
    assert ours.apply_chat_template(CHAT, enable_thinking=True).endswith("<assistant><think>")


def test_template_errors_and_overrides(model_copy, tmp_path):
    tok = Tokenizer(model_copy)
    with pytest.raises(Exception, match="bad role hacker"):
        tok.apply_chat_template([{"role": "hacker", "content": "x"}])
    inline = Tokenizer(model_copy, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert inline.apply_chat_template(CHAT) == "[Be brief.][Hi there]"
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages | length }} messages")
    assert Tokenizer(model_copy, chat_template=str(f)).apply_chat_template(CHAT) == "2 messages"
    with pytest.raises(ValueError, match="no such file"):
        Tokenizer(model_copy, chat_template=str(tmp_path / "missing.jinja"))
    (model_copy / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="--chat-template"):
        Tokenizer(model_copy).apply_chat_template(CHAT)


def test_generation_config_defaults(model_copy):
    assert generation_defaults(model_copy) == {}  # tiny-llama's has eos ids only
    gen = json.loads((model_copy / "generation_config.json").read_text())
    gen.update(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, max_new_tokens=64, do_sample=True)
    (model_copy / "generation_config.json").write_text(json.dumps(gen))
    assert generation_defaults(model_copy) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                               "repetition_penalty": 1.1, "max_tokens": 64}
