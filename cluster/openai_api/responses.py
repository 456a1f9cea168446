"""The OpenAI Responses API (``POST /v1/responses``) on the chat-completions path.

A Responses request becomes a ChatCompletionRequest (instructions -> a system
message, input items -> messages, ``text.format`` -> response_format, flat
function tools -> chat tools), so it runs exactly as a chat completion does:
same template, same constraints, same tool parsing. Stateless, like vLLM
without a store: ``previous_response_id`` and ``store: true`` retrieval are
not offered (``store`` is accepted and ignored; nothing is kept).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import RootModel, ValidationError

from radixserve.cluster.openai_api.protocol import ChatCompletionRequest, RequestError, _Model
from radixserve.cluster.openai_api.tools import ParsedCall, ToolPlan
from radixserve.engine.entrypoints.outputs import RequestOutput


class ResponsesRequest(_Model):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # not in OpenAI's API; vLLM accepts it
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    structured_outputs: Any = None  # vLLM's extension, as on chat


class Event(RootModel[dict[str, Any]]):
    """One streamed event (its ``type`` names it)."""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text"):
                raise RequestError(f"only text content parts are supported, got type {kind!r}", param="input")
            parts.append(part.get("text") or "")
        return "\n".join(parts)
    raise RequestError("message content must be a string or a list of text parts", param="input")


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"input message role must be user, assistant, system or developer, got {role!r}",
                                   param="input")
            out.append({"role": "system" if role == "developer" else role, "content": _content_text(item.get("content"))})
        elif kind == "function_call":  # an earlier call of the model: an assistant turn with tool_calls
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise RequestError(f"input item type {kind!r} is not supported", param="input")
    if not out:
        raise RequestError("input must not be empty", param="input")
    return out


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function":
            raise RequestError(f"only function tools are supported, got {t.get('type') if isinstance(t, dict) else t!r}",
                               param="tools")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> Any:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type", "text") == "text":
        return None
    if fmt.get("type") == "json_schema":  # flat in the Responses API, nested in chat
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    if body.previous_response_id is not None:
        raise RequestError("previous_response_id is not supported: this server stores no responses; send the "
                           "conversation in input", param="previous_response_id")
    try:
        return _chat_request(body)
    except ValidationError as exc:
        raise RequestError(f"input: {exc.errors()[0].get('msg', 'invalid value')}", param="input") from None


def _chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model=body.model, messages=_messages(body), max_tokens=body.max_output_tokens, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, tools=_tools(body.tools), tool_choice=_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls, response_format=_response_format(body.text),
        structured_outputs=body.structured_outputs, user=body.user)


# -- output --------------------------------------------------------------------------------------

def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: ParsedCall) -> dict[str, Any]:
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call_id, "name": call.name,
            "arguments": call.arguments, "status": "completed"}


def _split(text: str, plan: ToolPlan | None) -> tuple[str | None, list[ParsedCall]]:
    return plan.parse(text) if plan is not None else (text, [])


class ResponseBuilder:
    """The Response object of one request, in progress or final, and its stream events."""

    def __init__(self, rid: str, body: ResponsesRequest, model: str, created: int, plan: ToolPlan | None):
        self.id = rid
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.body, self.model, self.created, self.plan = body, model, created, plan
        self.seq = 0
        self.sent = 0  # characters of text streamed
        self.started = False
        # with tools the text may turn into calls: it is sent when the request ends
        self.stream_text = plan is None or plan.choice == "none"

    def response(self, out: RequestOutput | None, status: str = "completed") -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        usage = None
        incomplete = None
        if out is not None:
            c = out.outputs[0]
            content, calls = _split(c.text, self.plan)
            if content or self.started:  # a streamed message item is always closed
                output.append(_message_item(self.msg_id, content or ""))
            output += [_call_item(call) for call in calls]
            if c.finish_reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            n_in, n_out = len(out.prompt_token_ids), len(c.token_ids)
            usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
                     "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": n_in + n_out}
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "usage": usage, "incomplete_details": incomplete,
                "error": None, "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
                "temperature": b.temperature, "top_p": b.top_p, "tools": b.tools or [],
                "tool_choice": b.tool_choice or "auto", "parallel_tool_calls": b.parallel_tool_calls is not False,
                "text": b.text or {"format": {"type": "text"}}, "metadata": b.metadata, "store": False}

    # -- streaming ---------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> Event:
        self.seq += 1
        return Event({"type": kind, "sequence_number": self.seq - 1, **fields})

    def _text_events(self, delta: str) -> list[Event]:
        events = []
        if not self.started:
            self.started = True
            events += [self._event("response.output_item.added", output_index=0,
                                   item={**_message_item(self.msg_id, "", "in_progress"), "content": []}),
                       self._event("response.content_part.added", item_id=self.msg_id, output_index=0,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
        if delta:
            events.append(self._event("response.output_text.delta", item_id=self.msg_id, output_index=0,
                                      content_index=0, delta=delta, logprobs=[]))
        return events

    def events(self, out: RequestOutput) -> list[Event]:
        events = []
        if self.seq == 0:
            events += [self._event("response.created", response=self.response(None, "in_progress")),
                       self._event("response.in_progress", response=self.response(None, "in_progress"))]
        c = out.outputs[0]
        if self.stream_text and len(c.text) > self.sent:
            events += self._text_events(c.text[self.sent:])
            self.sent = len(c.text)
        if out.finished:
            events += self._final_events(out)
        return events

    def _final_events(self, out: RequestOutput) -> list[Event]:
        final = self.response(out)
        events = []
        for index, item in enumerate(final["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                if not self.stream_text:
                    events += self._text_events(text)
                events += [self._event("response.output_text.done", item_id=self.msg_id, output_index=index,
                                       content_index=0, text=text, logprobs=[]),
                           self._event("response.content_part.done", item_id=self.msg_id, output_index=index,
                                       content_index=0, part=item["content"][0]),
                           self._event("response.output_item.done", output_index=index, item=item)]
            else:
                events += [self._event("response.output_item.added", output_index=index,
                                       item={**item, "status": "in_progress"}),
                           self._event("response.function_call_arguments.done", item_id=item["id"],
                                       output_index=index, arguments=item["arguments"], name=item["name"]),
                           self._event("response.output_item.done", output_index=index, item=item)]
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return events + [self._event(kind, response=final)]
