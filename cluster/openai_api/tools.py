"""Tool calling: request tools -> template kwargs, grammar and parser; output -> tool_calls.

* ``tool_choice`` "none": tools reach the template, the output is plain text.
* "auto" (the default with tools): free generation; a tool-call parser
  (``--tool-call-parser``, default hermes: ``<tool_call>{"name", "arguments"}</tool_call>``)
  turns the text into ``message.tool_calls``.
* "required": a grammar forces a JSON array of ``{"name", "parameters"}`` calls,
  one per item, each validated against its tool's schema (one item unless
  ``parallel_tool_calls``).
* a named function: a grammar forces that function's arguments object.

History: assistant ``tool_calls`` (arguments as objects, as HF templates expect)
and ``role: "tool"`` messages go to the template; a template that knows nothing
of tools gets them written in the hermes format instead (tools in a system
message, calls as ``<tool_call>`` text), so nothing is dropped from the prompt.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixserve.cluster.openai_api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    FunctionCall,
    RequestError,
    ToolCall,
)
from radixserve.cluster.openai_api.render import ChoiceCursor
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.structured.params import StructuredOutputsParams


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- parsers ------------------------------------------------------------------------------------

@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


class HermesToolParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen 2.5/3)."""

    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the first call or the whole text, calls); a block that is no valid
        call leaves the text as content."""
        if self.start not in text:
            return text, []
        calls = []
        for m in self._block.finditer(text):
            try:
                obj = json.loads(m.group(1))
            except ValueError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append(ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args)))
        content = text[:text.index(self.start)].strip()
        return content or None, calls


TOOL_PARSERS: dict[str, Callable[[], HermesToolParser]] = {"hermes": HermesToolParser}


def check_tool_parser(name: str) -> None:
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {name!r}")


# -- the plan of one request ---------------------------------------------------------------------

@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool definitions, as the template receives them
    choice: str  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    parser: HermesToolParser = field(default_factory=HermesToolParser)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def schema_of(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object", "properties": {}}

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar of "required" / named calls (compact JSON: it is parsed, not read)."""
        if self.choice == "named":
            assert self.named is not None
            return StructuredOutputsParams(json=self.schema_of(self.named), disable_any_whitespace=True)
        if self.choice == "required":
            items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": self.schema_of(n)},
                      "required": ["name", "parameters"], "additionalProperties": False} for n in self.names]
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        return None

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.choice == "named":
            assert self.named is not None
            return None, [ParsedCall(self.named, text.strip())]
        if self.choice == "required":
            try:
                items = json.loads(text)
                return None, [ParsedCall(i["name"], json.dumps(i["parameters"])) for i in items]
            except (ValueError, TypeError, KeyError):
                return text, []  # cut short by max_tokens: what there is, as text
        if self.choice == "auto":
            content, calls = self.parser.parse(text)
            return content, (calls if self.parallel else calls[:1])
        return text, []


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}",
                           param="tools")
    seen = set()
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise RequestError("every tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                               param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("every tool function needs a non-empty name", param="tools")
        if name in seen:
            raise RequestError(f"tool function {name!r} is declared twice", param="tools")
        seen.add(name)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(f"tool {name!r}: parameters must be a JSON schema object", param="tools")
    return tools


def tool_plan(body: ChatCompletionRequest, parser: str = "hermes") -> ToolPlan | None:
    """None when the request has no tools (a tool_choice other than none/auto then is a 400)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    tools = _check_tools(body.tools)
    plan = ToolPlan(tools, "auto", parallel=body.parallel_tool_calls is not False, parser=TOOL_PARSERS[parser]())
    if choice is None or choice in ("none", "auto", "required"):
        plan.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in plan.names:
            raise RequestError(f"tool_choice names {name!r}, which is not among the tools {plan.names}",
                               param="tool_choice")
        plan.choice, plan.named = "named", name
    else:
        raise RequestError("tool_choice must be none, auto, required or {\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}", param="tool_choice")
    return plan


# -- the prompt ----------------------------------------------------------------------------------

def _hermes_call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")}) + "\n</tool_call>"


def _hermes_system(tools: list[dict[str, Any]]) -> str:
    defs = "\n".join(json.dumps(t) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{defs}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _arguments_object(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise RequestError("an assistant tool call must be {\"id\", \"type\": \"function\", \"function\": "
                           "{\"name\", \"arguments\"}}", param="messages")
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):  # OpenAI sends JSON text; HF templates iterate over an object
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RequestError(f"tool call arguments are not valid JSON: {args[:80]!r}", param="messages") from None
    return {**call, "function": fn}


def render_messages(messages: list[ChatMessage], plain: list[dict[str, str]], template: str | None,
                    plan: ToolPlan | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages for the template, extra template kwargs) with tool calls, tool results and tools.

    ``plain`` is ``chat_messages(messages)`` (validated role and text of each).
    """
    knows_calls = template is not None and "tool_calls" in template
    knows_tools = template is not None and "tools" in template
    out: list[dict[str, Any]] = []
    for m, p in zip(messages, plain):
        msg: dict[str, Any] = dict(p)
        if m.tool_calls:
            calls = [_arguments_object(c) for c in m.tool_calls]
            if knows_calls:
                msg["tool_calls"] = calls
            else:
                msg["content"] = "\n".join([msg["content"]] * bool(msg["content"]) + [_hermes_call_text(c) for c in calls])
        if m.role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if not knows_calls:
                msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    kwargs: dict[str, Any] = {}
    if plan is not None:
        if knows_tools:
            kwargs["tools"] = plan.tools
        else:
            system = _hermes_system(plan.tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
            else:
                out.insert(0, {"role": "system", "content": system})
    return out, kwargs


# -- the response --------------------------------------------------------------------------------

def tool_calls_of(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(id=_call_id(), type="function", function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls]


def finish_reason(plan: ToolPlan, calls: list[ParsedCall], reason: str | None) -> str | None:
    # OpenAI: "tool_calls" when the model chose to call; a forced (named) call ends with "stop".
    return "tool_calls" if calls and plan.choice in ("auto", "required") and reason == "stop" else reason


class ToolChatStreamer:
    """The chunks of a streamed chat completion with tools, as the openai client assembles them.

    Named calls stream their arguments as they come (the first delta carries id,
    type and name); "auto" streams content until a tool call starts (text that
    could still be its start tag is held back); calls found by the parser, and
    those of "required", are sent whole when the choice finishes.
    """

    def __init__(self, rid: str, created: int, model: str, n: int, plan: ToolPlan):
        self.rid, self.created, self.model, self.plan = rid, created, model, plan
        self.cursors = [ChoiceCursor() for _ in range(n)]
        self.text = [""] * n
        self.sent = [0] * n  # characters of text sent as content / arguments
        self.started = [False] * n  # named: the call's header delta went out
        self.role_sent = False
        self.n = n

    def chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        chunks = []
        if not self.role_sent:
            self.role_sent = True
            chunks = [self._chunk(i, DeltaMessage(role="assistant", content="")) for i in range(self.n)]
        for c in out.outputs:
            delta = self.cursors[c.index].advance(c)
            if delta is None:
                continue
            self.text[c.index] += delta.text
            chunks += self._progress(c.index, delta.finish_reason is not None)
            if delta.finish_reason is not None:
                chunks += self._finish(c.index, delta.finish_reason, delta.stop_reason)
        return chunks

    def _progress(self, i: int, final: bool) -> list[ChatCompletionChunk]:
        text, plan = self.text[i], self.plan
        if plan.choice == "named":
            head = []
            if not self.started[i]:
                self.started[i] = True
                head = [self._chunk(i, DeltaMessage(tool_calls=[ToolCall(
                    index=0, id=_call_id(), type="function", function=FunctionCall(name=plan.named, arguments=""))]))]
            new, self.sent[i] = text[self.sent[i]:], len(text)
            if not new:
                return head
            return head + [self._chunk(i, DeltaMessage(tool_calls=[ToolCall(index=0, function=FunctionCall(
                arguments=new))]))]
        if plan.choice == "required":
            return []
        # auto / none: content up to a (possible) tool-call start
        end = len(text)
        if plan.choice == "auto":
            start = plan.parser.start
            at = text.find(start)
            if at >= 0:
                end = at
            elif not final:
                end = len(text) - next((k for k in range(min(len(start) - 1, len(text)), 0, -1)
                                        if start.startswith(text[-k:])), 0)
        if end <= self.sent[i]:
            return []
        new, self.sent[i] = text[self.sent[i]:end], end
        return [self._chunk(i, DeltaMessage(content=new))]

    def _finish(self, i: int, reason: str, stop_reason: int | str | None) -> list[ChatCompletionChunk]:
        chunks = []
        calls: list[ParsedCall] = []
        if self.plan.choice in ("auto", "required"):
            content, calls = self.plan.parse(self.text[i])
            if calls:
                chunks = [self._chunk(i, DeltaMessage(tool_calls=[ToolCall(
                    index=k, id=_call_id(), type="function", function=FunctionCall(name=c.name, arguments=c.arguments))
                    for k, c in enumerate(calls)]))]
            elif self.sent[i] < len(self.text[i]):  # no call after all: the held-back text is content
                chunks = [self._chunk(i, DeltaMessage(content=self.text[i][self.sent[i]:]))]
        end = ChatStreamChoice(index=i, delta=DeltaMessage(), logprobs=None,
                               finish_reason=finish_reason(self.plan, calls, reason), stop_reason=stop_reason)
        return chunks + [ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[end])]

    def _chunk(self, i: int, delta: DeltaMessage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model,
                                   choices=[ChatStreamChoice(index=i, delta=delta, logprobs=None, finish_reason=None)])


def apply_to_response(resp: Any, plan: ToolPlan) -> None:
    """Turn each choice's text into content + tool_calls (a ChatCompletionResponse, in place)."""
    if plan.choice == "none":
        return
    for choice in resp.choices:
        content, calls = plan.parse(choice.message.content or "")
        if calls:
            choice.message.content = content
            choice.message.tool_calls = tool_calls_of(calls)
        choice.finish_reason = finish_reason(plan, calls, choice.finish_reason)
