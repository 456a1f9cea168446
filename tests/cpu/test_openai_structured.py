"""Structured outputs and tool calling over HTTP, with httpx and the official openai client.

tiny-llama has random weights: the grammar alone makes outputs valid, so tests
ask for compact JSON (``disable_any_whitespace``) or finite grammars to finish
within max_tokens.
"""
from __future__ import annotations

import json
import re
from typing import Literal

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
from pydantic import BaseModel  # noqa: E402

from radixserve.cluster.openai_api.protocol import ChatMessage  # noqa: E402
from radixserve.cluster.openai_api.tools import HermesToolParser, render_messages, tool_plan  # noqa: E402
from tests.cpu.openai_harness import MODEL, assert_error, post_sse  # noqa: E402

COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["utc", "cet"]}},
                                       "required": ["tz"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "seed": 7,
            "max_tokens": 120, **kw}


def test_parse_with_a_pydantic_model(client):
    class Answer(BaseModel):  # finite: a random model must still close it
        ok: bool
        colour: Literal["red", "blue"]

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(2):
        resp = parse(model=MODEL, messages=[{"role": "user", "content": "answer"}], response_format=Answer,
                     max_tokens=120, seed=seed, extra_body=COMPACT)
        assert isinstance(resp.choices[0].message.parsed, Answer)


def test_completions_guided_choice_and_streamed_regex(http, url):
    r = http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "pick", "n": 3, "temperature": 1.0,
                                                 "seed": 1, "guided_choice": ["alpha", "beta", "gamma delta"]})
    assert r.status_code == 200, r.text
    assert {c["text"] for c in r.json()["choices"]} <= {"alpha", "beta", "gamma delta"}
    assert all(c["finish_reason"] == "stop" for c in r.json()["choices"])
    _, events = post_sse(http, f"{url}/v1/completions",
                         {"model": MODEL, "prompt": "id", "max_tokens": 30, "guided_regex": r"id-[0-9]{4}"})
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    assert re.fullmatch(r"id-[0-9]{4}", text), text


def test_chat_json_schema_strict_streamed_and_not(http, url):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["x", "y"]}}, "required": ["n", "tag"]}
    body = _chat(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                                         "strict": True}}, **COMPACT)
    r = http.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    obj = json.loads(content)
    jsonschema.validate(obj, schema)
    assert set(obj) == {"n", "tag"}  # strict: no extra keys
    _, events = post_sse(http, f"{url}/v1/chat/completions", body)
    streamed = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    assert streamed == content  # same seed, same tokens
    r = http.post(f"{url}/v1/chat/completions", json=_chat(response_format={"type": "json_object"}, **COMPACT))
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


def test_bad_constraints_are_400s(http, url):
    r = http.post(f"{url}/v1/chat/completions", json=_chat(guided_json={"type": "bogus"}))
    assert_error(r, 400, contains="bogus")
    r = http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "guided_regex": "[a-"})
    assert_error(r, 400, contains="regex")
    r = http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "guided_regex": "a",
                                                 "structured_outputs": {"choice": ["b"]}})
    assert_error(r, 400, contains="at most one")
    r = http.post(f"{url}/v1/chat/completions", json=_chat(response_format={"type": "yaml"}))
    assert_error(r, 400, param="response_format")
    r = http.post(f"{url}/v1/chat/completions", json=_chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "nope"}}))
    assert_error(r, 400, param="tool_choice", contains="nope")


def test_named_and_required_tool_calls_parse(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER, CLOCK], max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=3)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "time?"}], tools=[WEATHER, CLOCK], max_tokens=120,
        tool_choice="required", parallel_tool_calls=False, seed=4)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def _assemble(stream) -> tuple[str, dict[int, dict], str | None]:
    """Content, tool calls and finish reason, assembled from deltas as openai-client users do."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                if tc.function is not None:
                    slot["name"] = tc.function.name or slot["name"]
                    slot["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, calls, finish


def test_auto_tool_calls_parsed_and_streamed(client):
    # The model's text is forced into the hermes format, so the parser has a call to find.
    regex = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,5}", "unit": "c"\}\}</tool_call>'
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER], max_tokens=80,
              extra_body={"guided_regex": regex}, seed=2)
    resp = client.chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Sure." and msg.tool_calls[0].function.name == "get_weather"
    args = json.loads(msg.tool_calls[0].function.arguments)
    content, calls, finish = _assemble(client.chat.completions.create(**kw, stream=True))
    assert content == "Sure. " and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == args
    assert calls[0]["id"].startswith("call_")
    # named calls stream their arguments piece by piece
    content, calls, finish = _assemble(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER], max_tokens=80, seed=5,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    assert content == "" and calls[0]["name"] == "get_weather" and finish == "stop"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_tool_history_reaches_the_prompt(http, url, backend):
    messages = [{"role": "user", "content": "weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "oslo", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "minus four"}]
    r = http.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [WEATHER],
                                                      "max_tokens": 1, "return_token_ids": True})
    assert r.status_code == 200, r.text
    prompt = backend.tokenizer.decode(r.json()["prompt_token_ids"], skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "oslo", "unit": "c"}}' in prompt
    assert "<tool_response>\nminus four\n</tool_response>" in prompt
    assert '"name": "get_weather", "description": "Weather in a city"' in prompt  # the tools, in a system turn


def test_tools_reach_a_template_that_knows_them():
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "{% for c in m.tool_calls or [] %}<{{ c.function.arguments.city }}>{% endfor %}{% endfor %}")
    body = type("B", (), {"tools": [WEATHER], "tool_choice": None, "parallel_tool_calls": None})()
    plan = tool_plan(body)
    msgs = [ChatMessage(role="assistant", tool_calls=[{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "rome", "unit": "c"}'}}])]
    out, kwargs = render_messages(msgs, [{"role": "assistant", "content": ""}], template, plan)
    assert kwargs == {"tools": [WEATHER]}
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "rome", "unit": "c"}


def test_hermes_parser():
    p = HermesToolParser()
    assert p.parse("no calls here") == ("no calls here", [])
    content, calls = p.parse('hm <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
                             '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert content == "hm" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert p.parse("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])


# -- /v1/responses ---------------------------------------------------------------------------------

def test_responses_text_streamed_and_not(client):
    kw = dict(model=MODEL, input="hello there", instructions="Be brief.", max_output_tokens=8,
              extra_body={"seed": 3, "temperature": 1.0})
    resp = client.responses.create(**kw)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 8 and resp.output[0].type == "message"
    text = resp.output_text
    assert text
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete" and "response.output_text.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text


def test_responses_json_format_and_tools(client, http, url):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    resp = client.responses.create(model=MODEL, input=[{"role": "user", "content": "json please"}],
                                   text={"format": {"type": "json_schema", "name": "r", "schema": schema, "strict": True}},
                                   max_output_tokens=60, extra_body=COMPACT)
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), schema)
    flat = {"type": "function", **WEATHER["function"]}
    history = [{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "oslo", "unit": "c"}'},
               {"type": "function_call_output", "call_id": "c1", "output": "cold"},
               {"role": "user", "content": "and again?"}]
    resp = client.responses.create(model=MODEL, input=history, tools=[flat], max_output_tokens=80,
                                   tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in resp.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    r = http.post(f"{url}/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_1"})
    assert_error(r, 400, param="previous_response_id")


def test_responses_streamed_tool_call(client):
    flat = {"type": "function", **WEATHER["function"]}
    events = list(client.responses.create(model=MODEL, input="weather?", tools=[flat], max_output_tokens=80,
                                          tool_choice="required", parallel_tool_calls=False, stream=True))
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.item.type for e in done] == ["function_call"]
    assert done[0].item.name == "get_weather"
    jsonschema.validate(json.loads(done[0].item.arguments), WEATHER["function"]["parameters"])
    assert events[-1].type == "response.completed" and events[-1].response.output[0].type == "function_call"
